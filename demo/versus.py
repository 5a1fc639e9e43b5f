"""Insights: version against version (blind pairwise review and the gate's stored metrics), and each
refine run's gate report with its learning curve. Pure functions over a session or the run folders;
`demo.insights.Insights` calls them and the Insights tab shows them.

- `pairwise_table(s)`: per (candidate, active) the experts' wins, losses and ties, the candidate's win
  rate (ties excluded: a tie says nothing about which is better, as in training's gate) and its 95 %
  Wilson interval (`scipy.stats.binomtest(...).proportion_ci(method="wilson")`).
- `metrics_table(s)`: each evaluated version against the version it was compared with, metric by
  metric, from `model_versions.metrics` (written by `python -m training.refine`).
- `run_report(runs_dir, run_id)`: `<home>/runs/<run-id>/report.md` and the learning curve from
  `loss.csv` (`loss.svg` is the same curve drawn for the model card).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from annotation_db import pairwise as pw
from annotation_db import store as st
from demo.common import model_markdown

CONFIDENCE = 0.95
PAIRWISE_COLUMNS = ["candidate", "active", "wins", "losses", "ties", "win rate", "95% interval", "judged cases",
                    "cases", "raters"]
METRIC_COLUMNS = ["version", "compared with", "held-out n", "metric", "before", "after", "change"]


def wilson(wins: int, losses: int, confidence: float = CONFIDENCE) -> tuple[float | None, float | None, float | None]:
    """(win rate, low, high) with ties left out; (None, None, None) when nothing was decided."""
    from scipy.stats import binomtest

    n = wins + losses
    if n == 0:
        return None, None, None
    ci = binomtest(wins, n).proportion_ci(confidence_level=confidence, method="wilson")
    return wins / n, float(ci.low), float(ci.high)


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, digits)


def pairwise_table(s: Any) -> pd.DataFrame:
    rows = []
    for x in pw.pairwise_summary(s):
        rate, low, high = wilson(x.wins, x.losses)
        rows.append({"candidate": x.candidate, "active": x.active, "wins": x.wins, "losses": x.losses, "ties": x.ties,
                     "win rate": _r(rate), "95% interval": "" if low is None else f"{low:.2f} to {high:.2f}",
                     "judged cases": x.judged_cases, "cases": x.cases, "raters": x.raters})
    return pd.DataFrame(rows, columns=PAIRWISE_COLUMNS)


def pairwise_words(table: pd.DataFrame) -> str:
    """The table in one sentence per pair, or what is missing."""
    if table.empty:
        return ("No blind pairwise comparisons yet: `python -m training.refine --human-gate N` queues a candidate's "
                "and the active version's answers to the same cases, and experts judge them in Review → "
                "*Compare two answers*.")
    lines = []
    for _, r in table.iterrows():
        judged = r["wins"] + r["losses"] + r["ties"]
        if judged == 0:
            lines.append(f"- **{r['candidate']} vs {r['active']}**: {_n(r['cases'], 'case')} queued, none judged yet.")
        elif r["win rate"] is None or pd.isna(r["win rate"]):
            lines.append(f"- **{r['candidate']} vs {r['active']}**: {_n(r['ties'], 'tie')} only; no win rate yet.")
        else:
            lines.append(f"- **{r['candidate']} vs {r['active']}**: experts preferred {r['candidate']} in {r['wins']} and "
                         f"{r['active']} in {r['losses']} of {r['wins'] + r['losses']} decided comparisons "
                         f"({_n(r['ties'], 'tie')}): win rate {r['win rate']:.2f}, 95 % interval {r['95% interval']}.")
    return "\n".join(lines)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _numbers(d: Any) -> dict[str, float]:
    if not isinstance(d, dict):
        return {}
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))}


def metrics_table(s: Any) -> pd.DataFrame:
    """One row per (evaluated version, metric): the compared version's value, this version's, the change.
    The metric that decided the gate is marked ★."""
    rows = []
    for v in st.list_versions(s):
        m = v.metrics if isinstance(v.metrics, dict) else {}
        after, before = _numbers(m.get("candidate")), _numbers(m.get("active"))
        if not after:
            continue
        decision = m.get("decision") if isinstance(m.get("decision"), dict) else {}
        primary = decision.get("primary") or decision.get("metric")
        for name in sorted(after, key=lambda k: (k != primary, k)):
            b = before.get(name)
            rows.append({"version": v.name, "compared with": str(m.get("compared_with") or ""),
                         "held-out n": m.get("eval_n"), "metric": f"★ {name}" if name == primary else name,
                         "before": _r(b, 4), "after": _r(after[name], 4),
                         "change": None if b is None else _r(after[name] - b, 4)})
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def run_folder(runs_dir: Path, run_id: str) -> Path | None:
    """The run's folder under `runs_dir`, never outside it (the id comes from the store)."""
    if not run_id or "/" in run_id or "\\" in run_id or run_id in (".", ".."):
        return None
    folder = (Path(runs_dir) / run_id).resolve()
    return folder if folder.parent == Path(runs_dir).resolve() and folder.is_dir() else None


def run_choices(s: Any, runs_dir: Path) -> list[tuple[str, str]]:
    """(label, run folder name) of every training run whose folder is there, newest first."""
    out = []
    for run in sorted(st.list_training_runs(s) if hasattr(st, "list_training_runs") else
                      [v.training_run for v in st.list_versions(s) if v.training_run is not None],
                      key=lambda r: r.id, reverse=True):
        report = run.report if isinstance(run.report, dict) else {}
        rid = str(report.get("run_id") or "")
        if run_folder(runs_dir, rid) is not None:
            outcome = report.get("outcome") or run.status.value
            version = report.get("candidate_version")
            out.append((f"run {run.id}: {version + ' ' if version else ''}{outcome} ({rid})", rid))
    return out


def run_report(runs_dir: Path, run_id: str) -> tuple[str, pd.DataFrame, str]:
    """(the gate report as safe Markdown, the learning curve as (step, loss) rows, a note in words)."""
    empty = pd.DataFrame(columns=["step", "loss"])
    folder = run_folder(runs_dir, run_id)
    if folder is None:
        return "", empty, "Choose a refine run to see its gate report and learning curve." if not run_id else \
            f"The folder of run {run_id} is not in {runs_dir}."
    md_path, csv_path = folder / "report.md", folder / "loss.csv"
    report = md_path.read_text(encoding="utf-8") if md_path.is_file() else ""
    # Our own Markdown, rendered safely all the same; the SVG image link would not resolve in the page.
    report = model_markdown(report.replace("![loss](loss.svg)", "_(plotted beside this report)_"))
    notes = [f"Gate report: `{md_path}`" if report else f"No report.md in `{folder}`: the run did not finish."]
    curve = empty
    if csv_path.is_file():
        try:
            curve = pd.read_csv(csv_path)[["step", "loss"]].dropna()
        except (ValueError, KeyError, pd.errors.ParserError):
            notes.append(f"`{csv_path.name}` cannot be read.")
    if len(curve) < 2:
        notes.append("The learning curve needs two logged steps or more; this run logged "
                     f"{len(curve)}." if csv_path.is_file() else "No loss.csv: no learning curve for this run.")
    else:
        notes.append(f"Learning curve: `{csv_path}` (also drawn in `{folder / 'loss.svg'}`).")
    return report, curve, "\n".join(f"- {n}" for n in notes)
