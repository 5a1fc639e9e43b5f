"""Exports of the store as pandas DataFrames and files (csv, jsonl, parquet, hf).

    python -m annotation_db export --format parquet --out exports/

Five tables: `turns` (conversations with their turns), `ratings` (every rating,
the effective ones marked), `gold_pairs` and `preference_pairs` (as training sees
them) and `pairwise` (every blind A/B judgement with its case and both versions,
the effective ones marked); erased conversations (`erase.py`) and erased pairwise
cases are left out of all five. Images appear only as content hashes, or in the `hf` format as pixels
re-encoded from the stored PNGs with no metadata at all: no file names, no EXIF,
no text chunks, no sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from .db import Store
from .errors import InvalidInput, NotFound
from .models import Conversation, ModelVersion, PairwiseCase, PairwisePreference, Rating, Turn, User
from .store import _turn_images, gold_pairs

FORMATS = ("csv", "jsonl", "parquet", "hf")
TABLES = ("turns", "ratings", "gold_pairs", "preference_pairs", "pairwise")


def turns_frame(s: Session) -> pd.DataFrame:
    """One row per turn, with its conversation's context and the images given in it."""
    rows = s.execute(
        select(Conversation.id, Conversation.user_id, User.role, Conversation.context, Turn.id,
               Turn.seq, Turn.question, Turn.answer, Turn.template, Turn.settings, ModelVersion.name,
               Turn.status, Turn.latency_s, Turn.ttft_s, Turn.prompt_tokens, Turn.completion_tokens,
               Turn.error, Turn.created_at, Turn.regenerates_id)
        .join(Conversation, Conversation.id == Turn.conversation_id)
        .join(User, User.id == Conversation.user_id)
        .outerjoin(ModelVersion, ModelVersion.id == Turn.model_version_id)
        .where(Conversation.erased_at.is_(None))
        .order_by(Turn.id)
    ).all()
    cols = ["conversation_id", "user_id", "user_role", "context", "turn_id", "seq", "question",
            "answer", "template", "settings", "model_version", "status", "latency_s", "ttft_s",
            "prompt_tokens", "completion_tokens", "error", "created_at", "regenerates"]
    df = pd.DataFrame(rows, columns=cols)
    images = _turn_images(s, df["conversation_id"].unique().tolist())
    df["image_hashes"] = [[h for q, h in images.get(c, []) if q == seq]
                          for c, seq in zip(df["conversation_id"], df["seq"])]
    _enum_values(df, "user_role", "status")
    return df


def ratings_frame(s: Session) -> pd.DataFrame:
    """Every rating (append-only history); `effective` marks the latest per turn, rater and kind."""
    latest = set(s.scalars(select(func.max(Rating.id)).group_by(Rating.turn_id, Rating.rater_id, Rating.kind)))
    rows = s.execute(
        select(Rating.id, Rating.turn_id, Rating.rater_id, User.role, Rating.kind, Rating.score,
               Rating.correction, Rating.diagnosis, Rating.flags, Rating.comment, ModelVersion.name,
               Rating.created_at)
        .join(User, User.id == Rating.rater_id)
        .join(Turn, Turn.id == Rating.turn_id)
        .join(Conversation, Conversation.id == Turn.conversation_id)
        .outerjoin(ModelVersion, ModelVersion.id == Rating.model_version_id)
        .where(Conversation.erased_at.is_(None))
        .order_by(Rating.id)
    ).all()
    df = pd.DataFrame(rows, columns=["rating_id", "turn_id", "rater_id", "rater_role", "kind", "score",
                                     "correction", "diagnosis", "flags", "comment", "model_version",
                                     "created_at"])
    _enum_values(df, "rater_role", "kind")
    df["effective"] = df["rating_id"].isin(latest)
    return df


def pairwise_frame(s: Session) -> pd.DataFrame:
    """One row per blind judgement (append-only history) with its case, both versions' names and
    answers, the order the rater saw and the winner mapped back; `effective` marks the latest per
    case and rater. Cases blanked by an erasure are left out."""
    latest = set(s.scalars(select(func.max(PairwisePreference.id))
                           .group_by(PairwisePreference.case_id, PairwisePreference.rater_id)))
    cand, act = aliased(ModelVersion), aliased(ModelVersion)
    P, C = PairwisePreference, PairwiseCase
    rows = s.execute(
        select(P.id, C.id, C.batch, C.turn_id, C.image_hashes, C.question, C.context, C.template,
               cand.name, act.name, C.candidate_answer, C.active_answer, P.rater_id, User.role,
               P.shown_first, P.choice, P.winner, P.correction, P.comment, P.created_at)
        .join(C, C.id == P.case_id)
        .join(User, User.id == P.rater_id)
        .join(cand, cand.id == C.candidate_version_id)
        .join(act, act.id == C.active_version_id)
        .where(C.erased_at.is_(None))
        .order_by(P.id)
    ).all()
    df = pd.DataFrame(rows, columns=["preference_id", "case_id", "batch", "turn_id", "image_hashes", "question",
                                     "context", "template", "candidate_version", "active_version",
                                     "candidate_answer", "active_answer", "rater_id", "rater_role",
                                     "shown_first", "choice", "winner", "correction", "comment", "created_at"])
    _enum_values(df, "rater_role", "shown_first", "choice", "winner")
    df["effective"] = df["preference_id"].isin(latest)
    return df


