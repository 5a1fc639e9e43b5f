"""Training text and tensors: one example becomes exactly what the engine is asked, plus the answer.

The prompt is the engine's own rendering (`Engine.encode_prompt`, generation prompt
on); the full text renders the same turn with the answer as an assistant message
(generation prompt off). The prompt must be a prefix of the full text and the rest
is the target, for SmolVLM `" answer<end_of_utterance>\\n"`. The end-of-utterance
token is trained (it is how the model learns to stop); whitespace after it is not
(generation stops at the eos, so it is never produced). Tokens are the prompt's
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
    """(prompt, target, images): the engine's prompt and the remainder of the full text.

    The target keeps the eos and drops whitespace after it (never generated).
    """
    prompt, images = engine.encode_prompt([question_turn], add_generation_prompt=True)
    with_answer = ChatTurn(question_turn.question, answer, question_turn.images, question_turn.context, question_turn.template)
    full, _ = engine.encode_prompt([with_answer], add_generation_prompt=False)
    if not full.startswith(prompt):
        raise TrainingError(
            "the model's chat template renders the prompt differently with and without the answer; "
            "refine needs the prompt to be a prefix of the full conversation"
        )
    target = full[len(prompt):].rstrip()
    eos = engine.processor.tokenizer.eos_token
    if eos and not target.endswith(eos):
        raise TrainingError(f"the chat template does not end the assistant turn with the eos token {eos!r}")
    return prompt, target, images


@dataclass
class Features:
    """One encoded example: token ids, labels and the processor's image tensors (batch dim kept)."""

    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,)
    extra: dict[str, torch.Tensor]  # e.g. pixel_values (1, n_images, 3, H, W)

    @property
    def n_target(self) -> int:
        return int((self.labels != IGNORE).sum())


def encode(engine: Any, turn: TrainTurn, images: list) -> Features:
    """Tokenize one turn for training (images given already loaded, in order)."""
    prompt, target, imgs = training_text(engine, chat_turn(turn, images, None), turn.answer)
    processor = engine.processor
    kwargs: dict[str, Any] = {"text": [prompt], "return_tensors": "pt"}
    if imgs:
        kwargs["images"] = [imgs]
    inputs = processor(**kwargs)
    inputs.pop("token_type_ids", None)
    prompt_ids = inputs.pop("input_ids")[0]
    inputs.pop("attention_mask", None)
    target_ids = torch.tensor(processor.tokenizer(target, add_special_tokens=False)["input_ids"], dtype=torch.long)
    assert target_ids.numel() > 0
    input_ids = torch.cat([prompt_ids, target_ids])
    labels = torch.cat([torch.full_like(prompt_ids, IGNORE), target_ids])
    return Features(input_ids, labels, {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})


def collate(features: Sequence[Features], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked in labels and attention.

    Image tensors: SmolVLM-style processors give (1, n_images, ...) per example, padded
    here with all-zero images (which the model skips, and the pixel mask marks as
    absent); LLaVA-style ones give (n_images, ...) and are concatenated.
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
    if not keys:
        return batch
    per_batch = features[0].extra.get("pixel_values") is not None and features[0].extra["pixel_values"].dim() == 5
    for k in keys:
        ts = [f.extra[k] for f in features]
        if per_batch:
            most = max(t.shape[1] for t in ts)
            padded = []
            for t in ts:
                if t.shape[1] < most:
                    pad = torch.zeros((1, most - t.shape[1], *t.shape[2:]), dtype=t.dtype)
                    t = torch.cat([t, pad], dim=1)
                padded.append(t)
            batch[k] = torch.cat(padded, dim=0)
        else:
            batch[k] = torch.cat(ts, dim=0)
    return batch
