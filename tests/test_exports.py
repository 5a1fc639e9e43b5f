"""Exports (DataFrames, csv/jsonl/parquet/hf) and the `python -m annotation_db` CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, PngImagePlugin

from annotation_db import InvalidInput, Store, store
from annotation_db import pairwise as pw
from annotation_db.erase import erase_conversation
from annotation_db.export import export, frames

ROOT = Path(__file__).resolve().parents[1]
SECRET_NAME = "patient_jane_doe_2024.jpg"


def _png(path: Path, colour) -> str:
    """A PNG carrying metadata that must never leave: a text chunk naming the patient."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Source", SECRET_NAME)
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), colour).save(buf, "PNG", pnginfo=info)
    sha = hashlib.sha256(buf.getvalue()).hexdigest()
    (path / sha[:2]).mkdir(parents=True, exist_ok=True)
    (path / sha[:2] / f"{sha}.png").write_bytes(buf.getvalue())
    return sha


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    images = home / "images"
    images.mkdir(parents=True)
    hashes = [_png(images, (200, 30, 30)), _png(images, (30, 200, 30))]
    st = Store.open(f"sqlite:///{home / 'annotations.db'}")
    with st.session() as s:
        doc = store.get_or_create_user(s, "doc", "clinician")
        e1, e2 = store.get_or_create_user(s, "e1"), store.get_or_create_user(s, "e2")
        v = store.ensure_base_version(s, "base")
        for sha in hashes:
            store.record_image(s, sha, 16, 12)
        c = store.start_conversation(s, doc.id, {"age": 30, "site": "cheek"})
        t1 = store.record_turn(s, c.id, "What is it?", "A <b>nevus</b>.", image_hashes=hashes[:1],
                               template="qa", settings={"t": 0.0}, model_version_id=v.id)
        t2 = store.record_turn(s, c.id, "Sure?", "Yes.", image_hashes=hashes[1:], template="qa",
                               settings={}, model_version_id=v.id)
        store.add_rating(s, t1.id, e1.id, 2, correction="A melanoma; refer.", diagnosis="melanoma",
                         flags=["wrong_diagnosis"])
        store.add_rating(s, t2.id, e1.id, 5)
        store.add_rating(s, t2.id, e2.id, 4)
        # A blind comparison of a candidate v2 with v1: e1 changes their mind on the first case.
        store.register_version(s, base_model="b", adapter_path="models/v2", parent_id=v.id)
        q = pw.add_pairwise_cases(s, [
            pw.CaseIn("What is it?", "A melanoma.", "A <b>nevus</b>.", hashes[:1], {"age": 30}, "qa", turn_id=t1.id),
            pw.CaseIn("Held-out: and this?", "Psoriasis.", "Eczema.")],
            candidate="v2", active=v.id, batch="refine-r1")
        pw.record_preference(s, q.case_ids[0], e1.id, "a")
        pw.record_preference(s, q.case_ids[0], e1.id, "tie", comment="both miss the asymmetry")
        pw.record_preference(s, q.case_ids[1], e2.id, "b", correction="Chronic plaque psoriasis.")
        store.get_or_create_user(s, "admin", "admin")
    st.dispose()
    return home


def test_frames(home):
    st = Store.open(f"sqlite:///{home / 'annotations.db'}")
    with st.session() as s:
        f = frames(s)
    st.dispose()
    assert list(f) == ["turns", "ratings", "gold_pairs", "preference_pairs", "pairwise"]
    assert len(f["turns"]) == 2 and len(f["ratings"]) == 3
    assert set(f["gold_pairs"]["source"]) == {"expert", "accepted"}
    assert f["preference_pairs"].iloc[0]["chosen"] == "A melanoma; refer."
    assert f["ratings"]["effective"].all()
    for df in f.values():
        assert not {"width", "height", "format", "nbytes", "filename"} & set(df.columns)
    pair = f["pairwise"]
    assert pair["effective"].tolist() == [False, True, True]
    assert pair["winner"].tolist()[1] == "tie" and pair["comment"].tolist()[1] == "both miss the asymmetry"
    assert set(pair["candidate_version"]) == {"v2"} and set(pair["active_version"]) == {"v1"}
    # "b" as clicked is mapped back to whichever version that rater saw second.
    last = pair.iloc[2]
    assert last["choice"] == "b" and last["winner"] == ("active" if last["shown_first"] == "candidate" else "candidate")


