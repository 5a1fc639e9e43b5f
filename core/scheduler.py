"""Dynamic batching: questions that arrive together are answered in one batched `generate`.

Clinicians asking at the same moment each get a handle that streams their own answer, can be
stopped on its own, and ends with their own `Answer`; decoding several rows per step reads the
weights once for all of them, so four answers cost little more than one. A request's greedy
answer is the one it gets alone (tests/test_scheduler.py).

The scheduler waits `window_s` after the first request for others, then takes up to
`max_batch` requests that can share a batch (same model version and generation settings, and
all with images or all without); the rest wait for the next round. A request alone goes
through `Engine.stream`, so a follow-up still reuses its conversation's cached keys/values;
a batch encodes its prompts in full (the prefix cache holds one conversation per cache).

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
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from core.config import GenerationSettings
from core.engine import Answer, Engine, Handle, _FirstToken, _restore_threads
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


class Scheduler:
    def __init__(self, engine: Engine, *, max_batch: int = 8, window_s: float = 0.05):
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self._queue: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.stats = SchedulerStats()
        self._worker = threading.Thread(target=self._loop, daemon=True, name="dermaloop-scheduler")
        self._worker.start()

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
            req.position = len(self._queue)
            self._queue.append(req)
            self._cond.notify()
        return req

    def estimated_wait_s(self, req: Request) -> float:
        """Seconds until `req` starts: the batches ahead of it times a recent batch's duration."""
        recent = self.stats.batch_seconds[-8:]
        per_batch = sorted(recent)[len(recent) // 2] if recent else 0.0
        return (req.position // self.max_batch) * per_batch

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
            start = time.perf_counter()
            try:
                self._run(batch)
            except BaseException as e:  # every request of the batch hears of it
                for req in batch:
                    req._exc = e
                    req.streamer.end()
            finally:
                for req in batch:
                    req._done.set()
            self.stats.batch_seconds = [*self.stats.batch_seconds[-7:], time.perf_counter() - start]

    def _take(self) -> list[Request]:
        """The oldest request and those after it that can share its batch; the others keep their order."""
        with self._cond:
            first = self._queue.popleft()
            batch, rest = [first], deque()
            while self._queue:
                req = self._queue.popleft()
                fits = (len(batch) < self.max_batch and req.version == first.version and req.gen == first.gen
                        and req.has_images == first.has_images and not req.stopped)
                (batch if fits else rest).append(req)
            self._queue = rest
            for i, req in enumerate(self._queue):
                req.position = i
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        return batch

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
        threads = engine._decode_threads()
        then = (lambda: torch.set_num_threads(threads)) if threads else None  # as Engine: decode on cpu_decode_threads
        with engine._lock, torch.inference_mode(), _restore_threads():
            engine._activate(batch[0].version)
            start = time.perf_counter()
            out = engine._generate(**inputs, **engine._generate_kwargs(batch[0].gen), streamer=streamer,
                                   stopping_criteria=StoppingCriteriaList([_FirstToken([], then), _RowsStop(batch)]))
            latency = time.perf_counter() - start
        width = inputs["input_ids"].shape[1]
        for row, req in enumerate(batch):
            ttft = (req.first_token_at - start) if req.first_token_at is not None else None
            req.result = engine._answer(out[row, width:], version=req.version, status="stopped" if req.stopped else "complete",
                                        prompt_tokens=int(inputs["attention_mask"][row].sum()), ttft_s=ttft, latency_s=latency,
                                        gen=req.gen, template=req.kwargs["template"])
