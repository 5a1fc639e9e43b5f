"""Lesion phantoms: deterministic, balanced, disjoint splits, and labels recoverable from the pixels."""

from __future__ import annotations

import hashlib
import re

import numpy as np
from PIL import Image

from training.data import phantoms
from training.data.examples import read_jsonl
from training.data.synth import main as synth_main


def _digest(img: Image.Image) -> str:
    return hashlib.sha256(img.tobytes()).hexdigest()


def test_classes_are_distinct_and_named_unambiguously():
    assert len(phantoms.CLASSES) >= 6
    names = [c.name for c in phantoms.CLASSES]
    assert len(set(names)) == len(names)
    for c in phantoms.CLASSES:
        assert c.summary and c.next_step and c.synonyms
        for other in phantoms.CLASSES:
            if other is c:
                continue
            for n in (c.name, *c.synonyms):  # no name of one class names another one
                text = " ".join((other.name, *other.synonyms))
                assert not re.search(rf"(?<!\w){re.escape(n)}(?!\w)", text), (n, other.name)


def test_deterministic_and_balanced():
    a = phantoms.generate(12, seed=3)
    b = phantoms.generate(12, seed=3)
    assert [_digest(p.image) for p in a] == [_digest(p.image) for p in b]
    assert [_digest(p.image) for p in phantoms.generate(5, seed=3)] == [_digest(p.image) for p in a[:5]]  # prefix-stable
    assert [p.label for p in a] == [c.name for c in phantoms.CLASSES] * 2
    assert _digest(phantoms.generate(1, seed=4)[0].image) != _digest(a[0].image)
    kinds = [k for k, _, _ in a[0].qa()]
    assert kinds == ["diagnosis", "description", "next_step"]
    diagnosis = a[0].qa(["diagnosis"])[0][2]
    assert diagnosis.startswith(f"Most likely {a[0].label}.") and len(diagnosis.split()) < 20


def test_splits_are_disjoint():
    train = {_digest(p.image) for p in phantoms.generate(60, seed=0, split="train")}
    heldout = {_digest(p.image) for p in phantoms.generate(60, seed=0, split="heldout")}
    assert len(train) == 60 and len(heldout) == 60
    assert not train & heldout


def _lesion_colour(img: Image.Image) -> np.ndarray:
    """A simple pixel rule: the mean colour of the pixels that differ from the border (the skin)."""
    a = np.asarray(img.resize((64, 64), Image.Resampling.BICUBIC), float)
    border = np.concatenate([a[:3].reshape(-1, 3), a[-3:].reshape(-1, 3), a[:, :3].reshape(-1, 3), a[:, -3:].reshape(-1, 3)])
    skin = np.median(border, axis=0)
    mask = np.linalg.norm(a - skin, axis=2) > 40
    return a[mask].mean(axis=0) if mask.any() else skin


def test_labels_are_recoverable_from_pixels_at_64px():
    """Nearest-centroid on the lesion's mean colour after a downscale to 64x64 (the tiny model's input)."""
    train = phantoms.generate(60, seed=0, split="train")
    centroids = {c.name: np.mean([_lesion_colour(p.image) for p in train if p.label == c.name], axis=0) for c in phantoms.CLASSES}
    heldout = phantoms.generate(60, seed=0, split="heldout")
    right = sum(
        min(centroids, key=lambda n: np.linalg.norm(centroids[n] - _lesion_colour(p.image))) == p.label for p in heldout
    )
    assert right / len(heldout) >= 0.95, right


def test_cli_writes_pngs_and_examples(tmp_path, capsys):
    assert synth_main(["phantoms", "--out", str(tmp_path), "--n", "7", "--split", "heldout", "--kinds", "diagnosis,next_step"]) == 0
    assert "not medical images" in capsys.readouterr().out
    examples, problems = read_jsonl(tmp_path / "heldout.jsonl")
    assert problems == [] and len(examples) == 14
    assert {e.kind for e in examples} == {"diagnosis", "next_step"} and {e.source for e in examples} == {"phantom"}
    assert len(list((tmp_path / "images").glob("*.png"))) == 7
    assert examples[0].label == phantoms.CLASSES[0].name and "phantom" in examples[0].caption.lower()
    assert synth_main(["phantoms", "--out", str(tmp_path), "--kinds", "prognosis"]) == 2
    assert "unknown kind" in capsys.readouterr().err
