"""The inference engine: the one place a question becomes an answer.

The app, the evaluator, the refine gate and the benchmarks all call `Engine`. It
knows nothing of users, storage or the UI: it takes images, a question, the
clinical context, earlier turns, a template and generation settings, and returns
text. It keeps one base model in memory and any number of LoRA adapters, each
under a version name; every call picks its version under the generation lock, so
swapping the default version never disturbs an answer that is streaming.

    engine = Engine.from_settings(Settings.from_env())
    for chunk in (gen := engine.stream([image], "What is this lesion?")):
        print(chunk, end="")
    print(gen.result.version, gen.result.latency_s)
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from peft.utils import ModulesToSaveWrapper
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from core.config import GenerationSettings, Settings
from core.decode import tune_for_cpu, uncompile_decode
from core.errors import InputError, ModelLoadError
from core.features import FEATURE_FAMILIES, FeatureCache
from core.kv_cache import IMAGE_AXIS, ConversationCache, Reuse, fingerprint, processor_signature, slice_pixels
from core.models import LoadedModel, context_length, load_model
from core.prompts import SAFETY_INSTRUCTION, ChatTurn, ClinicalContext, build_messages, check_question

BASE_VERSION = "base"


@dataclass
class Answer:
    text: str
    version: str  # the model version that produced it
    status: str  # complete | stopped | error
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None  # time to first token, from the start of generation
    latency_s: float  # whole generation
    generation: dict[str, Any] = field(default_factory=dict)  # the GenerationSettings used
    template: str = "free"
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _StopOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _FirstToken(StoppingCriteria):
    """Records when the first new token exists (time to first token), then calls `then` (if any); never stops."""

    def __init__(self, first: list[float], then: Callable[[], None] | None = None):
        self.first, self.then = first, then

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        if not self.first:
            self.first.append(time.perf_counter())
            if self.then is not None:
                self.then()
        return torch.zeros((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def _restore_threads() -> Iterator[None]:
    """Torch's thread count afterwards as before (entered with the generation lock held)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@dataclass(frozen=True)
class _Conv:
    """A request's conversation: its cache key, its images' fingerprints in order, the image settings."""

    key: str
    images: tuple[str, ...]
    signature: str


class Handle:
    """An answer under way: iterate for text chunks, `stop()` to cancel, `result` (an Answer) when done.
    Subclasses set `streamer` and say in `_finished()` how to wait for the end of the work."""

    streamer: Any
    result: Answer | None
    _stop: threading.Event
    _exc: BaseException | None

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _finished(self) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        for chunk in self.streamer:
            if chunk:
                yield chunk
        self._finished()
        if self._exc is not None:
            raise self._exc

    def wait(self) -> Answer:
        for _ in self:
            pass
        assert self.result is not None
        return self.result


