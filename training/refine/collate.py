"""Training text and tensors: one example becomes exactly what the engine is asked, plus the answer.

The prompt is the engine's own rendering (`Engine.encode_prompt`, generation prompt
on); the full text renders the same turn with the answer as an assistant message
(generation prompt off). The prompt must be a prefix of the full text and the rest
is the target, for SmolVLM `" answer<end_of_utterance>\\n"`. The stop token that closes
the assistant turn in the template (SmolVLM's `<end_of_utterance>`, Gemma's `<end_of_turn>`,
Llama's `<|eot_id|>`; the eos where the template has none, as llava-1.5's) is trained: it
is how the model learns to stop; whatever follows it is not (never generated). Tokens are the prompt's
tokens as the processor makes them at inference time (images expanded) followed by
the target's tokens, so training sees exactly the token sequence generation
continues from. Labels are -100 on the prompt (system text, context, question and
every image token) and on padding: the loss is on answer tokens only.

Supervision modes (the seed paper's three settings) decide which (question, answer)
turns an example contributes; see `supervised_turns`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from core.prompts import ChatTurn
from training.errors import TrainingError

IGNORE = -100
SUPERVISION = ("qa", "caption", "qa+caption")
CAPTION_QUESTION = "Describe the lesion in the image."  # the question of caption supervision
GOLD_SOURCES = ("expert", "accepted")  # store pairs: always trained as asked, whatever the mode


@dataclass(frozen=True)
class TrainTurn:
    """One supervised turn: what is asked and the answer to learn."""

    example_id: str
    images: tuple[str, ...]  # image files
    question: str
    answer: str
    context: dict | None
    template: str
    source: str  # expert | accepted | synthetic-qa | caption | phantom

    def key(self) -> tuple:
        """Identity for de-duplication: same images, question, context, template and answer."""
        ctx = tuple(sorted((self.context or {}).items()))
        return (self.images, self.question.strip().lower(), ctx, self.template, " ".join(self.answer.split()).lower())


def supervised_turns(examples: Sequence[Any], mode: str) -> list[TrainTurn]:
    """The turns `examples` (training.data.examples.Example) contribute under supervision `mode`.

    - qa: each example's question with its first answer;
    - caption: each example with a caption once per image set, asked `CAPTION_QUESTION`,
      answered with the caption (examples without a caption contribute nothing);
    - qa+caption: both.
    Gold pairs from the store (source expert / accepted) are always QA turns: they are
    what experts want the model to say to that question. Duplicates are dropped.
    """
    if mode not in SUPERVISION:
        raise TrainingError(f"unknown supervision mode {mode!r}; use one of {', '.join(SUPERVISION)}")
    out: list[TrainTurn] = []
    for ex in examples:
        images = tuple(str(p) for p in ex.images)
        gold = ex.source in GOLD_SOURCES
        if gold or mode in ("qa", "qa+caption"):
            out.append(TrainTurn(ex.id, images, ex.question, ex.answers[0], ex.context, ex.template, ex.source))
        if not gold and mode in ("caption", "qa+caption") and ex.caption:
            out.append(TrainTurn(f"{ex.id}:caption", images, CAPTION_QUESTION, ex.caption, ex.context, "free", ex.source))
    return dedupe(out)


def dedupe(turns: Sequence[TrainTurn]) -> list[TrainTurn]:
    seen: set[tuple] = set()
    out = []
    for t in turns:
        k = t.key()
        if k not in seen:
            seen.add(k)
            out.append(t)
    return out


def chat_turn(turn: TrainTurn, images: list, answer: str | None) -> ChatTurn:
    from core.prompts import ClinicalContext

    ctx = ClinicalContext.from_dict(turn.context) if turn.context else None
    return ChatTurn(turn.question, answer, list(images), ctx, turn.template)


def training_text(engine: Any, question_turn: ChatTurn, answer: str) -> tuple[str, str, list]:
    """(prompt, target, images): the engine's prompt, and the answer as the template renders it
    up to and including the stop token that closes the assistant turn.

    The closing marker is read from the template itself (`<end_of_utterance>` for SmolVLM,
    `<end_of_turn>` for Gemma 3, `<|eot_id|>` for Llama-3.2-Vision, `<|im_end|>` for Qwen):
    the first token of it that stops generation is trained, what follows it (a newline) is not.
    A template that closes the turn with no stop token at all (llava-1.5's ends it with a
    space) gets the tokenizer's eos appended, as the checkpoint was trained to stop with it.
    """
    prompt, images = engine.encode_prompt([question_turn], add_generation_prompt=True)
    with_answer = ChatTurn(question_turn.question, answer, question_turn.images, question_turn.context, question_turn.template)
    full, _ = engine.encode_prompt([with_answer], add_generation_prompt=False)
    body = answer.strip()
    start = full.rfind(body)
    if not body or start < 0:
        raise TrainingError("the model's chat template does not render the answer text as given; refine cannot find it")
    if full.startswith(prompt):
        rest, end = full[len(prompt):], start - len(prompt) + len(body)
    elif "".join(full[:start].split()) == "".join(prompt.split()):
        # LLaVA-OneVision's template opens a past assistant turn with "assistant \n" but the generation prompt
        # with "assistant\n": the same text but for whitespace. Train on what generation continues from.
        rest, end = full[start:], len(body)
    else:
        raise TrainingError(
            "the model's chat template renders the prompt differently with and without the answer; "
            "refine needs the prompt to be a prefix of the full conversation"
        )
    marker = rest[end:]
    stop = _first_stop_token(engine, marker)
    if stop is None:
        eos = engine.processor.tokenizer.eos_token
        if not eos:
            raise TrainingError("the chat template closes the assistant turn with no stop token and the tokenizer has no eos")
        return prompt, rest[:end] + eos, images
    return prompt, rest[:end] + marker[: marker.index(stop) + len(stop)], images


def stop_token_ids(engine: Any) -> set[int]:
    """The ids generation stops at: the generation config's eos (one or several) and the tokenizer's."""
    eos = getattr(getattr(engine.model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if engine.processor.tokenizer.eos_token_id is not None:
        ids.add(engine.processor.tokenizer.eos_token_id)
    return ids


def _first_stop_token(engine: Any, marker: str) -> str | None:
    tokenizer = engine.processor.tokenizer
    stops = stop_token_ids(engine)
    for tid in tokenizer(marker, add_special_tokens=False)["input_ids"]:
        if tid in stops:
            return tokenizer.convert_ids_to_tokens(tid)
    return None


@dataclass
class Features:
    """One encoded example: token ids, labels and the processor's image tensors (batch dim kept)."""

    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,)
    extra: dict[str, torch.Tensor]  # e.g. pixel_values (1, n_images, 3, H, W)

    @property
    def n_target(self) -> int:
        return int((self.labels != IGNORE).sum())


