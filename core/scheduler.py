"""Dynamic batching: questions that arrive together are answered in one batched `generate`.

Clinicians asking at the same moment each get a handle that streams their own answer, can be
stopped on its own, and ends with their own `Answer`; decoding several rows per step reads the
weights once for all of them, so four answers cost little more than one. A request's greedy
answer is the one it gets alone (tests/test_scheduler.py).

The scheduler waits `window_s` after the first request for others, then takes up to
`max_batch` requests that can share a batch (same model version and generation settings, and
all with images or all without); the rest wait for the next round. A request alone goes
through the engine's own path, so a follow-up reuses its conversation's cached keys/values.
A batch encodes its prompts in full (a `DynamicCache` holds one prefix length for all rows), so
a follow-up whose conversation is in the prefix cache is never batched: it runs alone, where
its prompt costs a few tokens instead of the whole conversation with its images. Image features
come from the engine's feature cache in both paths (core/features.py). A request stopped while
it waits leaves the queue without running.

    scheduler = Scheduler(engine, max_batch=8)
    handle = scheduler.submit([image], "What is this lesion?")
    print(handle.position, scheduler.estimated_wait_s(handle))
    for chunk in handle:
        print(chunk, end="")
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image
from transformers import StoppingCriteria, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from core.config import GenerationSettings
from core.engine import Answer, Engine, Handle, _restore_threads
from core.prompts import ChatTurn, ClinicalContext, check_question


class Request(Handle):
    """One clinician's question in the queue: iterate for text, `stop()`, `result` when done (see `Handle`)."""

    def __init__(self, turns: list[ChatTurn], kwargs: dict[str, Any], gen: GenerationSettings, version: str, streamer):
        self.turns, self.kwargs, self.gen, self.version = turns, kwargs, gen, version
        self.streamer = streamer
        self.result: Answer | None = None
        self.position = 0  # requests ahead of this one (0: being answered or next)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._exc: BaseException | None = None
        self.first_token_at: float | None = None
        self.started = threading.Event()  # set when its batch begins (it no longer waits in line)

    @property
    def conversation(self) -> str | None:
        return self.kwargs.get("conversation")

    @property
    def has_images(self) -> bool:
        return any(t.images for t in self.turns)

    def _finished(self) -> None:
        self._done.wait()


class _RowsStreamer(BaseStreamer):
    """Hands each row of a batched `generate` to its request's streamer, ending a row at its end-of-answer token."""

    def __init__(self, requests: list[Request], eos: set[int]):
        self.requests, self.eos = requests, eos
        self.prompt_seen = False
        self.ended = [False] * len(requests)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompts
            self.prompt_seen = True
            return
        now = time.perf_counter()
        for i, req in enumerate(self.requests):
            if self.ended[i]:
                continue
            if req.first_token_at is None:
                req.first_token_at = now
            token = int(value[i])
            req.streamer.put(value[i : i + 1])
            if token in self.eos or req.stopped:
                self.ended[i] = True
                req.streamer.end()

    def end(self) -> None:
        for i, req in enumerate(self.requests):
            if not self.ended[i]:
                self.ended[i] = True
                req.streamer.end()


class _RowsStop(StoppingCriteria):
    def __init__(self, requests: list[Request]):
        self.requests = requests

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.tensor([r.stopped for r in self.requests], dtype=torch.bool, device=input_ids.device)


@dataclass
class SchedulerStats:
    batches: int = 0
    largest_batch: int = 0
    batch_seconds: list[float] = field(default_factory=list)  # recent batches' durations (for the wait estimate)
    dropped: int = 0  # requests stopped while they waited


