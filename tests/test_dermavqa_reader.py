"""Reading the DermaVQA release and predictions files: the `mediqa` reader (training/data/mediqa.py), the
predictions/references readers and id alignment (training/eval/predictions.py), and
`python -m training.evaluate --predictions` end to end, without a model and after a model run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from training.data.examples import read_examples
from training.data.mediqa import mediqa_split, read_mediqa
from training.errors import DataError
from training.eval import official
from training.eval.evaluate import main
from training.eval.predictions import align, read_predictions, read_references
from training.eval.score import score_files

from conftest import draw_lesion

FIXTURES = Path(__file__).parent / "fixtures" / "dermavqa"
VALID = FIXTURES / "valid_ht.json"
REDDIT = FIXTURES / "test_answersonly.json"
IDS = ["ENC00852", "ENC00853", "ENC00855", "ENC00860", "ENC00883"]


def _copy(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(src, folder / src.name))


def _images(folder: Path, data_file: Path) -> None:
    for i, enc in enumerate(json.loads(data_file.read_text(encoding="utf-8"))):
        for name in enc["image_ids"]:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            draw_lesion(colour=(40 * i % 255, 60, 40)).save(folder / (name if Path(name).suffix else name + ".jpg"))


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- the mediqa reader


def test_without_images_every_encounter_is_read_for_scoring():
    for lang in ("en", "zh", "es"):
        examples, problems = read_examples(VALID, "mediqa", check_images_exist=False, lang=lang)
        assert [e.id for e in examples] == IDS and problems == []
    zh, _ = read_mediqa(VALID, check_images_exist=False, lang="zh")
    assert zh[0].question.startswith("是白癜风吗") and any(a.startswith("暗红色皮疹") for a in zh[0].answers)
    with pytest.raises(DataError, match="unknown language"):
        read_mediqa(VALID, lang="fr")


def test_images_in_the_release_folder_or_images_dir(tmp_path):
    data = _copy(VALID, tmp_path / "data")
    assert mediqa_split(data) == "valid" and mediqa_split(Path("train_answersonly.json")) == "train"
    missing, problems = read_mediqa(data)
    assert missing == [] and len(problems) == 5 and "IMG_ENC00852_00001.jpg not found" in problems[0].message
    _images(tmp_path / "data" / "images_valid", data)  # the release's folder name
    examples, problems = read_mediqa(data)
    assert problems == [] and Path(examples[0].images[0]).parent == tmp_path / "data" / "images_valid"
    elsewhere = tmp_path / "osf"
    shutil.move(tmp_path / "data" / "images_valid", elsewhere / "images_valid")
    for folder in (elsewhere, elsewhere / "images_valid"):  # the folder holding images_valid/, or that folder itself
        examples, problems = read_examples(data, "mediqa", images_dir=folder)
        assert problems == [] and len(examples) == 5 and Path(examples[-1].images[0]).is_file()
    with pytest.raises(DataError, match="no such folder"):
        read_mediqa(data, images_dir=tmp_path / "nope")


def test_empty_references_are_kept_for_scoring_only():
    plain, _ = read_mediqa(VALID, check_images_exist=False)
    kept, _ = read_mediqa(VALID, check_images_exist=False, keep_empty_references=True)
    enc = json.loads(VALID.read_text(encoding="utf-8"))[3]
    assert len(plain[3].answers) == 5 and plain[3].answers[0].strip()
    assert len(kept[3].answers) == len(enc["responses"]) == 10 and kept[3].answers[5:] == [""] * 5
    assert kept[3].answers[0] == plain[3].answers[0]  # the training target is unchanged


def test_reddit_answers_only_file_and_its_downloaded_form(tmp_path):
    data = _copy(REDDIT, tmp_path)
    examples, problems = read_mediqa(data, check_images_exist=False)
    assert examples == [] and len(problems) == 3 and "download_data.py" in problems[0].message
    # what MEDIQA-MAGIC-2024's download_data.py adds: the post's title and text, images/<split>/<post id>.<ext>
    encounters = json.loads(data.read_text(encoding="utf-8"))
    for e in encounters:
        e["query_title_en"], e["query_content_en"] = "What is this rash?", "It itches."
    downloaded = tmp_path / "test_downloaded.json"
    downloaded.write_text(json.dumps(encounters), encoding="utf-8")
    _images(tmp_path / "images" / "test", downloaded)
    examples, problems = read_mediqa(downloaded)
    assert problems == [] and [e.id for e in examples] == ["11sutwk", "11f9aib", "11ayf7e"]
    assert examples[0].images[0].endswith("images/test/11sutwk.jpg") and len(examples[0].answers) == 2


# ---------------------------------------------------------------- predictions and alignment


def test_references_files_keep_every_response_and_the_languages():
    refs = read_references(VALID, "en")
    assert [e.id for e in refs.encounters] == IDS and refs.languages == ("zh", "en", "es")
    assert [r.text for r in refs.encounters[3].references].count("") == 5
    assert refs.encounters[3].references[0].author_id and refs.encounters[3].references[0].completeness in (0.0, 0.5, 1.0)
    reddit = read_references(REDDIT, "en")
    assert reddit.languages == ("en",) and all(len(e.references) == 2 for e in reddit.encounters)
    with pytest.raises(DataError, match="no content_zh"):
        read_references(REDDIT, "zh")


def test_alignment_by_id_fails_in_one_line_on_missing_extra_and_duplicate_ids(tmp_path):
    refs = read_references(VALID)
    rows = [{"id": i, "prediction": "Eczema."} for i in reversed(IDS)]
    pairs = align(read_predictions(_jsonl(tmp_path / "p.jsonl", rows)), refs)
    assert [p.encounter.id for p in pairs] == IDS  # the references' order, whatever the file's
    with pytest.raises(DataError, match=r"no prediction for 1 encounter\(s\) of .*valid_ht.json: ENC00883"):
        align(read_predictions(_jsonl(tmp_path / "p.jsonl", rows[1:])), refs)
    with pytest.raises(DataError, match=r"1 encounter\(s\) not in .*: ENC09999"):
        align(read_predictions(_jsonl(tmp_path / "p.jsonl", rows + [{"id": "ENC09999", "prediction": "x"}])), refs)
    with pytest.raises(DataError, match="duplicate encounter id.*ENC00852"):
        read_predictions(_jsonl(tmp_path / "p.jsonl", rows + [rows[-1]]))
    official_rows = [{"encounter_id": i, "responses": [{"content_en": "Eczema."}]} for i in IDS]
    (tmp_path / "prediction.json").write_text(json.dumps(official_rows))
    with pytest.raises(DataError, match=r"responses\[0\].content_es"):
        read_predictions(tmp_path / "prediction.json", "es")
    with pytest.raises(DataError, match="no references for"):
        align(read_predictions(_jsonl(tmp_path / "p.jsonl", rows)), None)


def test_jsonl_with_references_and_labels_reports_diagnosis_accuracy(tmp_path):
    from training.eval import metrics

    rows = [
        {"id": "a", "prediction": "Most likely psoriasis.", "references": ["Psoriasis vulgaris.", ""], "label": "psoriasis"},
        {"id": "b", "prediction": "An eczema flare.", "references": ["Tinea corporis."], "label": "tinea corporis"},
        {"id": "c", "prediction": "Ringworm, treat with terbinafine.", "answers": ["Tinea."], "label": "tinea corporis"},
        {"id": "d", "prediction": "Unsure.", "references": ["A naevus."]},
    ]
    report = score_files(_jsonl(tmp_path / "p.jsonl", rows), metrics=("deltableu", "diagnosis", "bleu"))
    by_name = {m.name: m for m in report.metrics}
    preds, labels = [r["prediction"] for r in rows], [r.get("label", "") for r in rows]
    direct = metrics.load("diagnosis").compute(predictions=preds, references=labels, synonyms=metrics.default_synonyms())
    assert by_name["diagnosis_accuracy"].value == pytest.approx(direct["diagnosis_accuracy"]) == pytest.approx(2 / 3)
    assert [e.get("diagnosis") for e in report.per_example] == direct["per_example"]
    refs = [r.get("references", r.get("answers")) for r in rows]
    assert by_name["deltableu"].value == pytest.approx(official.delta_bleu(preds, refs).score) and by_name["deltableu"].official
    assert not by_name["bleu"].official and "not the official" in by_name["bleu"].note


# ---------------------------------------------------------------- the CLI


def test_cli_scores_a_predictions_file_without_a_model(tmp_path, capsys, monkeypatch):
    import core.models

    monkeypatch.setattr(core.models, "load_model", lambda *a, **k: pytest.fail("score-only mode loaded a model"))
    preds = [{"encounter_id": i, "responses": [{"content_en": "Eczema; use an emollient.", "content_zh": "湿疹"}]} for i in IDS]
    (tmp_path / "prediction.json").write_text(json.dumps(preds, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "scores"
    code = main(["--predictions", str(tmp_path / "prediction.json"), "--references", str(VALID), "--lang", "zh",
                 "--metrics", "deltableu,bleu,rouge,repetition", "--out", str(out)])
    assert code == 0 and "deltableu" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert set(report["official_scores"]) == {"deltableu_zh"} and "user weights" in report["meta"]["weights"]
    assert report["meta"]["n"] == 5 and report["per_example"][3]["weights"][0] in (0.6, 0.7, 0.8, 0.9, 1.0)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| deltableu |" in md and "| yes |" in md and "| bleu |" in md and "rouge-score's tokeniser" in md
    for args in (["--references", str(VALID), "--lang", "es"], ["--references", str(REDDIT)], ["--data", str(VALID), "--references", str(VALID)],
                 ["--references", str(VALID), "--metrics", "cider"]):
        assert main(["--predictions", str(tmp_path / "prediction.json"), "--out", str(out)] + args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_a_model_run_on_the_release_is_scored_by_the_official_definition(tiny_model_dir, tmp_path):
    data = _copy(VALID, tmp_path / "data")
    _images(tmp_path / "osf" / "images_valid", data)
    out = tmp_path / "run"
    assert main(["--model", str(tiny_model_dir), "--data", str(data), "--images-dir", str(tmp_path / "osf"), "--out", str(out),
                 "--metrics", "bleu,repetition", "--max-new-tokens", "8", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == IDS
    assert main(["--predictions", str(out / "predictions.jsonl"), "--references", str(data), "--metrics", "deltableu",
                 "--out", str(tmp_path / "scores")]) == 0
    report = json.loads((tmp_path / "scores" / "report.json").read_text(encoding="utf-8"))
    encounters = json.loads(data.read_text(encoding="utf-8"))
    expected = official.delta_bleu([r["prediction"] for r in rows], [[x["content_en"] for x in e["responses"]] for e in encounters])
    assert report["official_scores"]["deltableu_en"] == pytest.approx(expected.score)
