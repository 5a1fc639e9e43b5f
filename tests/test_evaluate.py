"""python -m training.evaluate: scoring without a model, evaluate_engine on a tiny model, the CLI end to end
(with a dataset file and with a store version's frozen held-out split)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.data import phantoms
from training.data.examples import Example, read_jsonl
from training.eval.evaluate import Report, evaluate_engine, main, score_predictions

FAST = ("bleu", "rouge", "diagnosis", "repetition")


def _phantom_examples(tmp_path: Path, n: int = 6, kinds=("diagnosis",)) -> list[Example]:
    path = phantoms.write_phantoms(tmp_path / "ph", n, seed=0, split="heldout", kinds=kinds, size=64)
    return read_jsonl(path)[0]


def test_score_predictions_perfect_and_copied_answers(tmp_path):
    examples = _phantom_examples(tmp_path, 6, kinds=("diagnosis", "description"))
    perfect = score_predictions([e.answer for e in examples], examples, metrics=FAST)
    assert perfect.metrics["bleu"] == pytest.approx(100) and perfect.metrics["rougeL"] == pytest.approx(1)
    assert perfect.metrics["diagnosis_accuracy"] == 1.0 and perfect.details["diagnosis"]["n"] == 6  # description kinds not scored
    # description and diagnosis of the same image differ; no answer is copied to another image
    assert perfect.metrics["repetition_rate"] == 0.0
    copied = score_predictions(["Most likely melanoma. A large lesion."] * len(examples), examples, metrics=FAST)
    assert copied.metrics["repetition_rate"] == 1.0 and copied.metrics["diagnosis_accuracy"] == pytest.approx(1 / 6)
    assert copied.per_example[0]["repeated"] is True and copied.per_example[0]["prediction"].startswith("Most likely")
    back = Report.from_json(copied.to_json())
    assert back.metrics == copied.metrics and back.per_example == copied.per_example
    md = copied.to_markdown()
    assert "| diagnosis_accuracy | 0.1667 |" in md and "most repeated answer" in md
    assert copied.metrics["answer_words_mean"] == 6 and copied.metrics["empty_answers"] == 0


def test_evaluate_engine_on_a_tiny_model(tiny_engine, tmp_path):
    examples = _phantom_examples(tmp_path, 4)
    report = evaluate_engine(tiny_engine, examples, batch_size=3, metrics=FAST + ("bertscore",), progress=False)
    assert len(report.per_example) == 4 and all(isinstance(e["prediction"], str) for e in report.per_example)
    assert 0 <= report.metrics["diagnosis_accuracy"] <= 1 and report.meta["version"] == "base"
    assert report.details["bertscore"]["standard"] is False and "not comparable" in report.table()
    greedy = [tiny_engine.answer(ex.load_images(), ex.question).text for ex in examples[:2]]
    assert [e["prediction"] for e in report.per_example[:2]] == greedy  # batching changes nothing


def test_cli_end_to_end(tiny_model_dir, tmp_path, capsys):
    _phantom_examples(tmp_path, 6)
    out = tmp_path / "report"
    code = main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "ph" / "heldout.jsonl"), "--out", str(out),
                 "--metrics", "bleu,rouge,meteor,diagnosis,repetition", "--max-new-tokens", "6", "--batch-size", "4", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "diagnosis_accuracy" in printed and "meteor" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["n"] == 6 and report["meta"]["model"] == str(tiny_model_dir)
    assert set(report["metrics"]) >= {"bleu", "rougeL", "meteor", "diagnosis_accuracy", "repetition_rate", "distinct_1"}
    assert (out / "report.md").read_text().startswith("# Evaluation")


def test_cli_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys):
    for args in (
        ["--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)],
        ["--model", str(tiny_model_dir), "--out", str(tmp_path)],
        ["--model", str(tmp_path / "no-model"), "--data", str(_phantom_path(tmp_path)), "--out", str(tmp_path)],
        ["--model", str(tiny_model_dir), "--data", str(_phantom_path(tmp_path)), "--out", str(tmp_path), "--metrics", "cider"],
    ):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def _phantom_path(tmp_path: Path) -> Path:
    return phantoms.write_phantoms(tmp_path / "ph1", 1, kinds=("diagnosis",), size=64)


def test_cli_version_uses_the_store_heldout_split(tiny_model_dir, tmp_path, dermaloop_home, capsys):
    from annotation_db import store as st
    from annotation_db.db import Store
    from core.config import Settings
    from core.images import intake

    settings = Settings.from_env()
    db = Store.open(settings.db_url)
    with db.session() as s:
        version = st.register_version(s, base_model=str(tiny_model_dir), status="active")
        expert = st.get_or_create_user(s, "expert-1", "expert")
        hashes = []
        for ph in phantoms.generate(12, seed=5, split="heldout", size=64):
            img = intake(ph.image, settings.images_dir)
            st.record_image(s, img.sha256, img.width, img.height)
            conv = st.start_conversation(s, expert.id, {"age": 50})
            turn = st.record_turn(s, conv.id, "What is the most likely diagnosis?", "Something.", image_hashes=[img.sha256],
                                  template="free", model_version_id=version.id)
            st.add_rating(s, turn.id, expert.id, 2, correction=ph.qa(["diagnosis"])[0][2])
            hashes.append(img.sha256)
        name = version.name
        # refine assigned the split of all but two images (its own fraction and seed); evaluate only reads it.
        split = st.assign_split(s, hashes[:10], holdout_fraction=0.5, seed=3)
    n_held = sum(v == "heldout" for v in split.values())
    out = tmp_path / "report"
    assert main(["--version", name, "--out", str(out), "--metrics", "bleu,diagnosis", "--max-new-tokens", "4", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "held-out" in report["meta"]["data"] and report["meta"]["model"] == str(tiny_model_dir)
    assert 0 < report["meta"]["n"] == n_held < 10  # only the images in the frozen held-out split
    assert "2 gold pair(s) skipped" in capsys.readouterr().err
    with db.session() as s:
        assert st.get_split(s, hashes) == split  # nothing newly assigned
    db.dispose()
    assert all(e["source"] == "expert" and e["id"].startswith("turn-") for e in report["per_example"])
    assert main(["--version", "v99", "--out", str(out)]) == 2
    assert "v99" in capsys.readouterr().err