class Scheduler:
    def __init__(self, engine: Engine, *, max_batch: int = 8, window_s: float = 0.05):
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self._queue: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.stats = SchedulerStats()
        self._running_since: float | None = None  # when the batch under way began (None: idle)
        self._worker: threading.Thread | None = None  # started by the first request (an idle app holds no thread)

    def submit(self, images: Sequence[Image.Image], question: str, *, context: ClinicalContext | None = None,
               history: Sequence[ChatTurn] = (), template: str = "free", generation: GenerationSettings | None = None,
               version: str | None = None, conversation: str | None = None) -> Request:
        """Queue a question (checked now, so bad input fails at once); the handle streams its answer."""
        engine = self.engine
        gen = generation or engine.settings.generation()
        version = version or engine.default_version
        engine._prepare(images, question, context, history, template, version)  # the engine's own checks
        turn = ChatTurn(check_question(question, engine.settings.max_question_chars), None, list(images), context, template)
        streamer = TextIteratorStreamer(engine.processor.tokenizer, skip_prompt=False, skip_special_tokens=True)
        kwargs = dict(images=list(images), question=question, context=context, history=list(history), template=template,
                      conversation=conversation)
        req = Request([*history, turn], kwargs, gen, version, streamer)
        with self._cond:
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, daemon=True, name="dermaloop-scheduler")
                self._worker.start()
            req.position = len(self._queue)
            self._queue.append(req)
            self._cond.notify()
        return req

    def estimated_wait_s(self, req: Request) -> float:
        """Seconds until `req` starts: what is left of the batch under way, then the batches ahead of it
        in the queue, each as long as a recent batch (the median of the last eight; 0 before any)."""
        recent = self.stats.batch_seconds[-8:]
        per_batch = sorted(recent)[len(recent) // 2] if recent else 0.0
        since = self._running_since
        left = max(per_batch - (time.perf_counter() - since), 0.0) if since is not None else 0.0
        return left + (req.position // self.max_batch) * per_batch

    def place(self, req: Request) -> int:
        """Where `req` stands in line, counting the batch under way as one place (1: it is next, nothing runs)."""
        return req.position + 1 + (self._running_since is not None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    # -- the worker --------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            time.sleep(self.window_s)  # let the others who asked at the same moment arrive
            batch = self._take()
            if not batch:  # every waiting request had been stopped
                continue
            start = self._running_since = time.perf_counter()
            try:
                self._run(batch)
            except BaseException as e:  # every request of the batch hears of it
                for req in batch:
                    req._exc = e
                    req.streamer.end()
            finally:
                self._running_since = None
                for req in batch:
                    req._done.set()
            self.stats.batch_seconds = [*self.stats.batch_seconds[-7:], time.perf_counter() - start]

    def _cached(self, req: Request) -> bool:
        """Whether the request's conversation has keys/values in the prefix cache (then it runs alone)."""
        return req.conversation is not None and self.engine.kv_cache_supported and req.conversation in self.engine.kv_cache

    def _take(self) -> list[Request]:
        """The oldest request and those after it that can share its batch; the others keep their order.
        Requests stopped while waiting end here, with an empty stopped answer."""
        with self._cond:
            for req in [r for r in self._queue if r.stopped]:
                self._queue.remove(req)
                self._drop(req)
            if not self._queue:
                return []
            first = self._queue.popleft()
            batch, rest = [first], deque()
            alone = self._cached(first)
            while self._queue:
                req = self._queue.popleft()
                fits = (not alone and len(batch) < self.max_batch and req.version == first.version and req.gen == first.gen
                        and req.has_images == first.has_images and not self._cached(req))
                (batch if fits else rest).append(req)
            self._queue = rest
            for i, req in enumerate(self._queue):
                req.position = i
            for req in batch:
                req.started.set()
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        return batch

    def _drop(self, req: Request) -> None:
        req.result = self.engine._answer(torch.zeros(0, dtype=torch.long), version=req.version, status="stopped", prompt_tokens=0,
                                         ttft_s=None, latency_s=0.0, gen=req.gen, template=req.kwargs["template"])
        req.streamer.end()
        req.started.set()
        req._done.set()
        self.stats.dropped += 1

    def _run(self, batch: list[Request]) -> None:
        engine = self.engine
        if len(batch) == 1:  # alone: the engine's own path, with the conversation's prefix cache
            req = batch[0]
            k = req.kwargs
            req.streamer.skip_prompt = True  # generate hands this streamer the prompt first
            req.result = engine._generate_one(
                engine._prepare(k["images"], k["question"], k["context"], k["history"], k["template"], req.version),
                req.gen, req.version, k["template"], streamer=req.streamer, stop=req._stop,
                conv=engine._conversation(k["conversation"], k["history"], k["images"]))
            if req.result.ttft_s is not None:  # generation began latency_s before now
                req.first_token_at = time.perf_counter() - req.result.latency_s + req.result.ttft_s
            return
        inputs = engine._encode([req.turns for req in batch])
        eos = engine.model.generation_config.eos_token_id
        streamer = _RowsStreamer(batch, set(eos if isinstance(eos, list) else [eos]))
        with engine._lock, torch.inference_mode(), _restore_threads():
            engine._activate(batch[0].version)
            start = time.perf_counter()
            out = engine._generate(**engine._model_inputs(inputs, batch[0].version), **engine._generate_kwargs(batch[0].gen), streamer=streamer,
                                   stopping_criteria=engine._decode_on_threads(None, _RowsStop(batch)))  # as Engine: decode threads
            latency = time.perf_counter() - start
        width = inputs["input_ids"].shape[1]
        for row, req in enumerate(batch):
            ttft = (req.first_token_at - start) if req.first_token_at is not None else None
            req.result = engine._answer(out[row, width:], version=req.version, status="stopped" if req.stopped else "complete",
                                        prompt_tokens=int(inputs["attention_mask"][row].sum()), ttft_s=ttft, latency_s=latency,
                                        gen=req.gen, template=req.kwargs["template"])
