"""The OpenAI-compatible serving back-end: answers from a server (vLLM in production) instead of this process.

    DERMALOOP_BACKEND=openai DERMALOOP_ENDPOINT=http://127.0.0.1:8000/v1 python -m demo
    engine = Engine.from_settings(settings)   # a RemoteEngine when settings.backend == "openai"

`RemoteEngine` has the `Engine` methods the app, the evaluator and the gate call (stream,
answer, answer_batch, versions, use, add_adapter): each question becomes
`POST {endpoint}/chat/completions` with `stream: true`, the same messages the local engine
renders (core/prompts.py: system instruction, clinical context, templates, history), images
as PNG data URLs. The base version is requested under `endpoint_model`; an adapter version
under its own name, which is how vLLM names a LoRA adapter (`--lora-modules NAME=DIR`, or
`POST {endpoint}/load_lora_adapter` at run time with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True,
which `add_adapter` sends). Greedy decoding is `temperature: 0`. A server that is down,
refuses (4xx/5xx), stalls past `endpoint_timeout_s` or sends a malformed stream raises
`BackendError` with one line; the app shows it and keeps serving.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import queue
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image

from core.config import GenerationSettings, Settings
from core.engine import BASE_VERSION, Answer, Generation
from core.errors import BackendError, InputError, ModelLoadError
from core.kv_cache import ConversationCache
from core.models import ModelInfo
from core.prompts import SAFETY_INSTRUCTION, ChatTurn, ClinicalContext, check_question, render_user_text

_END = object()
log = logging.getLogger("dermaloop.core")


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_messages(turns: Sequence[ChatTurn]) -> list[dict[str, Any]]:
    """OpenAI chat messages for `turns`: the local engine's text, images inline where they were given."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SAFETY_INSTRUCTION}]
    for turn in turns:
        content = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in turn.images]
        content.append({"type": "text", "text": render_user_text(turn.question, turn.context, turn.template)})
        messages.append({"role": "user", "content": content})
        if turn.answer is not None:
            messages.append({"role": "assistant", "content": turn.answer})
    return messages


class _Chunks:
    """What `Generation` iterates: text chunks put by the request thread, until `end()`."""

    def __init__(self):
        self._q: queue.Queue = queue.Queue()

    def put(self, text: str) -> None:
        self._q.put(text)

    def end(self) -> None:
        self._q.put(_END)

    def __iter__(self) -> Iterator[str]:
        while (item := self._q.get()) is not _END:
            yield item


