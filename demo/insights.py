"""Insights: how each model version does, how much raters agree, what refinement did.

`Insights(ctx).refresh` returns the tables and plot data (pandas DataFrames for
gr.BarPlot / gr.LinePlot / gr.Dataframe), `.versus` version against version (blind
pairwise review with a Wilson interval, the gate's metrics; `demo.versus`),
`.run_report` a refine run's gate report and learning curve, `.export` writes the store through
`annotation_db.export` into a fresh temporary folder and returns the files to
download, `.rollback` (admins only) re-activates an earlier version.
"""

import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from annotation_db import export as exporter
from annotation_db import store as st
from core.errors import InputError
from demo.common import Ctx, admit, user_errors

EXPORT_FORMATS = ("csv", "jsonl", "parquet")
SHARES = [("share_corrected", "corrected"), ("share_unsafe", "unsafe"), ("share_hallucination", "hallucination"),
          ("thumbs_up_share", "thumbs up")]
NO_RUNS = "No refine run folders yet: each run's gate report and learning curve appear here after `python -m training.refine`."
RUN_COLUMNS = ["run", "started", "status", "version", "outcome", "gate metric", "active", "candidate", "reason", "pairs",
               "report"]


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return None if pd.isna(value) else round(value, 3)
    return value


def refine_history(s) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per training run: outcome, the gate's metric for active and candidate, reason, pairs;
    long-form points for the plot: run, series (active / candidate), value)."""
    lister = getattr(st, "list_training_runs", None)
    produced = {v.training_run_id: v for v in st.list_versions(s) if v.training_run_id is not None}
    runs = list(lister(s)) if lister else [v.training_run for v in produced.values() if v.training_run is not None]
    rows, points = [], []
    for run in sorted(runs, key=lambda r: r.id):
        version = produced.get(run.id)
        report = run.report if isinstance(run.report, dict) else {}
        decision = report.get("decision") if isinstance(report.get("decision"), dict) else {}
        if not decision and version is not None and isinstance(version.metrics, dict):
            decision = version.metrics.get("decision") or {}
        outcome = report.get("outcome") or (version.status.value if version is not None else run.status.value)
        counts = run.counts if isinstance(run.counts, dict) else {}
        rows.append({
            "run": run.id,
            "started": run.created_at.strftime("%Y-%m-%d %H:%M") if run.created_at else "",
            "status": run.status.value,
            "version": version.name if version is not None else "",
            "outcome": str(outcome),
            "gate metric": decision.get("primary") or decision.get("metric") or "",
            "active": _fmt(decision.get("active")),
            "candidate": _fmt(decision.get("candidate")),
            "reason": decision.get("reason") or report.get("reason") or "",
            "pairs": ", ".join(f"{k}: {v}" for k, v in counts.items() if not isinstance(v, (dict, list))),
            "report": f"runs/{report['run_id']}/report.md" if report.get("run_id") else "",  # under the data folder
        })
        for series in ("active", "candidate"):
            if isinstance(decision.get(series), (int, float)):
                points.append({"run": f"run {run.id}", "series": series, "value": float(decision[series]),  # categorical: no "1.000000" axis
                               "metric": decision.get("primary") or decision.get("metric") or ""})
    return pd.DataFrame(rows, columns=RUN_COLUMNS), pd.DataFrame(points, columns=["run", "series", "value", "metric"])


def versions_table(s) -> pd.DataFrame:
    rows = [{"version": v.name, "status": v.status.value, "adapter": v.adapter_path or "(base)",
             "created": v.created_at.strftime("%Y-%m-%d %H:%M") if v.created_at else "",
             "reason": v.status_reason or ""} for v in st.list_versions(s)]
    return pd.DataFrame(rows, columns=["version", "status", "adapter", "created", "reason"])


def plot(df: pd.DataFrame, show: bool) -> Any:
    return gr.update(value=df, visible=bool(show))


def empty_states(d: dict[str, Any], total: int) -> list[str]:
    """What is missing, in words, instead of empty plot frames."""
    lines = []
    if total == 0:
        lines.append("No answers yet: ask a question in the Consult tab.")
    elif d["scores"].empty:
        lines.append("No expert ratings yet: scores and shares appear after the first review (Review tab).")
    if len(d["trend"]) and d["trend"]["period"].nunique() < 2:
        lines.append("The trend over time appears once ratings span two days or more.")
    if d["runs"].empty:
        lines.append("No refinement yet: `python -m training.refine` trains on the corrections and reports here.")
    return lines


class Insights:
    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self._export_root: Path | None = None  # one temporary folder per app, removed when the app ends

    def _export_dir(self, request: Any) -> Path:
        """This session's export folder, emptied first: an export replaces that session's previous one, so
        clinical exports never pile up (in the temp dir, where Gradio may serve files from)."""
        import hashlib
        import shutil
        import weakref

        if self._export_root is None or not self._export_root.is_dir():
            self._export_root = Path(tempfile.mkdtemp(prefix="dermaloop-export-"))
            weakref.finalize(self, shutil.rmtree, str(self._export_root), ignore_errors=True)
        session = getattr(request, "session_hash", None) or "direct"
        out = self._export_root / hashlib.sha256(str(session).encode()).hexdigest()[:16]
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        return out

    def data(self) -> dict[str, Any]:
        """Every figure of the tab, as DataFrames (handy for tests and the API alike)."""
        with self.ctx.store.session() as s:
            by_version = st.stats_by_version(s)
            over_time = st.stats_over_time(s, "D")
            agreement = st.agreement(s)
            runs, run_points = refine_history(s)
            versions = versions_table(s)
        table = by_version.drop(columns=["version_id"]).map(_fmt)
        scores = by_version[["version", "mean_score", "answers"]].dropna(subset=["mean_score"])
        shares = pd.DataFrame(
            [{"bar": f"{r['version']} {label}", "version": r["version"], "measure": label, "share": float(r[col])}
             for _, r in by_version.iterrows() for col, label in SHARES if pd.notna(r[col])],
            columns=["bar", "version", "measure", "share"],  # one bar each: no stacking
        )
        trend = over_time[["period", "version", "mean_score"]].dropna() if len(over_time) else pd.DataFrame(
            columns=["period", "version", "mean_score"])
        agree = pd.DataFrame([{"measure": k.replace("_", " "), "value": _fmt(v) if v is not None else "n/a"}
                              for k, v in agreement.items()], columns=["measure", "value"])
        return {"table": table, "scores": scores, "shares": shares, "trend": trend, "agreement": agree,
                "runs": runs, "run_points": run_points, "versions": versions}

    def refresh(self, request: gr.Request) -> tuple:
        """Outputs: table, mean score plot, shares plot, trend plot, agreement, runs, runs plot, versions,
        rollback choices, summary."""
        with user_errors():
            who = self.ctx.auth.identify(request)
            d = self.data()
        total = int(d["table"]["answers"].sum()) if len(d["table"]) else 0
        rated = int(d["table"]["rated_answers"].sum()) if len(d["table"]) else 0
        summary = f"**{total}** answers recorded, **{rated}** with expert ratings; serving model **{self.ctx.runtime.version}**."
        empty = empty_states(d, total)
        if empty:
            summary += "\n\n" + "\n".join(f"- {line}" for line in empty)
        choices = list(d["versions"]["version"])
        # A plot with nothing (or one point) to show is hidden; the summary says why, in words.
        return (d["table"], plot(d["scores"], len(d["scores"]) >= 1), plot(d["shares"], len(d["shares"]) >= 1),
                plot(d["trend"], d["trend"]["period"].nunique() >= 2 if len(d["trend"]) else False), d["agreement"], d["runs"],
                plot(d["run_points"], len(d["run_points"]) >= 1), d["versions"],
                gr.update(choices=choices, value=None, interactive=who.is_admin), summary)

    def versus(self, request: gr.Request) -> tuple:
        """Outputs: pairwise words, pairwise table, metrics words, metrics table, run choices (refine runs
        with a folder), run report note."""
        from demo.versus import metrics_table, pairwise_table, pairwise_words, run_choices

        with user_errors():
            self.ctx.auth.identify(request)
            with self.ctx.store.session() as s:
                pairs, metrics = pairwise_table(s), metrics_table(s)
                runs = run_choices(s, self.ctx.settings.runs_dir)
        metrics_words = ("" if len(metrics) else "No version has been evaluated against another yet: "
                         "`python -m training.refine` compares each candidate with the active version on the held-out set.")
        note = "" if runs else NO_RUNS
        return (pairwise_words(pairs), plot(pairs, len(pairs) >= 1), metrics_words, plot(metrics, len(metrics) >= 1),
                gr.update(choices=runs, value=runs[0][1] if runs else None), note)

    def run_report(self, run_id: str | None, request: gr.Request) -> tuple:
        """Outputs: the gate report (Markdown), the learning curve plot, a note in words."""
        from demo.versus import run_choices, run_report

        with user_errors():
            self.ctx.auth.identify(request)
            report, curve, note = run_report(self.ctx.settings.runs_dir, run_id or "")
            if not run_id:
                with self.ctx.store.session() as s:
                    if not run_choices(s, self.ctx.settings.runs_dir):
                        note = NO_RUNS
        return report, plot(curve, len(curve) >= 2), note

    def export(self, fmt: str, request: gr.Request) -> list[str]:
        """Write the store as `fmt` files (turns, ratings, gold pairs, preference pairs) for download."""
        with user_errors():
            who = self.ctx.auth.require_rater(request)
            admit(self.ctx, who, request)
            if fmt not in EXPORT_FORMATS:
                raise InputError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
            out = self._export_dir(request)
            counts = exporter.export(self.ctx.store, fmt, out)
            prefix = self.ctx.links.prefix(who.name)  # only this user (and admins) may download, for an hour
            files = [p.rename(p.with_name(prefix + p.name)) for p in sorted(out.iterdir()) if p.is_file()]
        gr.Info("Exported " + ", ".join(f"{n} {t}" for t, n in counts.items()))
        return [str(p) for p in files]

    def rollback(self, version: str, reason: str, request: gr.Request) -> str:
        """Admins only: make an earlier version active again (the current one is marked rejected)."""
        with user_errors():
            who = self.ctx.auth.require_admin(request)
            if not version:
                raise InputError("choose the version to roll back to")
            with self.ctx.store.session() as s:
                v = st.rollback(s, version, reason=(reason or "").strip() or f"rolled back by {who.name}")
                name = v.name
            served = self.ctx.runtime.sync(force=True)
        gr.Info(f"{name} is the active version again")
        return f"✅ {name} is active again (now serving {served})."
