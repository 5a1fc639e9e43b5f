"""python -m training.synth: the template back-end (determinism, grounding), the pipeline and CLI, and the
`openai` back-end against a real chat-completions server on loopback (429, malformed replies, retry, cache)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from training.data import phantoms
from training.data.examples import read_jsonl
from training.data.synth import SourceRecord, TemplateBackend, main, read_sources
from training.data.synth_openai import OpenAIBackend, OpenAIConfig
from training.errors import SynthError
from training.eval.metrics.diagnosis import BUILTIN_SYNONYMS

DIAGNOSES = sorted({n for k, v in BUILTIN_SYNONYMS.items() for n in (k, *v)} | {n for c in phantoms.CLASSES for n in (c.name, *c.synonyms)})


def _named(text: str) -> set[str]:
    low = text.lower()
    return {d for d in DIAGNOSES if re.search(rf"(?<!\w){re.escape(d)}(?!\w)", low)}


def _inputs(tmp_path: Path) -> Path:
    for name, colour in (("a.png", (120, 60, 40)), ("b.png", (200, 40, 40)), ("c.png", (90, 90, 200))):
        Image.new("RGB", (24, 24), colour).save(tmp_path / name)
    path = tmp_path / "in.csv"
    path.write_text(
        "id,image,label,body_site,age,sex,fitzpatrick,morphology,differential,next_step,caption\n"
        "r1,a.png,psoriasis,elbow,34,male,III,Well-demarcated scaly pink plaques,eczema;tinea corporis,Topical steroid,Plaques on the elbow\n"
        "r2,b.png,,forearm,60,female,II,A red papule,,,A red papule on the forearm\n"
        "r3,c.png,,,,,,,,,\n"
        "r4,missing.png,melanoma,,,,,,,,\n"
    )
    return path


def test_template_backend_is_deterministic_and_grounded(tmp_path):
    records, problems = read_sources(_inputs(tmp_path))
    assert [r.id for r in records] == ["r1", "r2", "r3"] and [p.where for p in problems] == ["line 5"]
    backend = TemplateBackend(seed=0)
    first = [backend.generate(r, ("description", "diagnosis", "differential", "next_step", "caption")) for r in records]
    assert first == [TemplateBackend(seed=0).generate(r, ("description", "diagnosis", "differential", "next_step", "caption")) for r in records]
    others = [TemplateBackend(seed=s).generate(records[0], ("diagnosis", "next_step", "description")) for s in range(1, 6)]
    assert len({tuple(o) for o in others + [first[0][:1]]}) > 1  # wording varies with the seed
    r1 = dict((k, a) for k, _, a in first[0])
    assert set(r1) == {"description", "diagnosis", "differential", "next_step", "caption"}
    assert "psoriasis" in r1["diagnosis"] and "elbow" in r1["diagnosis"]
    assert _named(r1["diagnosis"]) == {"psoriasis"}
    assert {"eczema", "tinea corporis"} <= _named(r1["differential"])
    # without a label: no diagnosis, differential or next step, and no diagnosis named anywhere
    assert [k for k, _, _ in first[1]] == ["description", "caption"]
    for seed in range(10):
        for kind, q, a in TemplateBackend(seed).generate(records[1], ("description", "diagnosis", "differential", "next_step", "caption")):
            assert not _named(a), (kind, a)
    assert first[2] == []  # nothing given, nothing generated


def test_cli_template_writes_resumes_and_reports(tmp_path, capsys):
    inp, out = _inputs(tmp_path), tmp_path / "out.jsonl"
    assert main(["--input", str(inp), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr()
    assert "missing.png" in text.err and "1 malformed row(s) skipped" in text.err
    assert "records rejected: 1" in text.out  # r3: nothing to ground an answer on
    examples, problems = read_jsonl(out)
    assert problems == [] and len(examples) == 7
    assert {e.source for e in examples} == {"synthetic-qa", "caption"}
    r1 = [e for e in examples if e.id.startswith("r1-")]
    assert r1[0].context == {"age": 34, "sex": "male", "body_site": "elbow", "fitzpatrick": "III"} and r1[0].label == "psoriasis"
    assert main(["--input", str(inp), "--out", str(out), "--no-progress"]) == 0  # rerun: resumes, writes nothing twice
    assert "already done: 2" in capsys.readouterr().out
    assert len(read_jsonl(out)[0]) == 7
    assert main(["--input", str(inp), "--out", str(tmp_path / "x.jsonl"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 5" in err and len(err.strip().splitlines()) == 1
    assert main(["--input", str(tmp_path / "nope.csv"), "--out", str(out)]) == 2


def test_folder_input_with_sidecars(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "one.png")
    (tmp_path / "one.json").write_text(json.dumps({"label": "impetigo", "body_site": "chin"}))
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "two.jpg")
    (tmp_path / "two.txt").write_text("A blue macule.")
    Image.new("RGB", (8, 8), "green").save(tmp_path / "three.png")
    (tmp_path / "three.json").write_text("[1, 2]")
    records, problems = read_sources(tmp_path)
    assert {r.id: (r.metadata.get("label"), r.caption) for r in records} == {"one": ("impetigo", None), "two": (None, "A blue macule.")}
    assert len(problems) == 1 and "three.png" in problems[0].where


class _ChatServer:
    """A chat-completions endpoint on loopback that answers from a script of (status, content) steps."""

    def __init__(self, script):
        self.script = list(script)
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, content = server.script.pop(0) if server.script else (200, server.default(body))
                if status != 200:
                    self.send_response(status)
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(b'{"error": "slow down"}')
                    return
                reply = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def default(body) -> str:
        meta = json.loads(body["messages"][1]["content"].split("\n")[0].removeprefix("Metadata: "))
        pairs = [{"kind": "description", "question": "Describe it.", "answer": meta.get("morphology", "A lesion.")}]
        if meta.get("label"):
            pairs.append({"kind": "diagnosis", "question": "Diagnosis?", "answer": f"Most likely {meta['label']}."})
        return "```json\n" + json.dumps({"pairs": pairs}) + "\n```"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat_server():
    servers = []

    def start(script=()):
        servers.append(_ChatServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _record():
    return SourceRecord("r1", [], {"label": "psoriasis", "morphology": "Scaly pink plaques"}, None)


def test_openai_backend_retries_429_and_malformed_replies_then_caches(chat_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_KEY", "sk-test")
    pairs = {"pairs": [{"kind": "diagnosis", "question": "Dx?", "answer": "Most likely eczema."}]}
    server = chat_server([(429, ""), (200, "Sure! Here are your pairs:"), (200, json.dumps(pairs))])
    sleeps: list[float] = []
    config = OpenAIConfig(url=server.url, model="m", api_key_env="TEST_KEY", backoff_s=0.01, rpm=0, cache_dir=str(tmp_path / "cache"))
    backend = OpenAIBackend(config, sleep=sleeps.append)
    pairs = backend.generate(_record(), ("description", "diagnosis"))
    assert pairs == [("description", "Describe it.", "Scaly pink plaques"), ("diagnosis", "Diagnosis?", "Most likely psoriasis.")]
    assert len(server.requests) == 4  # 429, not JSON, a diagnosis that is not the given one, then valid
    assert backend.stats["retries"] == 3 and backend.stats["invalid_replies"] == 2
    assert sleeps == [0.01, 0.02, 0.04]
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert '"label": "psoriasis"' in first["body"]["messages"][1]["content"]  # the metadata is in the prompt
    again = OpenAIBackend(config, sleep=sleeps.append).generate(_record(), ("description", "diagnosis"))
    assert again == pairs and len(server.requests) == 4  # served from the on-disk cache


def test_openai_backend_gives_up_and_fails_fast_on_client_errors(chat_server):
    server = chat_server([(503, "")] * 3)
    backend = OpenAIBackend(OpenAIConfig(url=server.url, model="m", max_retries=2, backoff_s=0, rpm=0), sleep=lambda s: None)
    with pytest.raises(SynthError, match="no valid reply after 3 attempts"):
        backend.generate(_record(), ("diagnosis",))
    server = chat_server([(401, "")])
    with pytest.raises(SynthError, match="HTTP 401"):
        OpenAIBackend(OpenAIConfig(url=server.url, model="m", rpm=0), sleep=lambda s: None).generate(_record(), ("diagnosis",))
    no_label = SourceRecord("r2", [], {"morphology": "x"}, None)
    server = chat_server([(200, json.dumps({"pairs": [{"kind": "diagnosis", "question": "q", "answer": "Most likely melanoma."}]}))] * 2)
    with pytest.raises(SynthError, match="although no diagnosis was given"):
        config = OpenAIConfig(url=server.url, model="m", max_retries=1, backoff_s=0, rpm=0)
        OpenAIBackend(config, sleep=lambda s: None).generate(no_label, ("diagnosis",))


def test_openai_rate_limit_spaces_requests(chat_server):
    server = chat_server()
    waits: list[float] = []
    backend = OpenAIBackend(OpenAIConfig(url=server.url, model="m", rpm=600), sleep=waits.append)
    for i in range(3):
        backend.generate(SourceRecord(f"r{i}", [], {"label": "psoriasis", "morphology": f"m{i}"}, None), ("description",))
    assert len(waits) == 2 and all(0 < w <= 0.1 for w in waits)


def test_cli_openai_end_to_end(chat_server, tmp_path, capsys):
    server = chat_server([(429, "")])
    inp, out = _inputs(tmp_path), tmp_path / "out.jsonl"
    args = ["--input", str(inp), "--out", str(out), "--backend", "openai", "--url", server.url, "--model", "m",
            "--kinds", "description,diagnosis", "--backoff", "0", "--rpm", "0", "--no-progress"]
    assert main(args) == 0
    examples, _ = read_jsonl(out)
    assert {e.id for e in examples} == {"r1-description", "r1-diagnosis", "r2-description", "r3-description"}
    assert "cache_hits 0" in capsys.readouterr().out
    out.unlink()  # the output is gone but the cache is not: nothing is paid twice
    n = len(server.requests)
    assert main(args) == 0 and len(server.requests) == n
    assert main(args[:6] + ["--backend", "openai"]) == 2
    assert "needs --url and --model" in capsys.readouterr().err
