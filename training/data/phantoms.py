"""Lesion phantoms: procedurally drawn lesion-like images whose visible attributes determine a label.

    python -m training.synth phantoms --out DIR --n 240 --seed 0 --split train
    python -m training.synth phantoms --out DIR --n 60 --seed 0 --split heldout --kinds diagnosis

PHANTOMS ARE NOT MEDICAL IMAGES. They are coloured shapes on a skin-toned
background, drawn so that a model that looks at the image can tell the classes
apart and one that ignores it cannot. The class names borrow dermatological terms
only so that answers read like the real task; nothing learned from phantoms
carries clinical meaning.

Each class fixes a colour (the strongest cue, still clear after a downscale to
64x64), a shape, a border, a size range, a lesion count and a texture; every
image varies the skin tone (five Fitzpatrick-like tones), position, rotation,
jitter and noise. `generate(n, seed, split)` is deterministic: phantom i of a
(seed, split) is the same whatever n, its class is `CLASSES[i % len(CLASSES)]`
(balanced), and "train" and "heldout" draw from different random streams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SPLITS = ("train", "heldout")
PHANTOM_KINDS = ("diagnosis", "description", "next_step")


@dataclass(frozen=True)
class PhantomClass:
    name: str  # the label; diagnosis answers start with it
    synonyms: tuple[str, ...]  # also accepted by diagnosis accuracy
    colour: tuple[int, int, int]  # main lesion colour (RGB)
    colour_name: str
    shape: str  # round | oval | irregular | cluster
    border: str  # regular | irregular
    size: tuple[float, float]  # lesion radius as a fraction of the image side
    count: tuple[int, int]  # lesions per image (inclusive)
    texture: str  # uniform | variegated | scaly | crusted
    summary: str  # the one short sentence after the name in a diagnosis answer
    next_step: str

    @property
    def description(self) -> str:
        """Canonical description of the class."""
        return self.summary


CLASSES: tuple[PhantomClass, ...] = (
    PhantomClass(
        "common naevus", ("benign naevus", "benign nevus", "common nevus", "melanocytic naevus", "mole"),
        (92, 52, 26), "dark brown", "round", "regular", (0.10, 0.14), (1, 1), "uniform",
        "A small round uniformly brown lesion with a regular border.",
        "benign appearance, so reassure, and review if it changes in size, shape or colour.",
    ),
    PhantomClass(
        "melanoma", ("malignant melanoma",),
        (30, 22, 30), "black and blue-grey", "irregular", "irregular", (0.24, 0.31), (1, 1), "variegated",
        "A large asymmetric black and blue lesion with an irregular border.",
        "refer urgently to dermatology for dermoscopy and excision biopsy.",
    ),
    PhantomClass(
        "cherry angioma", ("cherry haemangioma", "cherry hemangioma", "campbell de morgan spot", "senile angioma"),
        (210, 18, 42), "bright red", "round", "regular", (0.06, 0.08), (3, 5), "uniform",
        "Several small round bright red papules with regular borders.",
        "benign, so no treatment is needed unless it bleeds or for cosmetic reasons.",
    ),
    PhantomClass(
        "psoriasis", ("plaque psoriasis", "psoriasis vulgaris"),
        (226, 104, 118), "salmon pink", "oval", "regular", (0.17, 0.23), (1, 2), "scaly",
        "Salmon pink oval plaques with silvery white scale.",
        "start a topical corticosteroid or vitamin D analogue and review in four weeks.",
    ),
    PhantomClass(
        "impetigo", ("impetigo contagiosa", "non-bullous impetigo"),
        (228, 172, 36), "honey yellow", "cluster", "irregular", (0.07, 0.10), (4, 6), "crusted",
        "Clustered honey yellow crusted erosions.",
        "gently remove the crusts, start a topical antibiotic and check close contacts.",
    ),
    PhantomClass(
        "blue naevus", ("blue nevus",),
        (48, 78, 156), "blue", "round", "regular", (0.10, 0.14), (1, 1), "uniform",
        "A small round uniformly blue lesion with a regular border.",
        "usually benign, so photograph it and review if it changes.",
    ),
)
BY_NAME = {c.name: c for c in CLASSES}

# Five Fitzpatrick-like background tones (a sixth, darker one would hide the brown class).
SKIN_TONES: dict[str, tuple[int, int, int]] = {
    "I": (246, 222, 204),
    "II": (234, 196, 166),
    "III": (214, 170, 130),
    "IV": (184, 134, 96),
    "V": (152, 106, 74),
}

QUESTIONS: dict[str, tuple[str, ...]] = {
    "diagnosis": ("What is the most likely diagnosis?", "What is this lesion?", "What is the diagnosis?"),
    "description": ("Describe the lesion.", "Describe the morphology of this lesion.", "What does the lesion look like?"),
    "next_step": ("What is the next step?", "How should this be managed?", "What should be done next?"),
}


@dataclass
class Phantom:
    index: int
    split: str
    seed: int
    cls: PhantomClass
    image: Image.Image
    attributes: dict = field(default_factory=dict)  # what was drawn: tone, count, size, position...

    @property
    def label(self) -> str:
        return self.cls.name

    @property
    def id(self) -> str:
        return f"phantom-{self.split}-s{self.seed}-{self.index:05d}"

    def description(self) -> str:
        a, c = self.attributes, self.cls
        count = "A single" if a["count"] == 1 else {2: "Two", 3: "Three", 4: "Four", 5: "Five", 6: "Six"}[a["count"]]
        noun = "lesion" if a["count"] == 1 else "lesions"
        texture = {"uniform": "uniformly coloured", "variegated": "variegated", "scaly": "scaly", "crusted": "crusted"}[c.texture]
        return (
            f"{count} {a['size']} {c.shape if c.shape != 'cluster' else 'clustered'} {texture} {c.colour_name} {noun} "
            f"with {'a regular' if c.border == 'regular' else 'an irregular'} border on Fitzpatrick-like type {a['tone']} skin."
        )

    def caption(self) -> str:
        return f"Synthetic lesion phantom (not a medical image): {self.description()}"

    def qa(self, kinds: Sequence[str] = PHANTOM_KINDS) -> list[tuple[str, str, str]]:
        """(kind, question, answer) for each kind; the question wording varies by phantom."""
        answers = {
            "diagnosis": f"Most likely {self.cls.name}. {self.cls.summary}",
            "description": self.description(),
            "next_step": f"Next step for {self.cls.name}: {self.cls.next_step}",
        }
        out = []
        for k in kinds:
            if k not in answers:
                raise ValueError(f"unknown phantom kind {k!r}; one of {', '.join(PHANTOM_KINDS)}")
            variants = QUESTIONS[k]
            out.append((k, variants[(self.index // len(CLASSES)) % len(variants)], answers[k]))
        return out


def generate(n: int, seed: int = 0, split: str = "train", *, size: int = 128) -> list[Phantom]:
    """`n` phantoms of `split`; balanced over CLASSES; deterministic per (seed, split, index)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    return [draw(i, seed, split, size=size) for i in range(n)]