def gold_frames(s: Session, **kw) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(gold pairs, preference pairs) as DataFrames; keywords go to `store.gold_pairs`."""
    g = gold_pairs(s, **kw)
    gold = pd.DataFrame([p.__dict__ for p in g.pairs], columns=[
        "turn_id", "conversation_id", "seq", "image_hashes", "question", "context", "template",
        "target", "source", "rating_ids", "model_answer", "model_version_id", "created", "mean_score"])
    pref = pd.DataFrame([p.__dict__ for p in g.preference_pairs], columns=[
        "turn_id", "image_hashes", "question", "context", "template", "chosen", "rejected",
        "rating_ids", "model_version_id", "created"])
    return gold, pref


def frames(s: Session) -> dict[str, pd.DataFrame]:
    gold, pref = gold_frames(s)
    return {"turns": turns_frame(s), "ratings": ratings_frame(s), "gold_pairs": gold,
            "preference_pairs": pref, "pairwise": pairwise_frame(s)}


def _enum_values(df: pd.DataFrame, *cols: str) -> None:
    """Enum members as their plain values (what every export format can hold)."""
    for col in cols:
        df[col] = [getattr(v, "value", v) for v in df[col]]


def _iso(v) -> str | None:
    if v is None or pd.isna(v):
        return None
    t = pd.Timestamp(v)
    return (t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")).isoformat()


def _flat(df: pd.DataFrame) -> pd.DataFrame:
    """Dicts and lists as JSON text, times as ISO-8601 UTC: one shape for every format."""
    df = df.copy()
    for col in df.columns:
        if col in ("created_at", "created"):
            df[col] = pd.Series([_iso(v) for v in df[col]], index=df.index, dtype=object)
        elif df[col].dtype == object and any(isinstance(v, (dict, list)) for v in df[col]):
            df[col] = [json.dumps(v, ensure_ascii=False) if v is not None else None for v in df[col]]
    return df


def _pylist(col: pd.Series) -> list:
    """Column values for datasets: missing values as None, not NaN."""
    return [None if not isinstance(v, (list, dict, str)) and pd.isna(v) else v for v in col.tolist()]


def _clean_image(path: Path):
    """The pixels only: a new image from the decoded data, nothing else carried over."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        mode = im.mode if im.mode in ("RGB", "RGBA", "L") else "RGB"
        im = im.convert(mode)
        return Image.frombytes(mode, im.size, im.tobytes())


def _hf(tables: dict[str, pd.DataFrame], out: Path, images_dir: Path | None) -> None:
    """A DatasetDict, one split per non-empty table; `images` holds the pixels when
    `images_dir` is given (every referenced image must be there)."""
    import datasets

    splits = {}
    for name, df in tables.items():
        if df.empty:
            continue  # an empty split cannot be saved and loaded back
        hashes = df["image_hashes"].tolist() if "image_hashes" in df else None
        flat = _flat(df.drop(columns=["image_hashes"], errors="ignore"))
        data = {c: _pylist(flat[c]) for c in flat.columns}
        features = {c: datasets.Value("string") for c in flat.columns
                    if not pd.api.types.is_numeric_dtype(flat[c]) and not pd.api.types.is_bool_dtype(flat[c])}
        if hashes is not None:
            data["image_hashes"] = hashes
            features["image_hashes"] = datasets.Sequence(datasets.Value("string"))
            if images_dir is not None:
                for h in {h for hs in hashes for h in hs}:
                    if not (images_dir / h[:2] / f"{h}.png").is_file():
                        raise NotFound(f"image {h[:12]}… is not under {images_dir}")
                data["images"] = [[_clean_image(images_dir / h[:2] / f"{h}.png") for h in hs]
                                  for hs in hashes]
                features["images"] = datasets.Sequence(datasets.Image())
        ds = datasets.Dataset.from_dict(data)
        splits[name] = ds.cast(datasets.Features({**ds.features, **features}))
    datasets.DatasetDict(splits).save_to_disk(str(out))


def export(store_or_session: Store | Session, fmt: str, out: Path,
           images_dir: Path | None = None) -> dict[str, int]:
    """Write the five tables under `out` (a folder) in `fmt`; return rows per table."""
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"{out} exists and is not a folder")
    if images_dir is not None and not Path(images_dir).is_dir():
        raise InvalidInput(f"images folder {images_dir} does not exist")
    if isinstance(store_or_session, Store):
        with store_or_session.session() as s:
            tables = frames(s)
    else:
        tables = frames(store_or_session)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        _hf(tables, out / "dataset", Path(images_dir) if images_dir else None)
    for name, df in tables.items():
        if fmt == "csv":
            _flat(df).to_csv(out / f"{name}.csv", index=False)
        elif fmt == "jsonl":
            _flat(df).to_json(out / f"{name}.jsonl", orient="records", lines=True, force_ascii=False)
        elif fmt == "parquet":
            _flat(df).to_parquet(out / f"{name}.parquet", index=False)
    return {name: len(df) for name, df in tables.items()}