def test_erased_conversation_leaves_the_pairwise_export(home):
    st = Store.open(f"sqlite:///{home / 'annotations.db'}")
    erase_conversation(st, 1, by="admin", reason="consent withdrawn", images_dir=home / "images")
    with st.session() as s:
        f = frames(s)
    st.dispose()
    assert f["turns"].empty and f["ratings"].empty
    assert f["pairwise"]["question"].tolist() == ["Held-out: and this?"]  # no image of the erased conversation


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_file_formats(home, tmp_path, fmt):
    st = Store.open(f"sqlite:///{home / 'annotations.db'}")
    counts = export(st, fmt, tmp_path / "out")
    st.dispose()
    assert counts == {"turns": 2, "ratings": 3, "gold_pairs": 2, "preference_pairs": 1, "pairwise": 3}
    read = {"csv": pd.read_csv, "jsonl": lambda p: pd.read_json(p, lines=True), "parquet": pd.read_parquet}[fmt]
    turns = read(tmp_path / "out" / f"turns.{fmt}")
    assert turns.loc[0, "answer"] == "A <b>nevus</b>."
    assert json.loads(turns.loc[0, "context"]) == {"age": 30, "site": "cheek"}
    gold = read(tmp_path / "out" / f"gold_pairs.{fmt}")
    assert len(json.loads(gold.loc[0, "image_hashes"])[0]) == 64
    for p in (tmp_path / "out").iterdir():
        assert SECRET_NAME not in p.read_bytes().decode("utf-8", "replace")


def test_hf_dataset_has_clean_images(home, tmp_path):
    import datasets

    st = Store.open(f"sqlite:///{home / 'annotations.db'}")
    export(st, "hf", tmp_path / "out", home / "images")
    st.dispose()
    d = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))
    gold = d["gold_pairs"]
    assert len(gold) == 2 and gold.features["images"].feature.__class__.__name__ == "Image"
    img = gold[0]["images"][0]
    assert img.size == (16, 12) and img.getpixel((0, 0)) == (200, 30, 30)
    assert "Source" not in img.info and not img.text
    raw = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert SECRET_NAME.encode() not in raw


def test_export_rejects_bad_input(home, tmp_path):
    st = Store.open(f"sqlite:///{home / 'annotations.db'}")
    with pytest.raises(InvalidInput):
        export(st, "xlsx", tmp_path / "o")
    with pytest.raises(InvalidInput):
        export(st, "hf", tmp_path / "o", tmp_path / "missing")
    st.dispose()


def cli(*args, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "annotation_db", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli(home, tmp_path):
    env = {"DERMALOOP_HOME": str(home)}
    env.pop("DERMALOOP_DB", None)
    r = cli("upgrade", "--home", str(tmp_path / "fresh"))
    assert r.returncode == 0 and (tmp_path / "fresh" / "annotations.db").exists()
    r = cli("stats", env={**env, "DERMALOOP_DB": ""})
    assert r.returncode == 0 and "v1" in r.stdout and "score_alpha" in r.stdout, r.stderr
    r = cli("export", "--format", "jsonl", "--out", str(tmp_path / "o"), "--db", f"sqlite:///{home / 'annotations.db'}")
    assert r.returncode == 0 and (tmp_path / "o" / "ratings.jsonl").exists(), r.stderr
    r = cli("export", "--format", "hf", "--out", str(tmp_path / "h"), env=env)
    assert r.returncode == 0 and (tmp_path / "h" / "dataset").is_dir(), r.stderr


@pytest.mark.parametrize("args", [
    [], ["frobnicate"], ["export", "--format", "xlsx", "--out", "x"], ["export", "--out", "x"],
    ["stats", "--db", "nosuchdialect://x"], ["stats", "--db", "postgresql+psycopg://u:p@127.0.0.1:1/x"],
    ["stats", "--over-time", "Q", "--home", "{tmp}"],
])
def test_cli_bad_input_is_one_line(args, tmp_path):
    r = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