def draw(index: int, seed: int = 0, split: str = "train", *, size: int = 128) -> Phantom:
    rng = np.random.default_rng([seed, SPLITS.index(split), index, 7919])
    cls = CLASSES[index % len(CLASSES)]
    tone = list(SKIN_TONES)[int(rng.integers(len(SKIN_TONES)))]
    skin = np.array(SKIN_TONES[tone], float) + rng.normal(0, 5, 3)
    # Background: the tone, a gentle lighting gradient and fine noise.
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    shade = 1 + 0.06 * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle))
    img = skin[None, None, :] * shade[..., None] + rng.normal(0, 3, (size, size, 3))
    count = int(rng.integers(cls.count[0], cls.count[1] + 1))
    colour = np.array(cls.colour, float) + rng.normal(0, 6, 3)
    centres = _centres(rng, count, cls)
    radii = []
    for cx, cy in centres:
        r = rng.uniform(*cls.size)
        radii.append(r)
        mask = _lesion_mask(rng, cls, cx * size, cy * size, r * size, size)
        img = img * (1 - mask[..., None]) + _texture(rng, cls, colour, size)[..., :] * mask[..., None]
    mean_r = float(np.mean(radii))
    size_word = "small" if mean_r < 0.15 else ("medium" if mean_r < 0.21 else "large")
    pixels = np.clip(np.round(img), 0, 255).astype(np.uint8)
    attrs = {"tone": tone, "count": count, "size": size_word, "radius": round(mean_r, 3),
             "centres": [(round(x, 3), round(y, 3)) for x, y in centres]}
    return Phantom(index, split, seed, cls, Image.fromarray(pixels, "RGB"), attrs)


def _centres(rng: np.random.Generator, count: int, cls: PhantomClass) -> list[tuple[float, float]]:
    if count == 1:
        return [tuple(rng.uniform(0.4, 0.6, 2))]
    spread = 0.17 if cls.shape == "cluster" else 0.28
    centre = rng.uniform(0.45, 0.55, 2)
    pts: list[tuple[float, float]] = []
    for _ in range(200):  # rejection sampling: lesions may touch but not sit on top of each other
        p = np.clip(centre + rng.uniform(-spread, spread, 2), 0.15, 0.85)
        if all(math.dist(p, q) > cls.size[1] * 1.6 for q in pts):
            pts.append((float(p[0]), float(p[1])))
        if len(pts) == count:
            break
    while len(pts) < count:
        pts.append(tuple(float(v) for v in rng.uniform(0.2, 0.8, 2)))
    return pts


