"""Statistics for the promotion gate: paired candidate-vs-active comparisons, A/B win rates, copying.

    from training.eval.stats import compare_paired, win_rate, copy_rate
    c = compare_paired(cand_per_example, active_per_example, metric="diagnosis_accuracy", tolerance=0.05, seed=0)
    c.status      # Status.BETTER | NON_INFERIOR | WORSE | TOO_FEW
    c.summary()   # 'diagnosis accuracy: candidate 0.62 vs active 0.55 on 48 cases, difference +0.07 (95% CI -0.02 to +0.16): ...'
    win_rate(wins=14, losses=6, ties=4).summary()
    copy_rate(heldout_answers, training_targets, references=heldout_references).rate

Why paired: both versions answer the *same* held-out cases, so the per-case
difference removes the case-to-case variation (a hard case is hard for both). The
interval is scipy's bootstrap (`paired=True`, BCa, seeded) of the mean difference;
non-inferiority (Status.NON_INFERIOR) means the interval's lower bound is above
-tolerance: the candidate is shown to be not worse by more than the tolerance.
Nothing here reads files or the store; the gate passes per-example values in.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

import numpy as np
from scipy import stats as sps

# Below this many paired cases no decision is made (Status.TOO_FEW). Why 30:
# - granularity: on a 0/1 metric one case moves the mean by 1/n; at n=30 that is 0.033,
#   below the usual tolerance of 0.05, so a single case cannot decide the gate alone;
# - the bootstrap interval needs enough distinct resamples to mean anything; below a
#   few dozen cases percentile/BCa intervals are known to undercover (too narrow);
# - power, said plainly: with 20 % discordant cases (sd of the 0/1 difference ~0.45),
#   showing non-inferiority at a 0.05 margin with 80 % power needs about
#   ((1.96 + 0.84) * 0.45 / 0.05)^2 ~ 635 cases (`cases_needed`). At 30-100 cases the
#   interval is +-0.09 to +-0.16 wide: only a clearly better or nearly identical
#   candidate passes, which is the honest outcome; the report shows n and the interval.
MIN_PAIRED_N = 30
CONFIDENCE = 0.95


class Status(str, Enum):
    BETTER = "better"  # the whole interval is above zero
    NON_INFERIOR = "non_inferior"  # lower bound above -tolerance
    WORSE = "worse"  # lower bound at or below -tolerance (not shown non-inferior)
    TOO_FEW = "too_few"  # n < min_n: no decision


@dataclass(frozen=True)
class PairedComparison:
    metric: str
    n: int  # cases where both versions have a value
    candidate_mean: float | None
    active_mean: float | None
    difference: float | None  # candidate - active (raw units)
    ci_low: float | None  # interval of candidate - active
    ci_high: float | None
    tolerance: float
    higher_is_better: bool
    status: Status
    confidence: float = CONFIDENCE
    min_n: int = MIN_PAIRED_N
    seed: int = 0

    @property
    def shown_worse(self) -> bool:
        """The whole interval is beyond the tolerance on the bad side: worse, not merely unproven."""
        if self.ci_low is None or self.ci_high is None:
            return False
        return self.ci_high < -self.tolerance if self.higher_is_better else self.ci_low > self.tolerance

    @property
    def promotes(self) -> bool:
        return self.status in (Status.BETTER, Status.NON_INFERIOR)

    def summary(self) -> str:
        """One line in plain words."""
        name = self.metric.replace("_", " ") + ("" if self.higher_is_better else " (lower is better)")
        if self.n == 0 or self.difference is None:
            return f"{name}: no case has a value for both versions; no decision"
        head = f"{name}: candidate {self.candidate_mean:.2f} vs active {self.active_mean:.2f} on {self.n} case{'s' * (self.n != 1)}"
        if self.status is Status.TOO_FEW:
            return f"{head}, difference {self.difference:+.2f}: too few cases to decide (at least {self.min_n} needed)"
        pct = f"{self.confidence * 100:g}%"
        interval = f"difference {self.difference:+.2f} ({pct} CI {self.ci_low:+.2f} to {self.ci_high:+.2f})"
        tol = f"{self.tolerance:g}"
        words = {
            Status.BETTER: "better (the whole interval is on the better side of zero)",
            Status.NON_INFERIOR: f"not worse by more than {tol}",
        }.get(self.status)
        if words is None:
            bound = self.ci_low if self.higher_is_better else self.ci_high
            words = (f"worse by more than {tol}" if self.shown_worse
                     else f"may be worse by more than {tol} (the interval reaches {bound:+.2f}); not shown non-inferior")
        return f"{head}, {interval}: {words}"


def compare_paired(
    candidate: Sequence[float | bool | None],
    active: Sequence[float | bool | None],
    *,
    metric: str = "metric",
    tolerance: float = 0.05,
    higher_is_better: bool = True,
    confidence: float = CONFIDENCE,
    n_resamples: int = 9999,
    seed: int = 0,
    min_n: int = MIN_PAIRED_N,
) -> PairedComparison:
    """Mean paired difference (candidate - active) with a seeded bootstrap interval, and the non-inferiority status.

    `candidate[i]` and `active[i]` are the two versions' values on case i (None = not scored, dropped pairwise).
    """
    assert len(candidate) == len(active), "paired values must cover the same cases"
    assert tolerance >= 0 and 0 < confidence < 1
    pairs = [(float(c), float(a)) for c, a in zip(candidate, active) if c is not None and a is not None]
    cand = np.array([c for c, _ in pairs], dtype=float)
    act = np.array([a for _, a in pairs], dtype=float)
    common = dict(metric=metric, n=len(pairs), tolerance=tolerance, higher_is_better=higher_is_better, confidence=confidence,
                  min_n=min_n, seed=seed)
    if not pairs:
        return PairedComparison(candidate_mean=None, active_mean=None, difference=None, ci_low=None, ci_high=None,
                                status=Status.TOO_FEW, **common)
    diff = float(cand.mean() - act.mean())
    means = dict(candidate_mean=float(cand.mean()), active_mean=float(act.mean()), difference=diff)
    if len(pairs) < min_n:
        return PairedComparison(ci_low=None, ci_high=None, status=Status.TOO_FEW, **means, **common)
    low, high = _paired_interval(cand, act, confidence, n_resamples, seed)
    worst = low if higher_is_better else -high  # the bad-side bound, oriented so that higher is better
    best_side = low > 0 if higher_is_better else high < 0
    status = Status.BETTER if best_side else Status.NON_INFERIOR if worst > -tolerance else Status.WORSE
    return PairedComparison(ci_low=low, ci_high=high, status=status, **means, **common)


def _paired_interval(cand: np.ndarray, act: np.ndarray, confidence: float, n_resamples: int, seed: int) -> tuple[float, float]:
    d = cand - act
    if np.ptp(d) == 0:  # every case moved by the same amount: no sampling variation to resample
        return float(d[0]), float(d[0])

    def mean_diff(c, a, axis=-1):
        return np.mean(c, axis=axis) - np.mean(a, axis=axis)

    def run(method: str):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa warns on near-degenerate data; the fallback below handles it
            res = sps.bootstrap((cand, act), mean_diff, paired=True, vectorized=True, n_resamples=n_resamples,
                                confidence_level=confidence, method=method, rng=np.random.default_rng(seed))
        return float(res.confidence_interval.low), float(res.confidence_interval.high)

    low, high = run("BCa")
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = run("percentile")  # BCa's acceleration is undefined when the jackknife values are all equal
    return low, high


def cases_needed(sd: float, tolerance: float, *, true_difference: float = 0.0, alpha: float = 0.025, power: float = 0.8) -> int:
    """Paired cases needed to show non-inferiority at `tolerance` (one-sided alpha, normal approximation)."""
    assert sd >= 0 and tolerance > 0 and tolerance + true_difference > 0
    z = sps.norm.ppf(1 - alpha) + sps.norm.ppf(power)
    return max(1, math.ceil((z * sd / (tolerance + true_difference)) ** 2))


# -------------------------------------------------------------------- pairwise preferences
@dataclass(frozen=True)
class WinRate:
    wins: int  # candidate preferred
    losses: int  # active preferred
    ties: int
    ties_as: str  # "excluded" (rate over decisive comparisons) or "half" (a tie counts half a win)
    rate: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float = CONFIDENCE

    @property
    def n(self) -> int:
        return self.wins + self.losses + (self.ties if self.ties_as == "half" else 0)

    def summary(self) -> str:
        total = self.wins + self.losses + self.ties
        if self.rate is None:
            return f"blind pairwise review: {total} comparison(s), none decisive; no win rate"
        how = "ties excluded" if self.ties_as == "excluded" else "ties counted as half a win"
        return (f"blind pairwise review: candidate preferred {self.wins}, active {self.losses}, ties {self.ties}; "
                f"win rate {self.rate:.2f} ({self.confidence * 100:g}% Wilson CI {self.ci_low:.2f} to {self.ci_high:.2f}; {how})")


def wilson_interval(successes: float, n: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for a proportion (Wilson 1927); `successes` may be fractional (half ties)."""
    assert n > 0 and 0 <= successes <= n
    z = float(sps.norm.ppf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(wins: int, losses: int, ties: int = 0, *, ties_as: str = "excluded", confidence: float = CONFIDENCE) -> WinRate:
    """The candidate's win rate in blind A/B review, with a Wilson interval.

    Default `ties_as="excluded"` (the sign-test convention: a tie says nothing about which is better,
    and counting it as half a win would narrow the interval without information); "half" is offered
    for comparison with arena-style reports.
    """
    if ties_as not in ("excluded", "half"):
        raise ValueError(f"ties_as must be 'excluded' or 'half', not {ties_as!r}")
    assert min(wins, losses, ties) >= 0
    succ, n = (wins, wins + losses) if ties_as == "excluded" else (wins + ties / 2, wins + losses + ties)
    if n == 0:
        return WinRate(wins, losses, ties, ties_as, None, None, None, confidence)
    low, high = wilson_interval(succ, n, confidence)
    return WinRate(wins, losses, ties, ties_as, succ / n, low, high, confidence)


def win_rate_from(preferences: Sequence[str], **kwargs) -> WinRate:
    """`preferences`: one of 'candidate', 'active', 'tie' per comparison (after un-blinding A/B)."""
    counts = Counter(preferences)
    unknown = set(counts) - {"candidate", "active", "tie"}
    if unknown:
        raise ValueError(f"unknown preference value(s) {sorted(unknown)}; use candidate, active or tie")
    return win_rate(counts["candidate"], counts["active"], counts["tie"], **kwargs)


# -------------------------------------------------------------------- copying
@dataclass(frozen=True)
class CopyResult:
    rate: float | None  # share of (non-empty) answers that copy a training target
    n: int
    copied: tuple[bool | None, ...]  # per answer (None = empty answer, not counted)
    nearest: tuple[int | None, ...]  # index of the most similar training target per answer
    most_copied_target: str | None
    most_copied_count: int
    threshold: float

    def summary(self) -> str:
        if self.rate is None:
            return "copying: no answers"
        top = f"; the most copied training answer ({self.most_copied_count}x): \"{self.most_copied_target[:120]}\"" if self.most_copied_count else ""
        return f"copying: {self.rate:.2f} of {self.n} held-out answers are near-identical to a training target (ratio >= {self.threshold:g}){top}"


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, one space: the text compared for copying (as the repetition metric)."""
    return " ".join(re.sub(r"[^\w\s]", " ", (text or "").lower()).split())


def copy_rate(
    answers: Sequence[str],
    training_targets: Sequence[str],
    *,
    threshold: float = 90.0,
    references: Sequence[Sequence[str] | str] | None = None,
) -> CopyResult:
    """Share of held-out answers near-identical (rapidfuzz ratio >= threshold, 0-100) to some training target.

    The MEDIQA-MAGIC 2024 failure: a fine-tuned small VLM answered 10 of 78 test images with a copy
    of one training answer. When `references` (each answer's own reference answers) are given, an
    answer that is also near-identical to its own reference is not counted: a correct templated
    answer ("Most likely psoriasis.") is expected to look like training targets of the same class.
    """
    from rapidfuzz import fuzz, process

    targets = [normalise(t) for t in training_targets]
    copied: list[bool | None] = []
    nearest: list[int | None] = []
    hits: Counter = Counter()
    for i, answer in enumerate(answers):
        a = normalise(answer)
        if not a:
            copied.append(None)
            nearest.append(None)
            continue
        best = process.extractOne(a, targets, scorer=fuzz.ratio) if targets else None
        nearest.append(best[2] if best else None)
        is_copy = bool(best and best[1] >= threshold)
        if is_copy and references is not None:
            own = references[i]
            own = [own] if isinstance(own, str) else list(own)
            is_copy = not any(fuzz.ratio(a, normalise(r)) >= threshold for r in own)
        copied.append(is_copy)
        if is_copy:
            hits[best[2]] += 1
    counted = [c for c in copied if c is not None]
    top, count = hits.most_common(1)[0] if hits else (None, 0)
    return CopyResult(sum(counted) / len(counted) if counted else None, len(counted), tuple(copied), tuple(nearest),
                      training_targets[top] if top is not None else None, count, threshold)
