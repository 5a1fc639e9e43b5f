"""Insights, version against version (demo/versus.py): blind pairwise counts with a Wilson interval,
the gate's stored metrics, each refine run's gate report and learning curve; empty states in words.

    python -m pytest -q tests/test_demo_versus.py
"""

from __future__ import annotations

import json

import pytest

from annotation_db import pairwise as pw
from annotation_db import store as st
from demo.insights import Insights
from demo.versus import metrics_table, run_folder, run_report, wilson

from conftest import req


@pytest.mark.parametrize("wins,losses", [(7, 3), (0, 5), (12, 0), (1, 1), (40, 33)])
def test_wilson_interval_agrees_with_the_gate_statistics(wins, losses):
    from training.eval.stats import wilson_interval, win_rate

    rate, low, high = wilson(wins, losses)
    assert rate == pytest.approx(wins / (wins + losses))
    assert (low, high) == pytest.approx(wilson_interval(wins, wins + losses), abs=1e-9)
    gate = win_rate(wins, losses, 4)  # training's gate leaves ties out too
    assert (gate.rate, gate.ci_low, gate.ci_high) == pytest.approx((rate, low, high), abs=1e-9)
    assert wilson(0, 0) == (None, None, None)


def test_empty_insights_say_what_is_missing_in_words(ctx):  # noqa: F811
    words, table, metric_words, metrics, runs, note = Insights(ctx).versus(req("eve"))
    assert "No blind pairwise comparisons yet" in words and "--human-gate" in words
    assert table["visible"] is False and metrics["visible"] is False
    assert "No version has been evaluated" in metric_words and "No refine run folders yet" in note
    assert runs["choices"] == []
    report, curve, note = Insights(ctx).run_report(None, req("eve"))
    assert report == "" and curve["visible"] is False and "No refine run folders yet" in note


def _judge(s, case_id, rater_id, winner):
    first = pw.shown_first(case_id, rater_id).value
    choice = "tie" if winner == "tie" else ("a" if first == winner else "b")
    pw.record_preference(s, case_id, rater_id, choice)


def test_pairwise_counts_and_interval_in_insights(ctx, store):  # noqa: F811
    with store.session() as s:
        v2 = st.register_version(s, base_model="b", adapter_path="models/v2")
        eve, max_ = st.get_or_create_user(s, "eve", "expert").id, st.get_or_create_user(s, "max", "expert").id
        q = pw.add_pairwise_cases(s, [pw.CaseIn(f"Case {i}?", f"cand {i}", f"act {i}") for i in range(6)],
                                  candidate=v2.id, active="v1", batch="b")
        for cid, who, winner in zip(q.case_ids, [eve, eve, eve, max_, max_, max_],
                                    ["candidate", "candidate", "candidate", "active", "tie", "candidate"]):
            _judge(s, cid, who, winner)
    words, table, *_ = Insights(ctx).versus(req("eve"))
    row = table["value"].iloc[0]
    low, high = wilson(4, 1)[1:]
    assert (row["candidate"], row["active"], row["wins"], row["losses"], row["ties"]) == ("v2", "v1", 4, 1, 1)
    assert row["win rate"] == 0.8 and row["95% interval"] == f"{low:.2f} to {high:.2f}"
    assert (row["judged cases"], row["cases"], row["raters"]) == (6, 6, 2)
    assert "preferred v2 in 4 and v1 in 1 of 5" in words and "(1 tie)" in words


def test_gate_metrics_and_a_run_report_with_its_learning_curve(ctx, store, settings):  # noqa: F811
    from training.refine.modelcard import loss_svg, run_markdown

    losses = [[1, 2.5], [2, 1.75], [3, 0.9]]
    report = {"run_id": "20261124-120000-r1", "outcome": "rejected", "candidate_version": "v2", "active_version": "v1",
              "decision": {"promote": False, "forced": False, "reason": "diagnosis_accuracy fell from 0.6 to 0.4",
                           "primary": "diagnosis_accuracy", "candidate": 0.4, "active": 0.6},
              "metrics_candidate": {"diagnosis_accuracy": 0.4, "rougeL": 0.31}, "metrics_active": {"diagnosis_accuracy": 0.6,
                                                                                                    "rougeL": 0.3},
              "training": {"steps": 3, "losses": losses, "final_loss": 0.9}, "counts": {"train_examples": 8}}
    folder = settings.runs_dir / report["run_id"]
    folder.mkdir(parents=True)
    (folder / "report.md").write_text(run_markdown(report), encoding="utf-8")
    (folder / "loss.svg").write_text(loss_svg(losses), encoding="utf-8")
    (folder / "loss.csv").write_text("step,loss\n" + "".join(f"{a},{b}\n" for a, b in losses), encoding="utf-8")
    with store.session() as s:
        run = st.start_training_run(s, {})
        st.finish_training_run(s, run.id, status="completed", report=json.loads(json.dumps(report)))
        record = {"candidate": report["metrics_candidate"], "active": report["metrics_active"], "compared_with": "v1",
                  "eval_n": 25, "decision": report["decision"]}
        v2 = st.register_version(s, base_model="b", adapter_path="models/v2", training_run_id=run.id, metrics=record)
        st.reject(s, v2.id, report["decision"]["reason"])
        table = metrics_table(s)
    assert list(table["metric"]) == ["★ diagnosis_accuracy", "rougeL"]
    first = table.iloc[0]
    assert (first["version"], first["compared with"], first["held-out n"], first["before"], first["after"]) == ("v2", "v1", 25, 0.6, 0.4)
    assert first["change"] == pytest.approx(-0.2)

    _words, _t, metric_words, metrics, runs, _note = Insights(ctx).versus(req("eve"))
    assert metric_words == "" and metrics["visible"] is True
    assert runs["choices"] == [(f"run {run.id}: v2 rejected ({report['run_id']})", report["run_id"])]
    assert runs["value"] == report["run_id"]
    md, curve, note = Insights(ctx).run_report(report["run_id"], req("eve"))
    assert "# Refine run 20261124-120000-r1" in md and "diagnosis_accuracy fell" in md
    assert "![loss]" not in md and "plotted beside" in md
    assert curve["visible"] is True and list(curve["value"]["loss"]) == [2.5, 1.75, 0.9]
    assert "report.md" in note and "loss.svg" in note
    runs_table = Insights(ctx).data()["runs"]
    assert runs_table.iloc[0]["report"] == f"runs/{report['run_id']}/report.md"
    assert runs_table.iloc[0]["gate metric"] == "diagnosis_accuracy"

    (folder / "loss.csv").write_text("step,loss\n1,2.0\n", encoding="utf-8")  # a one-step run: no one-point line
    md, curve, note = run_report(settings.runs_dir, report["run_id"])
    assert len(curve) == 1 and "two logged steps" in note


def test_run_folders_never_leave_the_runs_directory(settings, tmp_path):  # noqa: F811
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    (settings.runs_dir.parent / "secret").mkdir(exist_ok=True)
    for bad in ("../secret", "..", "/etc", "a/../../secret", ""):
        assert run_folder(settings.runs_dir, bad) is None
    md, curve, note = run_report(settings.runs_dir, "../secret")
    assert md == "" and "not in" in note
