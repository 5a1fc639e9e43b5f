"""The promotion gate: the candidate and the active version answer the same held-out set.

Both are evaluated with `training.eval.evaluate.evaluate_engine` on one engine (one base
in memory, the two adapters loaded by name). The candidate is promoted only when

- its primary metric is not worse than the active's by more than `tolerance`
  (primary `auto`: diagnosis accuracy when the held-out set has labels, else ROUGE-L);
- its repetition rate (share of answers copied across different images: the
  MEDIQA-MAGIC failure) is at most `max_repetition`, or no higher than the active's.

`force` promotes anyway and the decision records that it was forced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

EPS = 1e-9


@dataclass
class Decision:
    promote: bool
    forced: bool
    reason: str  # one line, recorded with the version
    primary: str  # the metric that decided
    candidate: float | None
    active: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pick_primary(name: str, candidate: dict[str, Any], active: dict[str, Any]) -> str:
    if name != "auto":
        return name
    if candidate.get("diagnosis_accuracy") is not None and active.get("diagnosis_accuracy") is not None:
        return "diagnosis_accuracy"
    return "rougeL"


def decide(candidate: dict[str, Any], active: dict[str, Any], *, primary: str = "auto", tolerance: float = 0.01,
           max_repetition: float = 0.3, force: bool = False) -> Decision:
    """Compare two metric dicts (`Report.metrics`) and say whether to promote, and why."""
    name = pick_primary(primary, candidate, active)
    c, a = candidate.get(name), active.get(name)
    problems = []
    if c is None:
        problems.append(f"{name} could not be computed for the candidate")
    elif a is not None and c < a - tolerance - EPS:
        problems.append(f"{name} fell from {a:.4f} to {c:.4f} (tolerance {tolerance})")
    rc, ra = candidate.get("repetition_rate"), active.get("repetition_rate")
    if rc is not None and rc > max_repetition + EPS and rc > (ra if ra is not None else 0.0) + EPS:
        was = f" (active {ra:.4f})" if ra is not None else ""
        problems.append(f"repetition rose to {rc:.4f}{was}, above the limit {max_repetition}")
    summary = f"{name} {_f(a)} -> {_f(c)}"
    if not problems:
        return Decision(True, False, f"passed the gate: {summary}", name, c, a)
    if force:
        return Decision(True, True, f"forced promotion although: {'; '.join(problems)}", name, c, a)
    return Decision(False, False, f"rejected by the gate: {'; '.join(problems)}", name, c, a)


def evaluate_versions(engine: Any, examples: Sequence[Any], versions: Sequence[str], *, batch_size: int, metrics: Sequence[str],
                      generation: Any, synonyms: dict | None = None, progress: bool = True) -> dict[str, Any]:
    """version name -> training.eval.evaluate.Report, each on the same examples."""
    from training.eval.evaluate import evaluate_engine

    return {
        v: evaluate_engine(engine, list(examples), version=v, batch_size=batch_size, metrics=metrics, generation=generation,
                           synonyms=synonyms, progress=progress)
        for v in versions
    }


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
