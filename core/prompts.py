"""Prompts: the clinical context, the question templates and chat messages.

The engine, the trainer and the evaluator all build the user turn here, so a
model is trained on exactly the text it is later asked with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from PIL import Image

from core.errors import InputError

MODALITIES = ("clinical", "dermoscopic", "histopathology")
# Longest text per context field: generous for a clinician, small enough that no field can hold the model.
FIELD_LIMITS = {"sex": 40, "body_site": 200, "duration": 200, "symptoms": 2000}
FITZPATRICK = ("I", "II", "III", "IV", "V", "VI")

SAFETY_INSTRUCTION = (
    "You are a dermatology assistant for clinicians, used for research only. Describe what is visible, "
    "give a differential rather than certainty, and advise prompt review by a clinician for red flags "
    "(rapid growth, bleeding, ulceration, irregular pigment, systemic symptoms)."
)

# Selectable by name. "<QUERY>" is the clinical context plus the clinician's text.
# The two mediqa_* templates are the prompts of the MEDIQA-MAGIC 2024 small-VLM paper.
TEMPLATES: dict[str, str] = {
    "free": "<QUERY>",
    "mediqa_disease_treatment": (
        "This is additional information about the dermatology issue on the image: <QUERY> "
        "What dermatological disease is on the image and how can it be treated?"
    ),
    "mediqa_two_questions": (
        "Patient wants to find out what dermatological disease he suffers from. Considering patient "
        "additional description: <QUERY> Answer two questions: 1. What dermatological disease is on "
        "the image? 2. How can it be treated?"
    ),
}
TEMPLATE_LABELS = {
    "free": "Free question",
    "mediqa_disease_treatment": "MEDIQA-MAGIC: disease and treatment",
    "mediqa_two_questions": "MEDIQA-MAGIC: two questions",
}


@dataclass(frozen=True)
class ClinicalContext:
    """What the clinician tells about the patient; every field optional."""

    age: int | None = None  # years
    sex: str | None = None  # female | male | other
    body_site: str | None = None  # e.g. "left forearm"
    duration: str | None = None  # e.g. "3 weeks"
    symptoms: str | None = None  # e.g. "itching, bleeding"
    fitzpatrick: str | None = None  # I..VI
    modality: str | None = None  # clinical | dermoscopic | histopathology

    def __post_init__(self) -> None:
        for name, limit in FIELD_LIMITS.items():
            value = getattr(self, name)
            if value is not None and len(value) > limit:
                raise InputError(f"{name.replace('_', ' ')} is {len(value)} characters long; the limit is {limit}")
        if self.age is not None and not (0 <= self.age <= 130):
            raise InputError(f"age must be between 0 and 130, not {self.age}")
        if self.fitzpatrick is not None and self.fitzpatrick not in FITZPATRICK:
            raise InputError(f"Fitzpatrick type must be one of {', '.join(FITZPATRICK)}, not {self.fitzpatrick!r}")
        if self.modality is not None and self.modality not in MODALITIES:
            raise InputError(f"modality must be one of {', '.join(MODALITIES)}, not {self.modality!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ClinicalContext":
        """Build from a dict (e.g. JSON from the API); empty values count as not given."""
        data = data or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown context field(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            if key == "age":
                try:
                    value = int(float(value))
                except (TypeError, ValueError, OverflowError):  # "old", "inf", "1e999"
                    raise InputError(f"age must be a number, not {value!r}") from None
            elif not isinstance(value, str):
                value = str(value)
            values[key] = value.strip() if isinstance(value, str) else value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def render(self) -> str:
        """One line, e.g. "Patient: 54-year-old female, Fitzpatrick III. Site: back. ..." ("" if empty)."""
        parts = []
        who = " ".join(p for p in (f"{self.age}-year-old" if self.age is not None else "", self.sex or "") if p)
        if self.fitzpatrick:
            who = f"{who}, Fitzpatrick skin type {self.fitzpatrick}" if who else f"Fitzpatrick skin type {self.fitzpatrick}"
        if who:
            parts.append(f"Patient: {who}.")
        for label, value in (("Site", self.body_site), ("Duration", self.duration), ("Symptoms", self.symptoms)):
            if value:
                parts.append(f"{label}: {value}.")
        if self.modality:
            parts.append(f"Image type: {self.modality}.")
        return " ".join(parts)


@dataclass
class ChatTurn:
    """One question (with the images given in it) and, for past turns, its answer."""

    question: str
    answer: str | None = None
    images: list[Image.Image] = field(default_factory=list)
    context: ClinicalContext | None = None  # usually given on the first turn only
    template: str = "free"


def check_question(question: str, max_chars: int) -> str:
    question = (question or "").strip()
    if not question:
        raise InputError("the question is empty")
    if len(question) > max_chars:
        raise InputError(f"the question is {len(question):,} characters long; at most {max_chars:,} are allowed")
    return question


def render_user_text(question: str, context: ClinicalContext | None = None, template: str = "free") -> str:
    if template not in TEMPLATES:
        raise InputError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    ctx = context.render() if context else ""
    query = f"{ctx}\n{question}".strip() if template == "free" else f"{ctx} {question}".strip()
    return TEMPLATES[template].replace("<QUERY>", query)


def build_messages(turns: Sequence[ChatTurn], *, system: bool = True) -> tuple[list[dict], list[Image.Image]]:
    """Chat-template messages for `turns` and the images in the order they appear.

    Images belong to the turn in which they were given; past turns carry their answers.
    The safety instruction is a system message where the template takes one (`system`),
    and otherwise opens the first user turn: Llama-3.2-Vision's template refuses a system
    message beside an image, and the instruction must not be lost there.
    """
    messages: list[dict] = []
    images: list[Image.Image] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": SAFETY_INSTRUCTION}]})
    for i, turn in enumerate(turns):
        text = render_user_text(turn.question, turn.context, turn.template)
        if not system and i == 0:
            text = f"{SAFETY_INSTRUCTION}\n\n{text}"
        content = [{"type": "image"} for _ in turn.images]
        content.append({"type": "text", "text": text})
        images.extend(turn.images)
        messages.append({"role": "user", "content": content})
        if turn.answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer}]})
    return messages, images
