"""bench.learning: the regression suite's scoring, and a smoke run of the whole benchmark (quick mode)."""

from __future__ import annotations

import json
import math

import pytest

from bench.learning import CLASS_FIELDS, description_fields, regression_accuracy


def test_description_scoring_reads_every_phantom_description():
    from training.data.phantoms import CLASSES, generate

    phantoms = generate(24, seed=3, split="heldout", size=32)
    refs = [ph.description() for ph in phantoms]
    for ph, ref in zip(phantoms, refs):
        fields = description_fields(ref)
        assert fields is not None, ref
        assert fields["colour"] == ph.cls.colour_name and fields["tone"] == ph.attributes["tone"]
    assert regression_accuracy(refs, refs) == 1.0
    # Another image of the same class (other count, size, tone) still describes the class right.
    same_class = [generate(len(CLASSES) * 2, seed=9, split="train", size=32)[i % len(CLASSES)].description() for i in range(24)]
    assert regression_accuracy(same_class, refs) == 1.0
    # A neighbouring class's description, a diagnosis answer, or a truncated description are wrong.
    shifted = refs[1:] + refs[:1]
    assert regression_accuracy(shifted, refs) == 0.0
    diagnoses = [ph.qa(["diagnosis"])[0][2] for ph in phantoms]
    assert regression_accuracy(diagnoses, refs) == 0.0
    assert regression_accuracy([r[: len(r) // 2] for r in refs], refs) == 0.0
    assert set(CLASS_FIELDS) <= set(description_fields(refs[0]))


def test_description_scoring_half_right():
    from training.data.phantoms import generate

    refs = [ph.description() for ph in generate(6, seed=0, split="heldout", size=32)]
    preds = refs[:3] + ["Most likely melanoma."] * 3
    assert regression_accuracy(preds, refs) == 0.5


@pytest.mark.slow
def test_quick_run_writes_table_plot_and_accuracies(tmp_path):
    from bench.learning import main

    out = tmp_path / "out"
    result = main(["--quick", "--sizes", "4,8", "--steps", "3", "--start-steps", "6", "--out", str(out),
                   "--work", str(tmp_path / "work")])
    table = (out / "learning.md").read_text(encoding="utf-8")
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| corrections", "| ---"))]
    assert [r.split("|")[1:3] for r in rows] == [[" 0 (start) ", " – "], [" 4 ", " no "], [" 4 ", " yes "],
                                                  [" 8 ", " no "], [" 8 ", " yes "]]
    saved = json.loads((out / "learning.json").read_text(encoding="utf-8"))
    assert saved["rows"] == result["rows"] and len(saved["rows"]) == 4
    for row in [saved["start"], *saved["rows"]]:
        for key in ("heldout_accuracy", "regression_accuracy", "regression_rougeL"):
            assert isinstance(row[key], float) and not math.isnan(row[key]) and 0.0 <= row[key] <= 1.0, (key, row)
    for row in saved["rows"]:
        # The gate's figure and the bench's own rescoring of the same adapter agree (greedy decoding).
        assert row["heldout_accuracy"] == row["heldout_accuracy_rescored"]
        assert row["steps"] == 3 and row["train_examples"] == row["corrections"] * (2 if row["replay"] else 1)
    assert (out / "learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