# Tensors with one entry per token (batch, length, ...): grown over the answer and padded with the text.
TOKEN_ALIGNED = ("token_type_ids", "mm_token_type_ids", "cross_attention_mask")
# Tensors with one entry per example (batch, images, ...): padded along the image axis. Everything else
# (llava and gemma pixel_values, Qwen's patches and image_grid_thw, image_sizes) lists the images of the
# whole batch one after another, and is concatenated.
PER_EXAMPLE = ("pixel_attention_mask", "aspect_ratio_ids", "aspect_ratio_mask")


def _per_example(key: str, t: torch.Tensor) -> bool:
    # pixel_values are (batch, images, ...) for SmolVLM (5-D) and Mllama (6-D, tiles), flat elsewhere
    return key in PER_EXAMPLE or (key == "pixel_values" and t.dim() >= 5)


def model_accepts(model: Any, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters


def encode(engine: Any, turn: TrainTurn, images: list) -> Features:
    """Tokenize one turn for training (images given already loaded, in order)."""
    prompt, target, imgs = training_text(engine, chat_turn(turn, images, None), turn.answer)
    processor = engine.processor
    kwargs: dict[str, Any] = {"text": [prompt], "return_tensors": "pt"}
    if imgs:
        kwargs["images"] = [imgs]
    inputs = processor(**kwargs)
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in inputs and not model_accepts(engine.model, key):
            inputs.pop(key)
    prompt_ids = inputs.pop("input_ids")[0]
    inputs.pop("attention_mask", None)
    target_ids = torch.tensor(processor.tokenizer(target, add_special_tokens=False)["input_ids"], dtype=torch.long)
    assert target_ids.numel() > 0
    input_ids = torch.cat([prompt_ids, target_ids])
    context = getattr(engine, "context_tokens", None)
    if context and input_ids.numel() > context:  # never cut: a cut drops the answer or splits an image's tokens
        raise TrainingError(f"example {turn.example_id} is {input_ids.numel()} tokens long with its images; "
                            f"the model reads at most {context}: shorten it or use fewer images")
    labels = torch.cat([torch.full_like(prompt_ids, IGNORE), target_ids])
    extra = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    n = target_ids.numel()
    for key in TOKEN_ALIGNED:
        if key in extra:
            t = extra[key]
            # answer tokens are text (type 0) and see every image the prompt's last token sees
            grow = t[:, -1:].expand(-1, n, *t.shape[2:]) if key == "cross_attention_mask" else torch.zeros((1, n, *t.shape[2:]), dtype=t.dtype)
            extra[key] = torch.cat([t, grow], dim=1)
    return Features(input_ids, labels, extra)


def _pad_to(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] >= size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, torch.zeros(shape, dtype=t.dtype)], dim=dim)


def collate(features: Sequence[Features], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked in labels and attention.

    Per-token tensors (token_type_ids, Mllama's cross_attention_mask) are padded with the
    text; per-example image tensors (SmolVLM's pixel_values and pixel_attention_mask,
    Mllama's pixel_values and aspect ratios) are padded along the image axis with all-zero
    images, which the pixel / aspect-ratio masks mark as absent; flat image tensors (LLaVA,
    Gemma 3, Qwen's patches and image_grid_thw) are concatenated.
    """
    width = max(f.input_ids.numel() for f in features)
    n = len(features)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, f in enumerate(features):
        L = f.input_ids.numel()
        input_ids[i, :L] = f.input_ids
        labels[i, :L] = f.labels
        attention[i, :L] = 1
    batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    keys = [k for k in features[0].extra]
    if any(set(f.extra) != set(keys) for f in features):
        # Never drop some examples' images silently: build_plan leaves text-only pairs out of training.
        with_images = sum(1 for f in features if f.extra)
        raise TrainingError(f"in a batch, every example needs at least one image, or none does "
                            f"({with_images} of {len(features)} have images)")
    for k in keys:
        ts = [f.extra[k] for f in features]
        if k in TOKEN_ALIGNED:
            if k == "cross_attention_mask":  # (1, L, images, tiles): pad images and tiles, then length
                most = max(t.shape[2] for t in ts)
                ts = [_pad_to(t, 2, most) for t in ts]
            batch[k] = torch.cat([_pad_to(t, 1, width) for t in ts], dim=0)
        elif _per_example(k, ts[0]):
            most = max(t.shape[1] for t in ts)
            batch[k] = torch.cat([_pad_to(t, 1, most) for t in ts], dim=0)
        else:
            batch[k] = torch.cat(ts, dim=0)
    return batch
