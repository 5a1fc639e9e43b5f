"""The promotion gate: the candidate and the active version answer the same held-out cases.

Both are evaluated with `training.eval.evaluate.evaluate_engine` on one engine (one base
in memory, the two adapters loaded by name); `decide` compares the two reports case by
case (`training.eval.stats.compare_paired`: the paired difference with a seeded
bootstrap 95 % interval) and promotes only when every guard holds:

- the primary metric is non-inferior: the interval's lower bound is above -tolerance.
  `auto` is diagnosis accuracy on the cases the EXPERTS labelled when there are at least
  `min_n` of them, else on every labelled case (synthetic included), else ROUGE-L
  against references that are not the active model's own accepted answers;
- no subgroup (Fitzpatrick type, body site, modality) with `min_n` cases is shown worse;
- repetition (answers copied across images) and copying (answers near-identical to a
  training target: the MEDIQA-MAGIC failure) stay under their limits, or no higher
  than the active version's;
- on the new corrections (in-sample, reported as such) the candidate is better than the
  active version: it learned what the experts said.

Fewer than `min_n` held-out cases: the report says so and nothing is promoted unless
`force` (recorded as forced).

    from training.eval.gate import decide
    decision = decide(candidate_report, active_report, examples=heldout, tolerance=0.05)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from training.eval.stats import MIN_PAIRED_N, Status, compare_paired, copy_rate

SUBGROUP_KEYS = ("fitzpatrick", "body_site", "modality")  # clinical-context fields whose groups are checked
EPS = 1e-9


@dataclass
class Decision:
    promote: bool
    forced: bool
    reason: str  # one line, recorded with the version
    primary: str  # the metric that decided, and on which cases
    candidate: float | None
    active: float | None
    n: int = 0  # paired cases behind the primary comparison
    ci: tuple[float, float] | None = None  # interval of candidate - active
    checks: list[dict[str, Any]] = field(default_factory=list)  # every comparison made, in plain words

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _values(rows: Sequence[dict], key: str, idx: Sequence[int]) -> list[float | None]:
    out = []
    for i in idx:
        v = rows[i].get(key)
        out.append(None if v is None else float(v))
    return out


def primary_cases(rows: Sequence[dict], name: str, min_n: int) -> tuple[str, str, list[int]]:
    """(metric key in a per-example row, what the cases are, their indices)."""
    expert = [i for i, r in enumerate(rows) if r.get("source") in ("expert", "accepted") and r.get("diagnosis") is not None]
    labelled = [i for i, r in enumerate(rows) if r.get("diagnosis") is not None]
    # An accepted answer's reference is the active model's own answer: text metrics on it favour the incumbent.
    texts = [i for i, r in enumerate(rows) if r.get("source") != "accepted"]
    if name in ("auto", "diagnosis_accuracy"):
        if len(expert) >= min_n:
            return "diagnosis", "expert-labelled held-out cases", expert
        if labelled:
            return "diagnosis", "labelled held-out cases" + (" (synthetic included)" if len(expert) < len(labelled) else ""), labelled
        if name == "diagnosis_accuracy":
            return "diagnosis", "labelled held-out cases", []
        name = "rougeL"
    key = {"repetition_rate": "repeated", "bertscore": "bertscore_f1"}.get(name, name)
    return key, "held-out cases with expert or synthetic references", texts


def decide(candidate: Any, active: Any, *, examples: Sequence[Any] = (), primary: str = "auto", tolerance: float = 0.05,
           min_n: int = MIN_PAIRED_N, max_repetition: float = 0.3, max_copying: float = 0.3,
           training_targets: Sequence[str] = (), in_sample: tuple[Any, Any] | None = None, seed: int = 0,
           force: bool = False) -> Decision:
    """Compare two `Report`s of the same held-out cases (and optionally of the new corrections) and say why."""
    rows_c, rows_a = candidate.per_example, active.per_example
    assert [r["id"] for r in rows_c] == [r["id"] for r in rows_a], "both versions must answer the same cases"
    key, cases, idx = primary_cases(rows_c, primary, min_n)
    metric = "diagnosis_accuracy" if key == "diagnosis" else key
    main = compare_paired(_values(rows_c, key, idx), _values(rows_a, key, idx), metric=metric, tolerance=tolerance,
                          seed=seed, min_n=min_n)
    checks = [_check(main, f"primary, {cases}")]
    problems = []
    if main.status is Status.TOO_FEW:
        problems.append(f"too few held-out cases to decide: {main.n} {cases}, at least {min_n} needed")
    elif not main.promotes:
        problems.append(main.summary())
    for name, group, gidx in _subgroups(examples, idx):
        c = compare_paired(_values(rows_c, key, gidx), _values(rows_a, key, gidx), metric=metric, tolerance=tolerance,
                           seed=seed, min_n=min_n)
        if c.status is not Status.TOO_FEW:
            checks.append(_check(c, f"subgroup {name}={group}"))
            if c.shown_worse:
                problems.append(f"subgroup {name}={group}: {c.summary()}")
    problems += _limits(candidate, active, "repetition_rate", "repetition", max_repetition, checks)
    if training_targets:
        copied = {v: copy_rate([r["prediction"] for r in rep.per_example], training_targets,
                               references=[r["references"] for r in rep.per_example]).rate
                  for v, rep in (("candidate", candidate), ("active", active))}
        candidate.metrics["copy_rate"], active.metrics["copy_rate"] = copied["candidate"], copied["active"]
        problems += _limits(candidate, active, "copy_rate", "copying of training answers", max_copying, checks)
    if in_sample is not None:
        problems += _learned(*in_sample, checks)
    ci = None if main.ci_low is None else (main.ci_low, main.ci_high)
    head = dict(primary=f"{metric} ({cases})", candidate=main.candidate_mean, active=main.active_mean, n=main.n, ci=ci,
                checks=checks)
    if not problems:
        return Decision(True, False, f"passed the gate: {main.summary()}", **head)
    if force:
        return Decision(True, True, f"forced promotion although: {'; '.join(problems)}", **head)
    return Decision(False, False, f"rejected by the gate: {'; '.join(problems)}", **head)


def no_heldout_decision(force: bool, in_sample: tuple[Any, Any] | None = None) -> Decision:
    """No held-out case at all (a young store): nothing can be shown, so only `force` promotes."""
    checks: list[dict[str, Any]] = []
    learned = _learned(*in_sample, checks) if in_sample else []
    why = "no held-out cases to evaluate on (the new corrections were evaluated in-sample only" + (
        f": {learned[0]})" if learned else ")")
    if force:
        return Decision(True, True, f"promoted without the gate (--force): {why}", "none", None, None, checks=checks)
    return Decision(False, False, f"rejected by the gate: {why}; promote with --force, or wait for more held-out cases",
                    "none", None, None, checks=checks)


def _check(c: Any, what: str) -> dict[str, Any]:
    return {"what": what, "metric": c.metric, "n": c.n, "candidate": c.candidate_mean, "active": c.active_mean,
            "ci": None if c.ci_low is None else [c.ci_low, c.ci_high], "status": c.status.value, "summary": c.summary()}


def _subgroups(examples: Sequence[Any], idx: Sequence[int]):
    """(field, value, indices) of each clinical-context group among the primary cases."""
    for name in SUBGROUP_KEYS:
        groups: dict[str, list[int]] = {}
        for i in idx:
            if i < len(examples) and examples[i].context and examples[i].context.get(name):
                groups.setdefault(str(examples[i].context[name]), []).append(i)
        if len(groups) > 1:
            yield from ((name, g, gidx) for g, gidx in sorted(groups.items()))


def _limits(candidate: Any, active: Any, key: str, words: str, limit: float, checks: list) -> list[str]:
    """A rate above `limit` fails, unless it is no higher than the active version's."""
    rc, ra = candidate.metrics.get(key), active.metrics.get(key)
    if rc is None:
        return []
    checks.append({"what": words, "metric": key, "candidate": rc, "active": ra, "limit": limit})
    if rc > limit + EPS and rc > (ra if ra is not None else 0.0) + EPS:
        was = f" (active {ra:.4f})" if ra is not None else ""
        return [f"{words} rose to {rc:.4f}{was}, above the limit {limit}"]
    return []