def _lesion_mask(rng: np.random.Generator, cls: PhantomClass, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Soft mask in [0, 1] of one lesion, drawn at 4x and downsampled (anti-aliased)."""
    ss = 4
    theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    rot = rng.uniform(0, np.pi)
    if cls.shape == "oval":
        ratio = rng.uniform(0.55, 0.7)
        a, b = r, r * ratio
        rad = a * b / np.sqrt((b * np.cos(theta - rot)) ** 2 + (a * np.sin(theta - rot)) ** 2)
    else:
        rad = np.full_like(theta, r * rng.uniform(0.92, 1.0))
    if cls.border == "irregular":
        for k in (2, 3, 5, 7):
            rad = rad * (1 + rng.uniform(0.05, 0.13) * np.sin(k * theta + rng.uniform(0, 2 * np.pi)))
    pts = [(float((cx + rr * np.cos(t)) * ss), float((cy + rr * np.sin(t)) * ss)) for rr, t in zip(rad, theta)]
    big = Image.new("L", (size * ss, size * ss), 0)
    ImageDraw.Draw(big).polygon(pts, fill=255)
    mask = big.resize((size, size), Image.Resampling.BOX)
    if cls.border == "irregular":
        mask = mask.filter(ImageFilter.GaussianBlur(0.8))
    return np.asarray(mask, float) / 255.0


def _texture(rng: np.random.Generator, cls: PhantomClass, colour: np.ndarray, size: int) -> np.ndarray:
    """Lesion colour field (size x size x 3) with the class texture."""
    field_ = np.broadcast_to(colour, (size, size, 3)).copy() + rng.normal(0, 4, (size, size, 3))
    if cls.texture == "variegated":  # blue-grey and dark brown blotches
        for col in ((70, 82, 128), (64, 38, 24)):
            blob = _blobs(rng, size, n=3, scale=0.08)
            field_ = field_ * (1 - blob[..., None]) + np.array(col, float) * blob[..., None]
    elif cls.texture == "scaly":  # silvery white scale flecks
        flecks = (rng.random((size, size)) < 0.05).astype(float)
        flecks = np.asarray(Image.fromarray((flecks * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(3)), float) / 255
        field_ = field_ * (1 - 0.7 * flecks[..., None]) + np.array((242, 240, 236), float) * 0.7 * flecks[..., None]
    elif cls.texture == "crusted":  # darker crust specks
        specks = (rng.random((size, size)) < 0.12).astype(float)
        field_ = field_ * (1 - 0.6 * specks[..., None]) + np.array((160, 104, 20), float) * 0.6 * specks[..., None]
    return field_


def _blobs(rng: np.random.Generator, size: int, n: int, scale: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((size, size))
    for _ in range(n):
        cx, cy = rng.uniform(0.3, 0.7, 2)
        out = np.maximum(out, np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * scale**2)))
    return np.clip(out * 1.2, 0, 1)


def to_examples(phantom: Phantom, image_path: str | Path, kinds: Sequence[str] = PHANTOM_KINDS) -> list:
    """The training.data.examples Examples of one phantom whose image was saved at `image_path`."""
    from training.data.examples import Example

    return [
        Example(
            id=f"{phantom.id}-{kind}", images=[str(image_path)], question=q, answers=[a], caption=phantom.caption(),
            label=phantom.label, context=None, source="phantom", template="free", kind=kind,
        )
        for kind, q, a in phantom.qa(kinds)
    ]


def write_phantoms(
    out_dir: str | Path, n: int, seed: int = 0, split: str = "train", *, kinds: Sequence[str] = PHANTOM_KINDS,
    size: int = 128, progress: bool = False,
) -> Path:
    """Save n phantom PNGs under out_dir/images/ and their Examples as out_dir/<split>.jsonl; return the JSONL path."""
    from tqdm.auto import tqdm

    from training.data.examples import write_jsonl

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    examples = []
    for i in tqdm(range(n), desc=f"phantoms ({split})", disable=not progress):
        ph = draw(i, seed, split, size=size)
        path = out / "images" / f"{ph.id}.png"
        ph.image.save(path)
        examples.extend(to_examples(ph, path, kinds))
    jsonl = out / f"{split}.jsonl"
    write_jsonl(examples, jsonl)
    return jsonl


def synonyms() -> dict[str, list[str]]:
    """Label -> accepted names, for diagnosis accuracy."""
    return {c.name: list(c.synonyms) for c in CLASSES}
