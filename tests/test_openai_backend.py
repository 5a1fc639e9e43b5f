"""The OpenAI-compatible back-end (core/openai_backend.py) against a chat-completions server on loopback,
started by the test: streaming, images as data URLs, versions as model names, stop, and every failure
(server down, 4xx, 5xx, timeout, malformed stream) as one clear BackendError after which serving goes on."""

import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from core.config import GenerationSettings, Settings
from core.engine import Engine
from core.errors import BackendError, ModelLoadError
from core.openai_backend import RemoteEngine
from core.prompts import ChatTurn, ClinicalContext

from conftest import draw_lesion


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.mode = "ok"
        self.requests: list[tuple[str, dict]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def reply_for(payload: dict) -> str:
    """What the fake server answers: it describes what it was sent, so the test can check the request."""
    user = payload["messages"][-1]["content"]
    images = [p for m in payload["messages"] if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image_url"]
    sizes = []
    for part in images:
        head, data = part["image_url"]["url"].split(",", 1)
        assert head == "data:image/png;base64"
        sizes.append("x".join(map(str, Image.open(io.BytesIO(base64.b64decode(data))).size)))
    return f"{payload['model']} saw {len(images)} images ({' '.join(sizes)}) and: {user[-1]['text']}"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, payload))
        mode = self.server.mode
        if mode in ("400", "500", "404"):
            self.send_response(int(mode))
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "refused by the test"}}')
            return
        if mode == "slow":
            time.sleep(2.5)
        if self.path.endswith("_lora_adapter"):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"Success")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if mode == "malformed":
            self.wfile.write(b"data: {not json\n\n")
            return
        words = reply_for(payload).split(" ") if mode != "long" else ["word"] * 200
        try:
            for i, word in enumerate(words):
                event = {"choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word}}]}
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
                if mode == "long":
                    time.sleep(0.01)
            usage = {"choices": [], "usage": {"prompt_tokens": 42, "completion_tokens": len(words)}}
            self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading (Stop): as vLLM, abort
            pass


@pytest.fixture
def server():
    srv = Server()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def remote(server):
    settings = Settings.from_env(backend="openai", endpoint=server.url, endpoint_model="smolvlm", endpoint_timeout_s=1.0)
    engine = Engine.from_settings(settings)
    assert isinstance(engine, RemoteEngine)
    return engine


def test_streams_the_answer_with_images_history_and_greedy_settings(remote, server):
    a, b = draw_lesion(size=(96, 80)), draw_lesion(size=(50, 40))
    history = [ChatTurn("What is it?", "A naevus.", [a], ClinicalContext(age=30))]
    gen = remote.stream([b], "And this one?", history=history)
    chunks = list(gen)
    assert len(chunks) > 3 and "".join(chunks) == gen.result.text == "smolvlm saw 2 images (96x80 50x40) and: And this one?"
    assert gen.result.status == "complete" and gen.result.completion_tokens == len(chunks) and gen.result.prompt_tokens == 42
    _, payload = server.requests[-1]
    roles = [m["role"] for m in payload["messages"]]
    assert roles == ["system", "user", "assistant", "user"] and payload["messages"][2]["content"] == "A naevus."
    assert "30-year-old" in payload["messages"][1]["content"][-1]["text"]
    assert payload["temperature"] == 0.0 and payload["stream"] is True and payload["max_tokens"] == 256


def test_an_adapter_version_is_requested_by_name_and_loaded_at_run_time(remote, server, tmp_path):
    remote.add_adapter("v2", tmp_path / "v2")
    assert server.requests[-1] == ("/v1/load_lora_adapter", {"lora_name": "v2", "lora_path": str(tmp_path / "v2")})
    assert remote.answer([], "Which model?", version="v2").text.startswith("v2 saw 0 images")
    remote.use("v2")
    assert remote.answer([], "Which model?").version == "v2"
    server.mode = "404"
    with pytest.raises(ModelLoadError, match="could not load adapter v3 .*HTTP 404"):
        remote.add_adapter("v3", tmp_path / "v3")


def test_stop_ends_the_answer_early(remote, server):
    server.mode = "long"
    gen = remote.stream([], "Describe.", generation=GenerationSettings(max_new_tokens=400))
    it = iter(gen)
    next(it)
    gen.stop()
    rest = list(it)
    assert gen.result.status == "stopped" and len(rest) < 150


@pytest.mark.parametrize("mode, message", [("500", "answered HTTP 500: .*refused by the test"), ("400", "answered HTTP 400"),
                                           ("malformed", "malformed stream"), ("slow", "did not answer within 1 s")])
def test_each_failure_is_one_clear_error_and_serving_goes_on(remote, server, mode, message):
    server.mode = mode
    with pytest.raises(BackendError, match=message):
        "".join(remote.stream([draw_lesion()], "What is it?"))
    server.mode = "ok"
    assert remote.answer([], "Still there?").text.endswith("Still there?")


def test_a_server_that_is_down(tmp_path):
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = RemoteEngine(Settings.from_env(backend="openai", endpoint=f"http://127.0.0.1:{port}/v1"))
    with pytest.raises(BackendError, match=f"cannot reach http://127.0.0.1:{port}/v1/chat/completions"):
        engine.answer([], "Anyone?")


def test_answer_batch_keeps_the_order(remote):
    reqs = [ChatTurn(f"Question {i}?", images=[draw_lesion()]) for i in range(5)]
    answers = remote.answer_batch(reqs, batch_size=2)
    assert [a.text.rsplit(": ", 1)[1] for a in answers] == [f"Question {i}?" for i in range(5)]


# ------------------------------------------------------------------ a real server: `transformers serve` on loopback


@pytest.fixture(scope="module")
def transformers_serve(tiny_model_dir):
    """`transformers serve` (transformers' own OpenAI-compatible server) with the tiny model, on a loopback port.
    It needs transformers[serving] (fastapi, uvicorn, openai): skipped where `openai` is not installed."""
    import os
    import subprocess
    import sys

    pytest.importorskip("openai", reason="transformers serve needs transformers[serving] (the openai package)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", str(tiny_model_dir), "--host",
                             "127.0.0.1", "--port", str(port), "--device", "cpu"], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):
            try:  # listening (its /v1/models scans the hub cache, so a plain connection tells)
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("transformers serve did not start within 120 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_transformers_serve_answers_as_the_local_engine(transformers_serve, tiny_model_dir):
    """The same greedy tokens from the server as from our own engine (the server splits images, so we do too)."""
    from core.models import load_model

    gen = GenerationSettings(max_new_tokens=12, repetition_penalty=1.0)
    remote = RemoteEngine(Settings.from_env(backend="openai", endpoint=transformers_serve, model=str(tiny_model_dir)))
    local = Engine(load_model(tiny_model_dir, image_splitting="on"), Settings())
    img = draw_lesion()
    streamed = remote.stream([img], "What is this lesion?", generation=gen)
    text = "".join(streamed)
    first = local.answer([img], "What is this lesion?", generation=gen)
    assert text == streamed.result.text == first.text and streamed.result.prompt_tokens == first.prompt_tokens
    history = [ChatTurn("What is this lesion?", first.text, [img])]
    assert remote.answer([], "Is it dangerous?", history=history, generation=gen).text == \
        local.answer([], "Is it dangerous?", history=history, generation=gen).text
    # transformers serve refuses vLLM's repetition_penalty field: the back-end drops it and goes on.
    assert remote.answer([img], "Again?", generation=GenerationSettings(max_new_tokens=4)).completion_tokens > 0
    assert remote._repetition_penalty is False
