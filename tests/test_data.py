"""training.data: the Example format and every reader, on good and malformed files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from training.data.examples import Example, read_csv, read_examples, read_hf, read_jsonl, save_hf, write_jsonl
from training.errors import DataError


def _img(path: Path, colour=(120, 60, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), colour).save(path)
    return path


def _example(folder: Path, i: int = 0, **kw) -> Example:
    d = dict(id=f"ex{i}", images=[str(_img(folder / "img" / f"{i}.png", (10 * i, 50, 90)))], question="What is it?",
             answers=["A brown macule.", "A naevus."], caption="A brown spot.", label="melanocytic naevus",
             context={"age": 40, "body_site": "back"}, source="expert", kind="diagnosis")
    d.update(kw)
    return Example(**d)


def test_jsonl_roundtrip_with_relative_paths(tmp_path):
    examples = [_example(tmp_path / "a", i) for i in range(3)]
    path = tmp_path / "a" / "data.jsonl"
    assert write_jsonl(examples, path) == 3
    line = json.loads(path.read_text().splitlines()[0])
    assert line["images"] == ["img/0.png"]  # relative to the file
    shutil.move(tmp_path / "a", tmp_path / "b")  # the folder moves as a whole
    back, problems = read_jsonl(tmp_path / "b" / "data.jsonl")
    assert problems == []
    assert [e.id for e in back] == ["ex0", "ex1", "ex2"]
    assert back[0].answers == examples[0].answers and back[0].answer == "A brown macule."
    assert back[0].context == {"age": 40, "body_site": "back"} and back[0].kind == "diagnosis"
    assert Path(back[0].images[0]).is_file() and back[0].load_images()[0].size == (16, 12)


def test_jsonl_malformed_rows_are_reported_and_skipped(tmp_path):
    good = _example(tmp_path, 0)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = [
        json.dumps(good.to_dict(relative_to=tmp_path)),
        "{not json",
        json.dumps({"images": ["missing.png"], "question": "q", "answers": ["a"]}),
        json.dumps({"images": ["broken.png"], "question": "q", "answers": ["a"]}),
        json.dumps({"images": ["img/0.png"], "question": "q", "answers": ["  "]}),
        json.dumps({"images": ["img/0.png"], "question": "q", "answers": 5}),
        json.dumps({"images": ["img/0.png"], "question": "q", "answers": ["a"], "source": "rumour"}),
        json.dumps({"images": ["img/0.png"], "question": "q", "answers": ["a"], "context": {"age": "old"}}),
        json.dumps(good.to_dict(relative_to=tmp_path)),  # duplicate id
        "",
        json.dumps({"image": "img/0.png", "question": "q", "answer": "a"}),  # aliases are fine
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows) + "\n")
    examples, problems = read_jsonl(path)
    assert [e.id for e in examples] == ["ex0", "d-11"]
    where = {p.where: p.message for p in problems}
    assert set(where) == {f"line {i}" for i in (2, 3, 4, 5, 6, 7, 8, 9)}
    assert "not valid JSON" in where["line 2"]
    assert "not found" in where["line 3"]
    assert "not an image" in where["line 4"]
    assert "answer is empty" in where["line 5"]
    assert "list of strings" in where["line 6"]
    assert "unknown source" in where["line 7"]
    assert "age" in where["line 8"]
    assert "duplicate" in where["line 9"]
    assert all(str(path) in str(p) for p in problems)
    with pytest.raises(DataError, match=r"line 2.*and 7 more"):
        read_examples(path, strict=True)


def test_csv_reader(tmp_path):
    _img(tmp_path / "x.png")
    _img(tmp_path / "y.png", (200, 30, 30))
    path = tmp_path / "d.csv"
    path.write_text(
        "image,question,answer,label,age,sex,body_site,caption\n"
        "x.png;y.png,What is this?,A mole.,naevus,54,female,back,Two spots\n"
        'x.png,Describe it.,"[""A brown macule."", ""Brown spot.""]",,,,,\n'
        "missing.png,What?,Something.,,,,,\n"
        "x.png,What?,,,,,,\n"
        "x.png,What?,Fine.,,200,,,\n"
    )
    examples, problems = read_csv(path)
    assert len(examples) == 2
    assert len(examples[0].images) == 2 and examples[0].context == {"age": 54, "sex": "female", "body_site": "back"}
    assert examples[0].label == "naevus" and examples[0].caption == "Two spots"
    assert examples[1].answers == ["A brown macule.", "Brown spot."] and examples[1].context is None
    assert [p.where for p in problems] == ["line 4", "line 5", "line 6"]
    bad = tmp_path / "bad.csv"
    bad.write_text("picture,question\n1,2\n")
    with pytest.raises(DataError, match="columns"):
        read_csv(bad)


def test_hf_dataset_roundtrip(tmp_path):
    examples = [_example(tmp_path, i) for i in range(3)]
    examples[2].answers = ["ok"]
    ds_dir = save_hf(examples, tmp_path / "ds")
    shutil.rmtree(tmp_path / "img")  # the dataset is self-contained
    back, problems = read_examples(ds_dir, images_dir=tmp_path / "store")
    assert problems == []
    assert [e.id for e in back] == ["ex0", "ex1", "ex2"]
    assert back[0].context == {"age": 40, "body_site": "back"} and back[0].label == "melanocytic naevus"
    assert all(Path(p).is_file() and str(tmp_path / "store") in p for e in back for p in e.images)


def test_hf_dataset_with_a_bad_row(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")], "question": ["q1", "q2"], "answer": ["a1", ""]}
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    examples, problems = read_hf(tmp_path / "ds", images_dir=tmp_path / "images")
    assert [e.answers for e in examples] == [["a1"]]
    assert [p.where for p in problems] == ["row 1"] and "empty" in problems[0].message
    with pytest.raises(DataError, match="not a datasets dataset"):
        read_hf(tmp_path / "images")


def _mediqa(tmp_path: Path) -> Path:
    _img(tmp_path / "images" / "IMG_ENC0001_00001.jpg")
    _img(tmp_path / "images" / "IMG_ENC0001_00002.jpg")
    _img(tmp_path / "images" / "IMG_ENC0002_00001.jpg")
    encounters = [
        {"encounter_id": "ENC0001", "image_ids": ["IMG_ENC0001_00001.jpg", "IMG_ENC0001_00002.jpg"],
         "query_title_en": "Itchy spots on my arm", "query_content_en": "They appeared two weeks ago.",
         "responses": [
             {"content_en": "Probably eczema.", "completeness": "0.5", "contains_freq_ans": "0"},
             {"content_en": "Atopic dermatitis; use emollients and a mild steroid.", "completeness": "1.0", "contains_freq_ans": "1"},
             {"content_en": "", "completeness": "0", "contains_freq_ans": "0"},
         ]},
        {"encounter_id": "ENC0002", "image_ids": ["IMG_ENC0002_00001.jpg"], "query_title_en": "Rash", "query_content_en": "",
         "responses": [{"content_en": " ", "completeness": "1"}]},
        {"encounter_id": "ENC0003", "image_ids": ["IMG_ENC0003_00001.jpg"], "query_title_en": "Mole",
         "query_content_en": "Is it bad?", "responses": [{"content_en": "See a doctor.", "completeness": 1}]},
        {"encounter_id": "ENC0004", "image_ids": "IMG_ENC0002_00001.jpg", "query_title_en": 7, "responses": []},
        "not an encounter",
    ]
    path = tmp_path / "valid.json"
    path.write_text(json.dumps(encounters))
    return path


def test_mediqa_reader(tmp_path):
    path = _mediqa(tmp_path)
    examples, problems = read_examples(path)  # .json -> mediqa
    assert len(examples) == 1
    ex = examples[0]
    assert ex.id == "ENC0001" and len(ex.images) == 2 and ex.source == "expert"
    assert ex.question == "Itchy spots on my arm. They appeared two weeks ago."
    assert ex.answers == ["Atopic dermatitis; use emollients and a mild steroid.", "Probably eczema."]  # most complete first
    where = [p.where for p in problems]
    assert where == ["encounter ENC0002", "encounter ENC0003", "encounter ENC0004", "encounter #4"]
    assert "answer is empty" in problems[0].message and "IMG_ENC0003_00001.jpg not found" in problems[1].message
    with pytest.raises(DataError, match="ENC0002"):
        read_examples(path, strict=True)
    templated, _ = read_examples(path, template="mediqa_two_questions")
    assert templated[0].template == "mediqa_two_questions"


def test_unreadable_inputs_are_domain_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_examples(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="--format"):
        read_examples(tmp_path / "x.txt")
    (tmp_path / "x.json").write_text("{broken")
    with pytest.raises(DataError, match="not valid JSON"):
        read_examples(tmp_path / "x.json")


def test_non_utf8_and_nul_byte_files_are_data_errors_naming_the_file(tmp_path):
    bad_jsonl = tmp_path / "latin1.jsonl"
    bad_jsonl.write_bytes('{"image": "a.png", "question": "Qu\'est-ce?", "answer": "Eczéma"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl: not UTF-8"):
        read_jsonl(bad_jsonl, check_images_exist=False)
    bad_csv = tmp_path / "latin1.csv"
    bad_csv.write_bytes("image,question,answer\na.png,What?,Eczéma\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv: not UTF-8"):
        read_csv(bad_csv, check_images_exist=False)
    nul_csv = tmp_path / "nul.csv"
    nul_csv.write_bytes(b"image,question,answer\na.png,What\x00?,Eczema\n")
    try:  # Python >= 3.11's csv reads NUL bytes; older ones raise csv.Error, which must be a DataError
        read_csv(nul_csv, check_images_exist=False)
    except DataError as e:
        assert "nul.csv" in str(e)
