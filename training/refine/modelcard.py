"""Model cards and run reports: what a version is, what it learned from, how it did, what it is not for.

`model_card(...)` writes Hugging Face's model-card style (YAML front matter, then
Markdown) as the adapter's README.md; `run_markdown(...)` is the run folder's
report.md; `loss_svg(...)` draws the loss curve without plotting libraries.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Sequence

from training.eval.evaluate import format_value

WARNING = (
    "**Research use only. Not a medical device.** This model's answers are not a diagnosis and must not guide "
    "the care of a patient; every output needs review by a qualified clinician."
)
OFFLINE_WARNING = (
    "**Offline demonstration model.** Built from a tiny randomly initialised model trained for seconds on "
    "synthetic lesion phantoms (coloured shapes, not medical images): its answers carry no clinical meaning."
)


def metrics_table(candidate: dict[str, Any], active: dict[str, Any] | None, names: Sequence[str] | None = None,
                  labels: tuple[str, str] = ("before (active)", "after (this version)")) -> str:
    names = list(names or [k for k in candidate if isinstance(candidate.get(k), (int, float)) or candidate.get(k) is None])
    if active is None:
        rows = "".join(f"| {k} | {format_value(candidate.get(k))} |\n" for k in names)
        return f"| metric | {labels[1]} |\n| --- | --- |\n{rows}"
    rows = "".join(f"| {k} | {format_value(active.get(k))} | {format_value(candidate.get(k))} |\n" for k in names)
    return f"| metric | {labels[0]} | {labels[1]} |\n| --- | --- | --- |\n{rows}"


def model_card(
    *,
    version: str,
    base_model: str,
    parent: str | None,
    status: str,
    decision: dict[str, Any],
    counts: dict[str, Any],
    config: dict[str, Any],
    metrics_candidate: dict[str, Any],
    metrics_active: dict[str, Any] | None,
    active_name: str | None,
    run_id: str,
    eval_n: int,
    offline_demo: bool = False,
    date: datetime | None = None,
) -> str:
    date = date or datetime.now(timezone.utc)
    by_source = counts.get("train_by_source", {})
    tags = ["dermaloop", "lora", "peft", "dermatology", "vision-language", "research-only"]
    front = "---\n" + "".join(
        [
            f"base_model: {json.dumps(base_model)}\n",
            "library_name: peft\n",
            "pipeline_tag: image-text-to-text\n",
            "tags:\n" + "".join(f"- {t}\n" for t in tags),
        ]
    ) + "---\n\n"
    data_rows = "".join(f"| {k} | {v} |\n" for k, v in sorted(by_source.items()))
    data_rows += f"| **total** | {counts.get('train_examples', sum(by_source.values()))} |\n"
    held = (f"Held out for the gate: {eval_n} examples ({counts.get('gold_heldout', 0)} gold pairs whose images are in the "
            f"store's frozen evaluation split, {counts.get('synthetic_heldout', 0)} synthetic).")
    cfg_json = json.dumps(config, indent=2, sort_keys=True, default=str)
    parent_line = f"- Parent version: {parent}\n" if parent else "- Parent version: none (trained from the bare base)\n"
    return (
        front
        + f"# DermaLoop {version}\n\n"
        + (f"> {OFFLINE_WARNING}\n>\n" if offline_demo else "")
        + f"> {WARNING}\n\n"
        + "A LoRA adapter refined by DermaLoop's human-in-the-loop pipeline: expert corrections and accepted answers "
        "from the annotation store, mixed with synthetic question-answer data, trained on answer tokens only.\n\n"
        + "## Model\n\n"
        + f"- Base model: `{base_model}`\n{parent_line}- Status when registered: {status}\n"
        + f"- Training run: {run_id}\n- Date: {date:%Y-%m-%d %H:%M UTC}\n\n"
        + "## Training data\n\n| source | examples |\n| --- | --- |\n" + data_rows + "\n"
        + f"{held}\n\nGold pairs in the store: {counts.get('gold_pairs', 0)} (new since the parent: {counts.get('gold_new', 0)}; "
        f"conflicting corrections: {counts.get('gold_conflicts', 0)}; missing images: {counts.get('gold_missing_images', 0)}).\n\n"
        + "## Evaluation\n\n"
        + metrics_table(metrics_candidate, metrics_active,
                        labels=(f"before ({active_name or 'active'})", f"after ({version})"))
        + f"\nDecision: {decision.get('reason', '')}\n\n" + gate_checks(decision) + "\n"
        + "## Intended use\n\n"
        "Research on human-in-the-loop refinement of small vision-language models for dermatology: answering a "
        "clinician's question about lesion images for study and comparison. Out of scope: any clinical decision, "
        "triage or patient-facing use. Small VLMs overfit into repetitive answers and can name a confident wrong "
        "diagnosis; the metrics above are on a small held-out set and say nothing about safety.\n\n"
        + "## Configuration\n\n```json\n" + cfg_json + "\n```\n"
    )


def loss_svg(losses: Sequence[Sequence[float]], width: int = 640, height: int = 240) -> str:
    """An SVG line chart of (step, loss)."""
    pts = [(float(s), float(v)) for s, v in losses]
    pad = 40
    if not pts:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"></svg>'
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = 0.0, max(p[1] for p in pts) or 1.0
    sx = lambda x: pad + (x - x0) / ((x1 - x0) or 1) * (width - 2 * pad)  # noqa: E731
    sy = lambda y: height - pad - (y - y0) / ((y1 - y0) or 1) * (height - 2 * pad)  # noqa: E731
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">'
        f'<rect width="100%" height="100%" fill="white"/>'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>'
        f'<polyline fill="none" stroke="#1f6feb" stroke-width="1.5" points="{line}"/>'
        f'<text x="{pad}" y="{pad - 8}">training loss (answer tokens); max {y1:.3f}, last {pts[-1][1]:.4f}</text>'
        f'<text x="{width - pad}" y="{height - pad + 16}" text-anchor="end">step {int(x1)}</text>'
        f'<text x="{pad}" y="{height - pad + 16}">step {int(x0)}</text></svg>'
    )


def gate_checks(decision: dict[str, Any]) -> str:
    """Every comparison the gate made (training.eval.gate.Decision.checks), one line each in plain words."""
    lines = []
    for c in decision.get("checks") or []:
        if c.get("summary"):
            lines.append(f"- {c['what']}: {c['summary']}")
        else:
            limit = f" (limit {c['limit']})" if c.get("limit") is not None else ""
            lines.append(f"- {c['what']}: {c['metric']} active {format_value(c.get('active'))}, "
                         f"candidate {format_value(c.get('candidate'))}{limit}")
    return "\n".join(lines) + "\n" if lines else "(no comparison was made)\n"


def run_markdown(report: dict[str, Any]) -> str:
    """The run folder's report.md from the run's report dict (see training.refine.run)."""
    d = report.get("decision") or {}
    c, a = report.get("metrics_candidate") or {}, report.get("metrics_active") or {}
    counts = report.get("counts", {})
    t = report.get("training", {})
    lines = [
        f"# Refine run {report.get('run_id')}",
        "",
        f"- Outcome: **{report.get('outcome')}** {('— ' + d.get('reason', '')) if d else ''}",
        f"- Candidate: {report.get('candidate_version') or 'n/a'}; compared with: {report.get('active_version') or 'n/a'}",
        f"- Base model: `{report.get('base_model')}`; started from: {report.get('init_from') or 'the bare base'}",
        f"- Method: {report.get('method')}; steps: {t.get('steps')}; examples/s: {format_value(t.get('examples_per_s'))}; "
        f"final loss: {format_value(t.get('final_loss'))}; training time: {format_value(t.get('seconds'))} s",
        "",
        "## Data",
        "",
        "| count | value |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in counts.items() if not isinstance(v, dict)],
        *[f"| train: {k} | {v} |" for k, v in (counts.get("train_by_source") or {}).items()],
        "",
        "## Metrics on the held-out set",
        "",
        metrics_table(c, a or None, labels=("active", "candidate")) if c else "(not evaluated)",
        "",
        "## Gate",
        "",
        gate_checks(d),
        "## Loss curve",
        "",
        "![loss](loss.svg)",
        "",
        "| step | loss |",
        "| --- | --- |",
        *[f"| {s} | {v:.4f} |" for s, v in _thin(t.get("losses") or [], 20)],
        "",
    ]
    return "\n".join(lines)


def _thin(points: Sequence, n: int) -> list:
    if len(points) <= n:
        return list(points)
    step = (len(points) - 1) / (n - 1)
    return [points[round(i * step)] for i in range(n)]
