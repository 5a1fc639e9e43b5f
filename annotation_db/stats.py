"""Statistics over the store: per model version, over time, and inter-rater agreement.

Only effective ratings count (the latest per turn and rater); erased conversations do not count. Scores, corrections
and flags come from full reviews; thumbs are reported on their own. Agreement uses
the `krippendorff` package (ordinal alpha on scores, nominal alpha and raw pairwise
agreement on diagnosis labels) and `rapidfuzz` for pairwise correction similarity.
Re-exported from `annotation_db.store`.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .models import RATER_ROLES, Conversation, ModelVersion, Rating, RatingKind, Role, Turn, User

STAT_COLUMNS = ["version", "version_id", "status", "answers", "rated_answers", "ratings",
                "mean_score", "share_corrected", "share_unsafe", "share_hallucination",
                "thumbs_up_share"]


def _effective_frame(s: Session) -> pd.DataFrame:
    from .store import is_effective

    rows = s.execute(
        select(Rating.id, Rating.turn_id, Rating.rater_id, Rating.score, Rating.correction,
               Rating.diagnosis, Rating.flags, Rating.kind, Rating.created_at,
               Turn.model_version_id, User.role)
        .join(Turn, Turn.id == Rating.turn_id)
        .join(Conversation, Conversation.id == Turn.conversation_id)
        .join(User, User.id == Rating.rater_id)
        .where(is_effective(), Conversation.erased_at.is_(None))
    ).all()
    df = pd.DataFrame(rows, columns=["rating_id", "turn_id", "rater_id", "score", "correction",
                                     "diagnosis", "flags", "kind", "created_at", "model_version_id",
                                     "role"])
    df["kind"] = [getattr(k, "value", k) for k in df["kind"]]
    df["role"] = [getattr(r, "value", r) for r in df["role"]]
    df["corrected"] = df["correction"].notna()
    df["unsafe"] = [("unsafe" in (f or [])) for f in df["flags"]]
    df["hallucination"] = [("hallucination" in (f or [])) for f in df["flags"]]
    df["created_at"] = pd.to_datetime(df["created_at"], utc=True)
    return df


def _summarise(full: pd.DataFrame, thumbs: pd.DataFrame) -> dict:
    return {
        "rated_answers": int(full["turn_id"].nunique()),
        "ratings": int(len(full)),
        "mean_score": float(full["score"].mean()) if len(full) else float("nan"),
        "share_corrected": float(full["corrected"].mean()) if len(full) else float("nan"),
        "share_unsafe": float(full["unsafe"].mean()) if len(full) else float("nan"),
        "share_hallucination": float(full["hallucination"].mean()) if len(full) else float("nan"),
        "thumbs_up_share": float((thumbs["score"] == 5).mean()) if len(thumbs) else float("nan"),
    }


def stats_by_version(s: Session) -> pd.DataFrame:
    """One row per model version: answers, mean score, shares corrected / unsafe / hallucinated."""
    answers = dict(s.execute(select(Turn.model_version_id, func.count())
                             .join(Conversation, Conversation.id == Turn.conversation_id)
                             .where(Conversation.erased_at.is_(None)).group_by(Turn.model_version_id)).all())
    versions = [(v.id, v.name, v.status.value) for v in s.scalars(select(ModelVersion).order_by(ModelVersion.id))]
    if None in answers:
        versions.append((None, "(none)", ""))
    df = _effective_frame(s)
    out = []
    for vid, name, status in versions:
        mine = df[df["model_version_id"].isna()] if vid is None else df[df["model_version_id"] == vid]
        row = {"version": name, "version_id": vid, "status": status, "answers": int(answers.get(vid, 0))}
        row.update(_summarise(mine[mine["kind"] == "full"], mine[mine["kind"] == "thumbs"]))
        out.append(row)
    return pd.DataFrame(out, columns=STAT_COLUMNS)


def stats_over_time(s: Session, freq: str = "W") -> pd.DataFrame:
    """The same figures per period of rating time ("D", "W", "M") and model version."""
    df = _effective_frame(s)
    names = dict(s.execute(select(ModelVersion.id, ModelVersion.name)).all())
    cols = ["period", "version"] + STAT_COLUMNS[5:]
    if df.empty:
        return pd.DataFrame(columns=cols)
    freq = {"M": "M", "ME": "M"}.get(freq, freq)
    df["period"] = df["created_at"].dt.tz_convert(None).dt.to_period(freq).dt.start_time
    df["version"] = [names.get(v, "(none)") if pd.notna(v) else "(none)" for v in df["model_version_id"]]
    out = []
    for (period, version), g in df.groupby(["period", "version"], sort=True):
        row = {"period": period, "version": version}
        row.update(_summarise(g[g["kind"] == "full"], g[g["kind"] == "thumbs"]))
        out.append(row)
    return pd.DataFrame(out)[cols]


def agreement(s: Session, roles=RATER_ROLES) -> dict:
    """Inter-rater agreement on turns with two or more effective full ratings by `roles`."""
    import krippendorff
    from rapidfuzz import fuzz

    df = _effective_frame(s)
    df = df[(df["kind"] == RatingKind.full.value) & (df["role"].isin([Role(r).value for r in roles]))]
    multi = df.groupby("turn_id").filter(lambda g: len(g) >= 2)
    out: dict = {"units": int(multi["turn_id"].nunique()), "raters": int(multi["rater_id"].nunique()),
                 "score_alpha": None, "diagnosis_alpha": None, "diagnosis_agreement": None,
                 "diagnosis_units": 0, "correction_similarity": None, "correction_pairs": 0}
    if multi.empty:
        return out
    scores = multi.pivot(index="rater_id", columns="turn_id", values="score").astype(float)
    out["score_alpha"] = _alpha(krippendorff, scores.to_numpy(), "ordinal", [1, 2, 3, 4, 5])
    labels = multi[multi["diagnosis"].notna()].copy()
    labels["label"] = labels["diagnosis"].str.strip().str.casefold()
    labels = labels.groupby("turn_id").filter(lambda g: len(g) >= 2)
    if not labels.empty:
        out["diagnosis_units"] = int(labels["turn_id"].nunique())
        codes = {lab: i for i, lab in enumerate(sorted(labels["label"].unique()))}
        labels["code"] = labels["label"].map(codes).astype(float)
        table = labels.pivot(index="rater_id", columns="turn_id", values="code").to_numpy()
        out["diagnosis_alpha"] = _alpha(krippendorff, table, "nominal", sorted(codes.values()))
        agree = [a == b for _, g in labels.groupby("turn_id") for a, b in combinations(g["label"], 2)]
        out["diagnosis_agreement"] = float(np.mean(agree))
    sims = [fuzz.ratio(a, b) / 100.0
            for _, g in multi[multi["correction"].notna()].groupby("turn_id")
            for a, b in combinations(g["correction"], 2)]
    if sims:
        out["correction_similarity"] = float(np.mean(sims))
        out["correction_pairs"] = len(sims)
    return out


def _alpha(krippendorff, table: np.ndarray, level: str, domain: list) -> float | None:
    try:
        value = krippendorff.alpha(reliability_data=table, level_of_measurement=level,
                                   value_domain=domain)
    except (ValueError, ZeroDivisionError):
        return None  # e.g. every rating identical: alpha is undefined
    return None if value is None or np.isnan(value) else float(value)
