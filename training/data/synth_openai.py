"""The `openai` back-end of `python -m training.synth`: any OpenAI-compatible chat-completions endpoint.

vLLM, Ollama, llama.cpp's server and Gemini's OpenAI-compatible endpoint all take
`POST {url}/chat/completions`. The image's metadata goes into the prompt (DermaSynth:
grounding the generator on metadata reduces hallucination); the reply must be JSON
`{"pairs": [{"kind", "question", "answer"}]}` and is validated (kinds, non-empty
text, a diagnosis answer names the given label, no diagnosis without one). 429 and
5xx answers and invalid JSON are retried with exponential back-off (Retry-After is
honoured), requests are spaced by a rate limit, and valid replies are cached on
disk under a hash of the request, so a rerun does not pay twice.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from training.errors import SynthError

SYSTEM_PROMPT = (
    "You write training data for a dermatology assistant used by clinicians for research. "
    "From the image metadata and caption given, write one question-answer pair per requested kind. "
    "Use only facts in the metadata and caption: never name a diagnosis that is not given, never invent "
    "measurements, history or findings. Kinds: description (morphology), diagnosis (the given diagnosis), "
    "differential (only from a given differential), next_step (management to confirm or treat), caption "
    "(a figure-style caption). Reply with JSON only, no prose: "
    '{"pairs": [{"kind": "...", "question": "...", "answer": "..."}]}'
)
RETRY_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)


@dataclass(frozen=True)
class OpenAIConfig:
    url: str  # base URL, e.g. http://localhost:8000/v1 (".../chat/completions" is added)
    model: str  # the endpoint's model name
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key (may be unset for local servers)
    temperature: float = 0.3
    max_tokens: int = 800
    timeout_s: float = 60.0  # per request
    max_retries: int = 4  # attempts after the first
    backoff_s: float = 2.0  # first back-off; doubles per retry (capped at 60 s)
    rpm: float = 60.0  # requests per minute (0 = unlimited)
    cache_dir: str | None = None  # on-disk reply cache (None = no cache)
    send_images: bool = False  # attach images as data URLs (needs a vision model behind the endpoint)


class InvalidReply(ValueError):
    """A reply that is not the JSON asked for (retried)."""


class OpenAIBackend:
    name = "openai"

    def __init__(self, config: OpenAIConfig, *, sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self.sleep = sleep
        self._last_request = 0.0
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0, "invalid_replies": 0}

    # -- public ---------------------------------------------------------------
    def generate(self, record, kinds: tuple[str, ...]) -> list[tuple[str, str, str]]:
        """(kind, question, answer) pairs for `record`; raises SynthError when the endpoint keeps failing."""
        messages = self.messages(record, kinds)
        payload = {"model": self.config.model, "messages": messages, "temperature": self.config.temperature,
                   "max_tokens": self.config.max_tokens}
        key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        cached = self._cache_get(key)
        if cached is not None:
            self.stats["cache_hits"] += 1
            return validate(cached, record, kinds)
        last_error = ""
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self.stats["retries"] += 1
            try:
                content = self._post(payload)
                pairs = validate(content, record, kinds)
            except InvalidReply as e:
                self.stats["invalid_replies"] += 1
                last_error = f"invalid reply: {e}"
                self.sleep(self._delay(attempt, None))
                continue
            except _Retryable as e:
                last_error = str(e)
                self.sleep(self._delay(attempt, e.retry_after))
                continue
            self._cache_put(key, content)
            return pairs
        raise SynthError(f"record {record.id}: no valid reply after {self.config.max_retries + 1} attempts ({last_error})")

    def messages(self, record, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
        facts = {k: v for k, v in record.metadata.items() if v not in (None, "", [])}
        text = (
            f"Metadata: {json.dumps(facts, ensure_ascii=False, sort_keys=True)}\n"
            f"Caption: {record.caption or '(none)'}\n"
            f"Kinds: {', '.join(kinds)}\n"
            "Write one pair per kind that the metadata and caption support; skip a kind they do not support."
        )
        content: list[dict[str, Any]] | str = text
        if self.config.send_images:
            content = [{"type": "text", "text": text}] + [
                {"type": "image_url", "image_url": {"url": _data_url(p)}} for p in record.images
            ]
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]

    # -- HTTP -----------------------------------------------------------------
    def _post(self, payload: dict) -> str:
        self._rate_limit()
        url = self.config.url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.config.api_key_env, "") if self.config.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        self.stats["requests"] += 1
        try:
            with urllib.request.urlopen(req, timeout=self.config.timeout_s) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            if e.code in RETRY_STATUS:
                raise _Retryable(f"HTTP {e.code}", _retry_after(e.headers.get("Retry-After"))) from None
            detail = e.read()[:200].decode(errors="replace")
            raise SynthError(f"{url} answered HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise _Retryable(f"cannot reach {url} ({getattr(e, 'reason', e)})", None) from None
        try:
            data = json.loads(body)
            return data["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise InvalidReply("not a chat-completions response") from None

    def _rate_limit(self) -> None:
        if self.config.rpm <= 0:
            return
        wait = self._last_request + 60.0 / self.config.rpm - time.monotonic()
        if wait > 0:
            self.sleep(wait)
        self._last_request = time.monotonic()

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        delay = min(60.0, self.config.backoff_s * 2**attempt)
        return max(delay, min(retry_after or 0.0, 300.0))

    # -- cache ----------------------------------------------------------------
    def _cache_path(self, key: str) -> Path | None:
        return Path(self.config.cache_dir) / key[:2] / f"{key}.json" if self.config.cache_dir else None

    def _cache_get(self, key: str) -> str | None:
        path = self._cache_path(key)
        if path is None or not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["content"]
        except (ValueError, KeyError):
            return None

    def _cache_put(self, key: str, content: str) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"content": content}), encoding="utf-8")
        os.replace(tmp, path)


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None):
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _data_url(path: str | Path) -> str:
    from training.data.examples import load_image

    buf = io.BytesIO()
    load_image(path).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def names_label(text: str, label: str) -> bool:
    """Whether `text` names `label` (case-insensitive, word-bounded, hyphens as spaces)."""
    norm = lambda t: " ".join(re.sub(r"[-_]", " ", t.lower()).split())  # noqa: E731
    return re.search(r"(?<!\w)" + re.escape(norm(label)) + r"(?!\w)", norm(text)) is not None


def validate(content: str, record, kinds: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """Parse and check a reply; raises InvalidReply."""
    text = content.strip()
    fence = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text, re.S)
    if fence:
        text = fence.group(1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidReply(f"not JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("pairs"), list):
        raise InvalidReply('expected {"pairs": [...]}')
    label = record.metadata.get("label")
    pairs = []
    for p in data["pairs"]:
        if not isinstance(p, dict):
            raise InvalidReply("a pair is not an object")
        kind, q, a = p.get("kind"), p.get("question"), p.get("answer")
        if kind not in kinds:
            continue  # a kind nobody asked for: dropped, not fatal
        if not isinstance(q, str) or not isinstance(a, str) or not q.strip() or not a.strip():
            raise InvalidReply("empty or non-string question/answer")
        if kind == "diagnosis":
            if not label:
                raise InvalidReply("a diagnosis pair although no diagnosis was given")
            if not names_label(a, label):
                raise InvalidReply(f"the diagnosis answer does not name the given diagnosis {label!r}")
        pairs.append((kind, q.strip(), a.strip()))
    if not pairs:
        raise InvalidReply("no pairs")
    return pairs
