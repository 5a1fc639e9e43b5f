"""Model versions, training runs with lineage, the frozen eval split, the refine lock.

Exactly one version is active: every status change takes the store's write lock
(`_util.write_lock`) and the database backs it with a partial unique index on
`status = 'active'`, so concurrent promotions on SQLite or PostgreSQL still leave
one. Re-exported from `annotation_db.store`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ._util import as_utc, check_hashes, check_json, check_text, write_lock
from .errors import Conflict, InvalidInput, LockHeld, NotFound
from .models import (
    EvalSplit,
    Lock,
    ModelVersion,
    PairwisePreference,
    Rating,
    RunStatus,
    Split,
    TrainingRun,
    TrainingRunPreference,
    TrainingRunRating,
    VersionStatus,
    utcnow,
)

# ------------------------------------------------------------------ model versions


def get_version(s: Session, id_or_name: int | str) -> ModelVersion:
    """A version by id (int) or name ("v3")."""
    if isinstance(id_or_name, int) and not isinstance(id_or_name, bool):
        v = s.get(ModelVersion, id_or_name, populate_existing=True)
    elif isinstance(id_or_name, str):
        v = s.scalar(select(ModelVersion).where(ModelVersion.name == id_or_name))
    else:
        raise InvalidInput(f"a model version is named by id or name, got {id_or_name!r}")
    if v is None:
        raise NotFound(f"no model version {id_or_name!r}")
    return v


def list_versions(s: Session) -> list[ModelVersion]:
    return list(s.scalars(select(ModelVersion).order_by(ModelVersion.id)))


def active_version(s: Session) -> ModelVersion | None:
    return s.scalar(
        select(ModelVersion).where(ModelVersion.status == VersionStatus.active)
        .execution_options(populate_existing=True)
    )


def _set_status(s: Session, v: ModelVersion, status: VersionStatus, reason: str | None) -> None:
    v.status = status
    v.status_reason = reason
    v.status_changed_at = utcnow()
    s.flush()


def _activate(s: Session, v: ModelVersion, reason: str | None, superseded: str = "superseded by") -> None:
    """Make `v` the one active version (the one before is retired); the caller holds the write lock."""
    current = active_version(s)
    if current is not None and current.id != v.id:
        _set_status(s, current, VersionStatus.retired, f"{superseded} {v.name}")
    _set_status(s, v, VersionStatus.active, reason)


def register_version(s: Session, *, base_model: str, adapter_path: str | None = None,
                     parent_id: int | None = None, training_run_id: int | None = None,
                     metrics: dict | None = None, status: str = "candidate",
                     note: str | None = None) -> ModelVersion:
    """Register a version named v1, v2, ... ; status "candidate" (default) or "active"."""
    base_model = check_text(base_model, "base model", max_len=500)
    adapter_path = check_text(adapter_path, "adapter path", required=False, max_len=1000)
    note = check_text(note, "note", required=False, allow_blank=True)
    if status not in ("candidate", "active"):
        raise InvalidInput(f"a new version is 'candidate' or 'active', not {status!r}")
    write_lock(s)
    if parent_id is not None:
        get_version(s, parent_id)
    if training_run_id is not None and s.get(TrainingRun, training_run_id) is None:
        raise NotFound(f"no training run with id {training_run_id}")
    n = s.scalar(select(func.count()).select_from(ModelVersion))
    v = ModelVersion(name=f"v{n + 1}", base_model=base_model, adapter_path=adapter_path,
                     parent_id=parent_id, training_run_id=training_run_id,
                     metrics=check_json(metrics, "metrics") if metrics is not None else None,
                     status=VersionStatus.candidate, note=note)
    s.add(v)
    s.flush()
    if status == "active":
        _activate(s, v, "registered as active")
    return v


def promote(s: Session, version_id: int | str, *, forced: bool = False,
            reason: str | None = None) -> ModelVersion:
    """Make a version the active one (the previous active is retired).
    A version the gate rejected needs forced=True, and its reason then says "forced"."""
    return _make_active(s, version_id, reason or "promotion", forced, "promote", "superseded by")


def reject(s: Session, version_id: int | str, reason: str) -> ModelVersion:
    """Mark a candidate (or retired) version as rejected, with the reason (the gate's report)."""
    reason = check_text(reason, "reason")
    write_lock(s)
    v = get_version(s, version_id)
    if v.status is VersionStatus.active:
        raise Conflict(f"{v.name} is active; roll back to another version instead of rejecting it")
    _set_status(s, v, VersionStatus.rejected, reason)
    return v


def retire(s: Session, version_id: int | str, reason: str | None = None) -> ModelVersion:
    reason = check_text(reason, "reason", required=False)
    write_lock(s)
    v = get_version(s, version_id)
    if v.status is VersionStatus.active:
        raise Conflict(f"{v.name} is active; promote or roll back to another version first")
    _set_status(s, v, VersionStatus.retired, reason or "retired")
    return v


def rollback(s: Session, version_id: int | str, reason: str | None = None, *,
             forced: bool = False) -> ModelVersion:
    """Re-activate an earlier version; the version active until now is retired, so a rollback
    can itself be rolled back. A version the gate rejected needs forced=True, as in promote()."""
    return _make_active(s, version_id, reason or "rollback", forced, "roll back", "rolled back to")


def _make_active(s: Session, version_id: int | str, reason: str, forced: bool, verb: str,
                 superseded: str) -> ModelVersion:
    reason = check_text(reason, "reason")
    write_lock(s)
    v = get_version(s, version_id)
    if v.status is VersionStatus.active:
        return v
    if v.status is VersionStatus.rejected:
        if not forced:
            raise Conflict(f"{v.name} was rejected ({v.status_reason}); {verb} with forced=True to override")
        reason = f"forced {reason}"
    _activate(s, v, reason, superseded=superseded)
    return v


def ensure_base_version(s: Session, base_model: str) -> ModelVersion:
    """The active version; if none, register the bare base model and activate it."""
    base_model = check_text(base_model, "base model", max_len=500)
    write_lock(s)
    v = active_version(s)
    if v is not None:
        return v
    return register_version(s, base_model=base_model, status="active", note="bare base model")


# ------------------------------------------------------------ training runs, lineage


def start_training_run(s: Session, config: dict) -> TrainingRun:
    run = TrainingRun(config=check_json(config, "training config"), status=RunStatus.running)
    s.add(run)
    s.flush()
    return run


def finish_training_run(s: Session, run_id: int, *, status: str, counts: dict | None = None,
                        rating_ids: Iterable[int] = (), synthetic_ids: Iterable = (),
                        report: dict | None = None, preference_ids: Iterable[int] = ()) -> TrainingRun:
    """Close a run with its outcome and lineage: the ratings, blind pairwise preferences and
    synthetic items it used."""
    try:
        status_ = RunStatus(status)
    except ValueError:
        raise InvalidInput(f"unknown run status {status!r}; use one of {[r.value for r in RunStatus]}") from None
    if status_ is RunStatus.running:
        raise InvalidInput("a finished run cannot have status 'running'")
    run = s.get(TrainingRun, run_id)
    if run is None:
        raise NotFound(f"no training run with id {run_id}")
    if run.status is not RunStatus.running:
        raise Conflict(f"training run {run_id} already finished ({run.status.value})")
    ids = _existing(s, Rating.id, rating_ids, "rating")
    prefs = _existing(s, PairwisePreference.id, preference_ids, "pairwise preference")
    s.add_all(TrainingRunRating(run_id=run_id, rating_id=i) for i in ids)
    s.add_all(TrainingRunPreference(run_id=run_id, preference_id=i) for i in prefs)
    run.status = status_
    run.finished_at = utcnow()
    run.counts = check_json(counts, "counts")
    run.synthetic_ids = [str(x) for x in synthetic_ids]
    run.report = check_json(report, "report")
    s.flush()
    return run


def _existing(s: Session, column, ids: Iterable[int], what: str) -> list[int]:
    """`ids` sorted and deduplicated, or NotFound naming the first that has no row."""
    ids = sorted({int(i) for i in ids})
    found: set[int] = set()
    for i in range(0, len(ids), 500):
        found.update(s.scalars(select(column).where(column.in_(ids[i:i + 500]))))
    missing = [i for i in ids if i not in found]
    if missing:
        raise NotFound(f"{len(missing)} {what} ids do not exist (first: {missing[0]})")
    return ids


def _run_ids(s: Session, version_id: int | str, ancestors: bool) -> list[int]:
    runs, seen = [], set()
    v: ModelVersion | None = get_version(s, version_id)
    while v is not None and v.id not in seen:
        seen.add(v.id)
        if v.training_run_id is not None:
            runs.append(v.training_run_id)
        if not ancestors or v.parent_id is None:
            break
        v = s.get(ModelVersion, v.parent_id)
    return runs


def lineage_rating_ids(s: Session, version_id: int | str, ancestors: bool = True) -> set[int]:
    runs = _run_ids(s, version_id, ancestors)
    if not runs:
        return set()
    return set(s.scalars(select(TrainingRunRating.rating_id).where(TrainingRunRating.run_id.in_(runs))))


def lineage(s: Session, version_id: int | str, *, ancestors: bool = True) -> list[Rating]:
    """The exact ratings (corrections, accepted answers) a version learned from."""
    runs = _run_ids(s, version_id, ancestors)
    if not runs:
        return []
    used = select(TrainingRunRating.rating_id).where(TrainingRunRating.run_id.in_(runs))
    return list(s.scalars(select(Rating).where(Rating.id.in_(used)).order_by(Rating.id)))


# ----------------------------------------------------------------- the eval split


def _bucket(sha: str, seed: int) -> float:
    return int(hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest()[:12], 16) / 16**12


def get_split(s: Session, hashes: Iterable[str]) -> dict[str, str]:
    """image hash -> "train" | "heldout", for the hashes already assigned."""
    hs = sorted(set(check_hashes(hashes)))
    out: dict[str, str] = {}
    for i in range(0, len(hs), 500):
        for sha, split in s.execute(select(EvalSplit.sha256, EvalSplit.split)
                                    .where(EvalSplit.sha256.in_(hs[i:i + 500]))):
            out[sha] = split.value
    return out


def assign_split(s: Session, image_hashes: Iterable[str], *, holdout_fraction: float = 0.2,
                 seed: int = 0) -> dict[str, str]:
    """Assign new hashes to train/heldout (deterministic from the hash); never reassign."""
    if not 0.0 <= holdout_fraction <= 1.0:
        raise InvalidInput(f"holdout fraction must be from 0 to 1, got {holdout_fraction}")
    hashes = list(dict.fromkeys(check_hashes(image_hashes)))
    write_lock(s)
    out = get_split(s, hashes)
    for sha in hashes:
        if sha not in out:
            split = Split.heldout if _bucket(sha, seed) < holdout_fraction else Split.train
            s.add(EvalSplit(sha256=sha, split=split))
            out[sha] = split.value
    s.flush()
    return {sha: out[sha] for sha in hashes}


# ------------------------------------------------------------------- the refine lock

DEFAULT_STALE_AFTER_S = 12 * 3600


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return True


def acquire_lock(s: Session, name: str, owner: str, pid: int, host: str,
                 stale_after_s: float = DEFAULT_STALE_AFTER_S) -> Lock:
    """Take the named lock or raise LockHeld. A lock whose holder is a dead process on
    this host, or older than `stale_after_s`, is stale and is taken over. Commit the
    session right after, so other processes see it."""
    name = check_text(name, "lock name", max_len=100)
    owner = check_text(owner, "lock owner", max_len=200)
    host = check_text(host, "host", max_len=255)
    write_lock(s)
    held = s.get(Lock, name, populate_existing=True)
    if held is not None:
        if (held.owner, held.pid, held.host) == (owner, pid, host):
            return held
        age = utcnow() - as_utc(held.created_at)
        dead = held.host == host and not _pid_alive(held.pid)
        if not dead and age < timedelta(seconds=stale_after_s):
            raise LockHeld(
                f"the {name} lock is held by {held.owner} (pid {held.pid} on {held.host}) "
                f"since {as_utc(held.created_at):%Y-%m-%d %H:%M:%S} UTC"
            )
        s.delete(held)
        s.flush()
    lock = Lock(name=name, owner=owner, pid=pid, host=host, created_at=utcnow())
    s.add(lock)
    s.flush()
    return lock


def release_lock(s: Session, name: str, owner: str | None = None) -> bool:
    """Release the named lock (only if `owner` holds it, when given). True if released."""
    write_lock(s)
    held = s.get(Lock, name, populate_existing=True)
    if held is None or (owner is not None and held.owner != owner):
        return False
    s.delete(held)
    s.flush()
    return True


def lock_holder(s: Session, name: str) -> Lock | None:
    return s.get(Lock, name, populate_existing=True)