class RemoteEngine:
    """`Engine`'s interface over an OpenAI-compatible chat-completions server."""

    supports_system = True
    kv_cache = ConversationCache(0)  # the server keeps its own prefix cache (vLLM: --enable-prefix-caching)

    def __init__(self, settings: Settings, *, version: str = BASE_VERSION):
        if not settings.endpoint:
            raise InputError("backend openai needs an endpoint, e.g. --endpoint http://127.0.0.1:8000/v1")
        self.settings = settings
        self.endpoint = settings.endpoint.rstrip("/")
        self.base_model = settings.endpoint_model or settings.model
        self._versions: dict[str, str | None] = {version: None}
        self.default_version = version
        self._repetition_penalty = True  # until the server refuses it (`transformers serve` does; vLLM takes it)
        self.info = ModelInfo(source=settings.model, model_type="openai", device=self.endpoint, dtype="remote",
                              parameters=0, image_splitting=None, local=False)

    # -- versions (an adapter version is the server's LoRA adapter of the same name) ---------------
    @property
    def versions(self) -> dict[str, str | None]:
        return dict(self._versions)

    def add_base_version(self, name: str) -> None:
        self._versions[name] = None

    def add_adapter(self, name: str, adapter_dir: str | Path) -> None:
        """Ask the server to load the adapter under `name` (vLLM's run-time LoRA loading)."""
        if self._versions.get(name) == str(adapter_dir):
            return
        try:
            self._post("/load_lora_adapter", {"lora_name": name, "lora_path": str(adapter_dir)}).close()
        except BackendError as e:
            raise ModelLoadError(f"the server could not load adapter {name} from {adapter_dir}: {e}") from None
        self._versions[name] = str(adapter_dir)

    def remove_adapter(self, name: str) -> None:
        if self._versions.get(name) is None:
            raise InputError(f"{name!r} is not a loaded adapter")
        if name == self.default_version:
            raise InputError(f"{name!r} is the default version; use another one first")
        self._post("/unload_lora_adapter", {"lora_name": name}).close()
        del self._versions[name]

    def use(self, name: str) -> None:
        if name not in self._versions:
            raise InputError(f"version {name!r} is not loaded; loaded: {', '.join(self._versions)}")
        self.default_version = name

    # -- answering ------------------------------------------------------------------
    def stream(self, images: Sequence[Image.Image], question: str, *, context: ClinicalContext | None = None,
               history: Sequence[ChatTurn] = (), template: str = "free", generation: GenerationSettings | None = None,
               version: str | None = None, conversation: str | None = None) -> Generation:
        gen = generation or self.settings.generation()
        version = version or self.default_version
        payload = self._payload(images, question, context, history, template, gen, version)
        chunks = _Chunks()

        def run(handle: Generation) -> None:
            handle.result = self._complete(payload, gen, version, template, chunks, handle)
            chunks.end()

        return Generation(run, chunks)  # type: ignore[arg-type]  # quacks like a TextIteratorStreamer

    def answer(self, images: Sequence[Image.Image], question: str, **kwargs: Any) -> Answer:
        return self.stream(images, question, **kwargs).wait()

    def answer_batch(self, requests: Sequence[ChatTurn], *, generation: GenerationSettings | None = None,
                     version: str | None = None, batch_size: int = 8) -> list[Answer]:
        """Requests in flight together, `batch_size` at a time: the server batches them (vLLM: continuously)."""
        answers: list[Answer] = []
        for i in range(0, len(requests), batch_size):
            running = [self.stream(r.images, r.question, context=r.context, template=r.template, generation=generation,
                                   version=version) for r in requests[i : i + batch_size]]
            answers += [g.wait() for g in running]
        return answers

    # -- internals ------------------------------------------------------------------
    def _payload(self, images, question, context, history, template, gen: GenerationSettings, version: str) -> dict:
        if version not in self._versions:
            raise InputError(f"version {version!r} is not loaded")
        if len(images) > self.settings.max_images:
            raise InputError(f"{len(images)} images given; at most {self.settings.max_images} per question")
        turn = ChatTurn(check_question(question, self.settings.max_question_chars), None, list(images), context, template)
        payload: dict[str, Any] = {
            "model": self.base_model if self._versions[version] is None else version,
            "messages": chat_messages([*history, turn]),
            "max_tokens": gen.max_new_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if gen.do_sample:
            payload.update(temperature=gen.temperature, top_p=gen.top_p)
        else:
            payload["temperature"] = 0.0
        if gen.repetition_penalty != 1.0 and self._repetition_penalty:
            payload["repetition_penalty"] = gen.repetition_penalty  # vLLM's extension of the API
        return payload

    def _post(self, path: str, payload: dict) -> Any:
        url = self.endpoint + path
        req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(req, timeout=self.settings.endpoint_timeout_s)
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode(errors="replace").strip()
            raise BackendError(f"{url} answered HTTP {e.code}: {detail or e.reason}") from None
        except (TimeoutError, socket.timeout):
            raise BackendError(f"{url} did not answer within {self.settings.endpoint_timeout_s:g} s") from None
        except (urllib.error.URLError, ConnectionError) as e:
            raise BackendError(f"cannot reach {url} ({getattr(e, 'reason', e)})") from None

    def _complete(self, payload: dict, gen: GenerationSettings, version: str, template: str, chunks: _Chunks,
                  handle: Generation) -> Answer:
        start = time.perf_counter()
        first: float | None = None
        text: list[str] = []
        usage: dict[str, Any] = {}
        url = self.endpoint + "/chat/completions"
        try:
            resp = self._post("/chat/completions", payload)
        except BackendError as e:
            if "repetition_penalty" not in str(e) or "repetition_penalty" not in payload:
                raise
            log.warning("%s does not take repetition_penalty; answers go without it", self.endpoint)
            self._repetition_penalty = False
            resp = self._post("/chat/completions", {k: v for k, v in payload.items() if k != "repetition_penalty"})
        with resp:
            try:
                for raw in resp:
                    if handle.stopped:
                        break
                    line = raw.decode("utf-8").strip()
                    if not line or line.startswith(":"):
                        continue
                    if not line.startswith("data:"):
                        raise BackendError(f"{url} sent a malformed stream (a line without 'data:')")
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        event = json.loads(data)
                        usage = event.get("usage") or usage
                        piece = event["choices"][0]["delta"].get("content") or "" if event.get("choices") else ""
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                        raise BackendError(f"{url} sent a malformed stream event: {data[:80]}") from None
                    if piece:
                        first = first or time.perf_counter()
                        text.append(piece)
                        chunks.put(piece)
            except (TimeoutError, socket.timeout):
                raise BackendError(f"{url} stopped sending within {self.settings.endpoint_timeout_s:g} s") from None
        stopped = handle.stopped
        answer = "".join(text).strip()
        return Answer(text=answer, version=version, status="stopped" if stopped else "complete",
                      prompt_tokens=int(usage.get("prompt_tokens", 0)), completion_tokens=int(usage.get("completion_tokens", 0)),
                      ttft_s=(first - start) if first else None, latency_s=time.perf_counter() - start,
                      generation=gen.to_dict(), template=template)