class Generation(Handle):
    """One answer generated on its own thread (see `Handle`)."""

    def __init__(self, run: Callable[["Generation"], None], streamer: TextIteratorStreamer):
        self.streamer = streamer
        self._stop = threading.Event()
        self.result: Answer | None = None
        self._exc: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(run,), daemon=True)
        self._thread.start()

    def _run(self, run: Callable[["Generation"], None]) -> None:
        try:
            run(self)
        except BaseException as e:  # surfaced to the consumer in __iter__
            self._exc = e
            self.streamer.end()

    def _finished(self) -> None:
        self._thread.join()


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        settings: Settings | None = None,
        *,
        version: str = BASE_VERSION,
        generate_fn: Callable[..., Any] | None = None,
    ):
        self.model = loaded.model
        self.processor = loaded.processor
        self.info = loaded.info
        self.settings = settings or Settings()
        self._lock = threading.Lock()  # one generation at a time: no interleaved output, no double memory
        self._versions: dict[str, str | None] = {version: None}  # name -> adapter dir (None = bare base)
        self.default_version = version
        # ZeroGPU wraps generation in spaces.GPU; everyone else calls model.generate.
        self._generate = generate_fn or self.model.generate
        self.supports_system = self._template_supports_system()
        self.context_tokens = context_length(self.model.config)  # the longest sequence the model reads
        self._takes_token_types = "token_type_ids" in inspect.signature(self.model.forward).parameters
        # Follow-ups of a conversation reuse its keys/values (core/kv_cache.py); families not listed there encode in full.
        self.kv_cache = ConversationCache(self.settings.kv_cache_mb * 2**20)
        self.kv_cache_supported = self.info.model_type in IMAGE_AXIS
        # Each image goes through the vision tower once, by content (core/features.py).
        self.features = FeatureCache(self.settings.feature_cache_mb * 2**20)
        self.features_supported = self.info.model_type in FEATURE_FAMILIES
        self._vision_adapters: set[str] = set()  # adapters that change the vision tower or connector (own features)
        self._tuned = False  # the CPU decode mode applied to the layers loaded now (core/decode.py)
        self._warm: set[str] = set()  # versions whose decode step `warm_up` compiled

    @classmethod
    def from_settings(cls, settings: Settings, *, adapter: str | Path | None = None, adapter_version: str = "adapter") -> "Engine":
        """Load `settings.model` (and optionally one adapter, made the default); with `backend: openai`, a
        `core.openai_backend.RemoteEngine` that asks the server at `settings.endpoint` instead."""
        if settings.backend == "openai":
            from core.openai_backend import RemoteEngine

            remote = RemoteEngine(settings)
            if adapter is not None:
                remote.add_adapter(adapter_version, adapter)
                remote.use(adapter_version)
            return remote  # type: ignore[return-value]  # the same interface
        loaded = load_model(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            image_splitting=settings.image_splitting,
            longest_edge=settings.longest_edge,
            trust_remote_code=settings.trust_remote_code,
            quantize=settings.quantize,
            device_map=settings.device_map,
        )
        engine = cls(loaded, settings)
        if adapter is not None:
            engine.add_adapter(adapter_version, adapter)
            engine.use(adapter_version)
        return engine

    # -- versions ---------------------------------------------------------
    @property
    def versions(self) -> dict[str, str | None]:
        return dict(self._versions)

    def add_base_version(self, name: str) -> None:
        """Another name for the bare base (e.g. the store's "v1" when it has no adapter)."""
        self._versions[name] = None

    def add_adapter(self, name: str, adapter_dir: str | Path) -> None:
        """Load a peft LoRA adapter under `name` without reloading the base."""
        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").exists():
            raise ModelLoadError(f"adapter not found: {adapter_dir} has no adapter_config.json")
        if name in self._versions:
            if self._versions[name] == str(adapter_dir):
                return
            raise InputError(f"version {name!r} is already loaded from another place")
        with self._lock:
            uncompile_decode(self.model)  # peft copies modules as they are; `_activate` compiles again
            self._tuned = False
            self._warm.clear()  # new layers in every version's path: each compiles again
            try:
                self.model.load_adapter(str(adapter_dir), adapter_name=name, hotswap=False)
            except (OSError, ValueError, RuntimeError) as e:
                raise ModelLoadError(f"could not load adapter {adapter_dir}: {str(e).splitlines()[0]}") from None
            self._versions[name] = str(adapter_dir)
            if any(f".{name}." in n and ("vision" in n or "connector" in n) for n, _ in self.model.named_parameters()):
                self._vision_adapters.add(name)
            self._activate(self.default_version)

    def remove_adapter(self, name: str) -> None:
        if self._versions.get(name) is None:
            raise InputError(f"{name!r} is not a loaded adapter")
        if name == self.default_version:
            raise InputError(f"{name!r} is the default version; use another one first")
        with self._lock:
            self.model.delete_adapter(name)
            del self._versions[name]
            uncompile_decode(self.model)  # the graphs traced the deleted layers: dropped, compiled again on use
            self._tuned = False
            self._warm.clear()
            self.kv_cache.drop_version(name)
            self.features.drop_weights(name)
            self._vision_adapters.discard(name)

    def use(self, name: str) -> None:
        """Make `name` the version used when a call names none."""
        if name not in self._versions:
            raise InputError(f"version {name!r} is not loaded; loaded: {', '.join(self._versions)}")
        self.default_version = name

    def _activate(self, name: str) -> None:
        """Point the model at `name` (called with the lock held)."""
        if not self._tuned:  # at the first answer, and after adapters change the layers (core/decode.py)
            tune_for_cpu(self.model, self.settings.cpu_decode)
            self._tuned = True
        adapter = self._versions[name]
        if not getattr(self.model, "_hf_peft_config_loaded", False):
            assert adapter is None
            return
        if adapter is None:
            self.model.disable_adapters()
        else:
            self.model.enable_adapters()
            self.model.set_adapter(name)
            # transformers' enable_adapters() leaves peft's modules_to_save copies (e.g. a fully
            # trained lm_head) switched off after disable_adapters(); switch them back on.
            for module in self.model.modules():
                if isinstance(module, ModulesToSaveWrapper):
                    module.enable_adapters(True)

    # -- answering --------------------------------------------------------
    def stream(
        self,
        images: Sequence[Image.Image],
        question: str,
        *,
        context: ClinicalContext | None = None,
        history: Sequence[ChatTurn] = (),
        template: str = "free",
        generation: GenerationSettings | None = None,
        version: str | None = None,
        conversation: str | None = None,
    ) -> Generation:
        """Start answering; iterate the returned `Generation` for text chunks.

        `conversation` names the conversation (any stable key, e.g. the case's id): its follow-ups then
        reuse the keys/values computed for the earlier turns (the same tokens, much sooner)."""
        gen = generation or self.settings.generation()
        version = version or self.default_version
        inputs = self._prepare(images, question, context, history, template, version)
        conv = self._conversation(conversation, history, images)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)

        def run(handle: Generation) -> None:
            handle.result = self._generate_one(inputs, gen, version, template, streamer=streamer, stop=handle._stop, conv=conv)

        return Generation(run, streamer)

    def answer(
        self,
        images: Sequence[Image.Image],
        question: str,
        *,
        context: ClinicalContext | None = None,
        history: Sequence[ChatTurn] = (),
        template: str = "free",
        generation: GenerationSettings | None = None,
        version: str | None = None,
        conversation: str | None = None,
    ) -> Answer:
        """The whole answer at once: the same text as `stream`, without its worker thread."""
        gen = generation or self.settings.generation()
        version = version or self.default_version
        inputs = self._prepare(images, question, context, history, template, version)
        return self._generate_one(inputs, gen, version, template, conv=self._conversation(conversation, history, images))

    def prepare(self, images: Sequence[Image.Image], *, version: str | None = None) -> int:
        """Encode `images` now (the app calls this on upload, while the clinician types), so questions about
        them skip the vision tower; returns how many went through it (0: cached already, or a family without
        the feature cache). Without adapters that change the vision tower, this runs beside an answer under
        way (decoding leaves a core idle on CPU); with one, it waits for the generation lock."""
        if not (self.features_supported and self.features.budget_bytes and images):
            return 0
        version = version or self.default_version
        if version not in self._versions:
            raise InputError(f"version {version!r} is not loaded")
        inputs = self._encode([[ChatTurn("Describe the image.", None, list(images))]])
        before = self.features.stats.encoded
        with (self._lock if self._vision_adapters else contextlib.nullcontext()), torch.inference_mode():
            if self._vision_adapters:
                self._activate(version)
            self._model_inputs(inputs, version)
        return self.features.stats.encoded - before

    def warm_up(self) -> None:
        """With `cpu_decode: compiled` on CPU, compile the decode step now, alone and batched, for the default
        version (minutes on 2 cores; the app does it in the background at start), so no answer pays for it."""
        version = self.default_version
        if self.settings.cpu_decode != "compiled" or self.model.device.type != "cpu" or version in self._warm:
            return
        self._warm.add(version)
        logging.getLogger("dermaloop.core").info("compiling the decode step of %s (cpu_decode compiled); questions asked "
                                                 "meanwhile wait for it", version)
        kwargs = {**self._generate_kwargs(GenerationSettings(max_new_tokens=3)), "min_new_tokens": 3}  # a decode step, at least
        image = Image.new("RGB", (64, 64), (200, 160, 140))  # with an image, as questions come: some families decode otherwise
        questions = ["Hello.", "What is this lesion, and is it benign?"]  # unequal: a batch with padding, as real ones have
        for rows in (1, 2):
            inputs = self._encode([[ChatTurn(q, None, [image])] for q in questions[:rows]])
            with self._lock, torch.inference_mode(), _restore_threads():  # threads as answers use them (a compile each)
                self._activate(version)
                self._generate(**self._model_inputs(inputs, version), **kwargs, stopping_criteria=self._decode_on_threads())

    def _model_inputs(self, inputs: dict[str, Any], version: str, skip_rows: int = 0) -> dict[str, Any]:
        """What generate receives: the pixels replaced by the images' cached features where the family allows,
        less the first `skip_rows` image rows (a cached conversation prefix holds them)."""
        images = inputs.get("_images")
        inputs = {k: v for k, v in inputs.items() if k != "_images"}
        if "pixel_values" in inputs and images is not None and self.features_supported and self.features.budget_bytes:
            prints = [[fingerprint(im) for im in sample] for sample in images]
            weights = version if version in self._vision_adapters else BASE_VERSION
            out = self.features.substitute(self.model, self.processor.image_processor, inputs, images, prints, weights=weights,
                                           signature=processor_signature(self.processor), skip_rows=skip_rows)
            if out is not None:
                return out
        return slice_pixels(inputs, IMAGE_AXIS[self.info.model_type], skip_rows) if skip_rows else inputs

    def _conversation(self, key: str | None, history: Sequence[ChatTurn], images: Sequence[Image.Image]) -> _Conv | None:
        if key is None or not self.kv_cache_supported or self.kv_cache.budget_bytes == 0:
            return None
        prints = tuple(fingerprint(im) for turn in history for im in turn.images) + tuple(fingerprint(im) for im in images)
        return _Conv(str(key), prints, processor_signature(self.processor))

    def _prepare(self, images, question, context, history, template, version) -> dict[str, torch.Tensor]:
        if version not in self._versions:
            raise InputError(f"version {version!r} is not loaded")
        turn = ChatTurn(check_question(question, self.settings.max_question_chars), None, list(images), context, template)
        if len(turn.images) > self.settings.max_images:
            raise InputError(f"{len(turn.images)} images given; at most {self.settings.max_images} per question")
        return self._encode([[*history, turn]])

    def _generate_one(
        self,
        inputs: dict[str, torch.Tensor],
        gen: GenerationSettings,
        version: str,
        template: str,
        *,
        streamer: TextIteratorStreamer | None = None,
        stop: threading.Event | None = None,
        conv: _Conv | None = None,
    ) -> Answer:
        first: list[float] = []
        criteria = self._decode_on_threads(first, *([_StopOnEvent(stop)] if stop else []))
        prompt_tokens = int(inputs["input_ids"].shape[1])
        with self._lock, torch.inference_mode(), _restore_threads():
            self._activate(version)
            start = time.perf_counter()
            extra, skip = {}, 0
            if conv is not None:
                reuse = self._take(conv, inputs, version)
                extra = {"return_dict_in_generate": True}
                if reuse.cache is not None:
                    extra["past_key_values"], skip = reuse.cache, reuse.rows
            run_inputs = self._model_inputs(inputs, version, skip)
            out = self._generate(**run_inputs, **self._generate_kwargs(gen), **extra, streamer=streamer, stopping_criteria=criteria)
            latency = time.perf_counter() - start
            if conv is not None:
                self.kv_cache.put(conv.key, version, out.sequences[0], conv.images, conv.signature, out.past_key_values)
                out = out.sequences
        stopped = stop is not None and stop.is_set()
        return self._answer(out[0, prompt_tokens:], version=version, status="stopped" if stopped else "complete",
                            prompt_tokens=prompt_tokens, ttft_s=(first[0] - start) if first else None,
                            latency_s=latency, gen=gen, template=template)

    def _answer(self, new: torch.Tensor, *, version: str, status: str, prompt_tokens: int, ttft_s: float | None,
                latency_s: float, gen: GenerationSettings, template: str) -> Answer:
        """An Answer from the generated token ids (the one place one is built)."""
        return Answer(text=self._decode(new), version=version, status=status, prompt_tokens=prompt_tokens,
                      completion_tokens=int((new != self.processor.tokenizer.pad_token_id).sum()), ttft_s=ttft_s,
                      latency_s=latency_s, generation=gen.to_dict(), template=template)

    def answer_batch(
        self,
        requests: Sequence[ChatTurn],
        *,
        generation: GenerationSettings | None = None,
        version: str | None = None,
        batch_size: int = 8,
    ) -> list[Answer]:
        """Answer many single-turn requests (ChatTurns without answers) in padded batches."""
        gen = generation or self.settings.generation()
        version = version or self.default_version
        answers: list[Answer] = []
        for i in range(0, len(requests), batch_size):
            chunk = requests[i : i + batch_size]
            inputs = self._encode([[r] for r in chunk])
            with self._lock, torch.inference_mode(), _restore_threads():
                self._activate(version)
                start = time.perf_counter()
                out = self._generate(**self._model_inputs(inputs, version), **self._generate_kwargs(gen),
                                     stopping_criteria=self._decode_on_threads())
                latency = time.perf_counter() - start
            width = inputs["input_ids"].shape[1]
            answers += [
                self._answer(out[row, width:], version=version, status="complete", ttft_s=None,
                             prompt_tokens=int(inputs["attention_mask"][row].sum()), latency_s=latency / len(chunk),
                             gen=gen, template=req.template)
                for row, req in enumerate(chunk)
            ]
        return answers

    # -- internals --------------------------------------------------------
    def _take(self, conv: _Conv, inputs: dict[str, torch.Tensor], version: str) -> Reuse:
        """What of the conversation's cached keys/values this prompt reuses (called with the lock held)."""
        pixels = inputs.get("pixel_values")
        rows = int(pixels.shape[IMAGE_AXIS[self.info.model_type]]) if pixels is not None else 0
        return self.kv_cache.take(conv.key, version, inputs["input_ids"][0], conv.images, conv.signature, rows_total=rows,
                                  image_token_id=getattr(self.model.config, "image_token_id", None))

    def encode_prompt(self, turns: Sequence[ChatTurn], *, add_generation_prompt: bool = True) -> tuple[str, list[Image.Image]]:
        """The chat-template text and images for `turns` (the trainer uses this too)."""
        messages, images = build_messages(turns, system=self.supports_system)
        text = self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        return text, images

    def _encode(self, conversations: Sequence[Sequence[ChatTurn]]) -> dict[str, torch.Tensor]:
        texts, images = [], []
        for turns in conversations:
            text, imgs = self.encode_prompt(turns)
            texts.append(text)
            images.append(imgs)
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if any(images):
            if not all(images):
                raise InputError("in a batch, every request needs at least one image, or none does")
            kwargs["images"] = images
        inputs = self.processor(**kwargs)
        if not self._takes_token_types:  # Gemma 3 uses them (image tokens attend both ways); others reject them
            inputs.pop("token_type_ids", None)
        n_tokens = inputs["input_ids"].shape[1]
        limit = min(self.settings.max_prompt_tokens, self.context_tokens or self.settings.max_prompt_tokens)
        if n_tokens > limit:
            # never cut: a cut prompt drops the question or splits an image's tokens
            raise InputError(f"the conversation is {n_tokens} tokens long with its images; the limit is "
                             f"{limit}: start a new case, or use fewer images")
        device, dtype = self.model.device, self.model.dtype
        out: dict[str, Any] = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        out["_images"] = images  # per prompt, in order: the feature cache's keys (`_model_inputs` takes them out)
        return out

    def _decode_on_threads(self, first: list[float] | None = None, *more: StoppingCriteria) -> StoppingCriteriaList:
        """Criteria that switch decoding to `cpu_decode_threads` once the prompt is encoded (bench.engine (c)
        says why; call inside `_restore_threads`), record the first token's time in `first`, then `more`."""
        threads = self._decode_threads()
        then = (lambda: torch.set_num_threads(threads)) if threads else None
        return StoppingCriteriaList([_FirstToken([] if first is None else first, then), *more])

    def _decode_threads(self) -> int:
        """Threads for the decode phase on CPU (0: leave torch's setting)."""
        wanted = self.settings.cpu_decode_threads
        return wanted if wanted and self.model.device.type == "cpu" and wanted < torch.get_num_threads() else 0

    def _generate_kwargs(self, gen: GenerationSettings) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": gen.max_new_tokens,
            "do_sample": gen.do_sample,
            "repetition_penalty": gen.repetition_penalty,
            "pad_token_id": self.processor.tokenizer.pad_token_id,
        }
        if gen.do_sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
        else:  # silence the model's own sampling defaults
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def _decode(self, ids: torch.Tensor) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _template_supports_system(self) -> bool:
        """Whether the template renders a system message as given, next to an image (Llama-3.2-Vision refuses
        that, and templates that trim a list content print its repr: both get the instruction folded in)."""
        messages = [
            {"role": "system", "content": [{"type": "text", "text": SAFETY_INSTRUCTION}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
        ]
        try:
            text = self.processor.apply_chat_template(messages, tokenize=False)
        except Exception:  # templates that refuse a system role raise their own errors
            return False
        return SAFETY_INSTRUCTION in text and "'type'" not in text