def _learned(cand: Any, act: Any, checks: list) -> list[str]:
    """On the new corrections (training data, so in-sample) the candidate must be closer to what the experts said."""
    rc, ra = cand.metrics.get("rougeL"), act.metrics.get("rougeL")
    if rc is None or ra is None:
        return []
    n = len(cand.per_example)
    checks.append({"what": f"new corrections, in-sample ({n})", "metric": "rougeL", "candidate": rc, "active": ra})
    if rc < ra - EPS or (rc <= ra + EPS and ra < 1 - EPS):  # better, unless the active already said it all
        return [f"did not learn the new corrections: ROUGE-L on {n} of them (in-sample) {ra:.4f} -> {rc:.4f}"]
    return []


def evaluate_versions(engine: Any, examples: Sequence[Any], versions: Sequence[str], *, batch_size: int, metrics: Sequence[str],
                      generation: Any, synonyms: dict | None = None, progress: bool = True) -> dict[str, Any]:
    """version name -> training.eval.evaluate.Report, each on the same examples."""
    from training.eval.evaluate import evaluate_engine

    return {
        v: evaluate_engine(engine, list(examples), version=v, batch_size=batch_size, metrics=metrics, generation=generation,
                           synonyms=synonyms, progress=progress)
        for v in versions
    }
