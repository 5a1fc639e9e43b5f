"""The end of a refine run: the gate's evaluation, then the candidate's registration in one transaction.

`gate_and_register` is called by `training.refine.run.run_refine` in the main process
once the adapter is saved:

1. `evaluate_candidate`: the candidate and the active version answer the held-out cases
   (and, in-sample, the new corrections), and `training.eval.gate.decide` says whether to
   promote and why (paired bootstrap intervals, subgroups, repetition, copying).
2. `register`: the adapter is copied under a temporary name and renamed into
   `<home>/models/<version>/` with its model card; then one store transaction records the
   run, its lineage and the version, promoted or rejected. A kill before the commit leaves
   no registered version (the `.tmp-*` copy is removed by the next run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from core.config import Settings
from training.errors import TrainingError
from training.refine.config import RefineConfig
from training.refine.human_gate import batch_name, queue
from training.refine.run import Outcome, RunPlan, Status, _read_json, _write_json

IN_SAMPLE_MAX = 32  # new corrections re-asked in-sample: enough to see learning, cheap beside the held-out set


@dataclasses.dataclass
class GateResult:
    decision: Any  # training.eval.gate.Decision
    active_name: str  # what the candidate was compared with, in words
    reports: dict[str, Any]  # version name -> Report on the held-out cases ("in-sample:<name>" on the new corrections)
    active_key: str = "base"  # the active version's key in `reports`

    def metrics(self, which: str) -> dict[str, Any]:
        rep = self.reports.get("candidate" if which == "candidate" else self.active_key)
        return rep.metrics if rep is not None else {}


def gate_and_register(db: Any, settings: Settings, cfg: RefineConfig, run: RunPlan, result: Any, adapter_dir: Path, *,
                      force: bool, progress: bool, device: str, out: Callable[[str], None]) -> Outcome:
    from annotation_db import store as st
    from training.refine.data import DataPlan

    plan = DataPlan.from_json((run.run_dir / "data.json").read_text(encoding="utf-8"))
    with db.session() as s:
        active = st.active_version(s)
        active_info = None if active is None else {"name": active.name, "base": active.base_model, "adapter": active.adapter_path}
    gate = evaluate_candidate(settings, cfg, run, plan, adapter_dir, active_info, force=force, progress=progress,
                              device=device, out=out)
    for name, rep in gate.reports.items():
        rep.save(run.run_dir / "eval" / name.replace(":", "-"))
    return register(db, settings, cfg, run, plan, result, adapter_dir, gate)


def evaluate_candidate(settings: Settings, cfg: RefineConfig, run: RunPlan, plan: Any, adapter_dir: Path,
                       active_info: dict | None, *, force: bool, progress: bool, device: str,
                       out: Callable[[str], None]) -> GateResult:
    """Both versions answer the held-out cases and the new corrections; the gate decides."""
    from core.engine import Engine
    from core.errors import ModelLoadError
    from core.models import load_model
    from training.eval.gate import decide, evaluate_versions, no_heldout_decision

    gen = dataclasses.replace(settings.generation(), max_new_tokens=cfg.eval_max_new_tokens, do_sample=False)
    metrics = [m for m in cfg.eval_metrics.split(",") if m]
    if "rouge" not in metrics:
        metrics.append("rouge")  # the in-sample check reads ROUGE-L
    engines: dict[str, Engine] = {}

    def engine_for(base: str) -> Engine:
        if base not in engines:
            engines[base] = Engine(load_model(base, device=device, dtype=settings.dtype, image_splitting=settings.image_splitting,
                                              longest_edge=settings.longest_edge, trust_remote_code=settings.trust_remote_code,
                                              quantize=settings.quantize, device_map=settings.device_map), settings)
        return engines[base]

    active_name = active_info["name"] if active_info else "base"
    cand_engine = engine_for(run.base)
    cand_engine.add_adapter("candidate", adapter_dir)
    act_engine, act_version = cand_engine, "base"
    if active_info is not None:
        try:
            act_engine = engine_for(active_info["base"])
            if active_info["adapter"]:
                act_engine.add_adapter(active_name, active_info["adapter"])
            else:
                act_engine.add_base_version(active_name)
            act_version = active_name
        except ModelLoadError as e:  # e.g. the hub model of the active version is unreachable offline
            out(f"refine: cannot load the active version {active_name} ({e}); comparing with the bare base instead")
            act_engine, act_version, active_name = cand_engine, "base", f"bare base (active {active_name} unavailable)"

    def both(examples: list, prefix: str = "") -> tuple[Any, Any]:
        common = dict(batch_size=cfg.eval_batch_size, metrics=metrics, generation=gen, progress=progress)
        c = evaluate_versions(cand_engine, examples, ["candidate"], **common)["candidate"]
        a = evaluate_versions(act_engine, examples, [act_version], **common)[act_version]
        return c, a

    new = set(plan.new_ids)
    learned = [ex for ex in plan.train if ex.id in new and ex.source == "expert"][:IN_SAMPLE_MAX]
    in_sample = both(learned) if learned else None
    reports: dict[str, Any] = {}
    if in_sample:
        reports.update({"in-sample:candidate": in_sample[0], f"in-sample:{act_version}": in_sample[1]})
    if not plan.heldout:
        return GateResult(no_heldout_decision(force, in_sample), active_name, reports, act_version)
    rep_c, rep_a = both(plan.heldout)
    reports.update({"candidate": rep_c, act_version: rep_a})
    decision = decide(rep_c, rep_a, examples=plan.heldout, primary=cfg.primary_metric, tolerance=cfg.tolerance,
                      min_n=cfg.gate_min_n, max_repetition=cfg.max_repetition, max_copying=cfg.max_copying,
                      training_targets=[ex.answer for ex in plan.train], in_sample=in_sample, seed=cfg.seed, force=force)
    return GateResult(decision, active_name, reports, act_version)


def register(db: Any, settings: Settings, cfg: RefineConfig, run: RunPlan, plan: Any, result: Any, adapter_dir: Path,
             gate: GateResult) -> Outcome:
    """Files first (under a temp name, renamed into place), then one transaction: run, lineage, version, decision."""
    from annotation_db import store as st
    from training.refine.modelcard import loss_svg, model_card, run_markdown

    run_dir, decision, active_name = run.run_dir, gate.decision, gate.active_name
    metrics_c, metrics_a = gate.metrics("candidate"), gate.metrics("active")
    training = {"steps": result.steps, "losses": result.losses, "examples_per_s": result.examples_per_s,
                "seconds": result.seconds, "final_loss": result.final_loss, "resumed_from": result.resumed_from, **result.extra}
    report: dict[str, Any] = {
        "run_id": run_dir.name, "base_model": run.base, "init_from": run.init_from, "method": cfg.method,
        "active_version": active_name, "counts": plan.counts, "training": training,
        "metrics_candidate": metrics_c, "metrics_active": metrics_a, "decision": decision.to_dict(),
        "config": cfg.to_dict(),
    }
    (run_dir / "loss.svg").write_text(loss_svg(result.losses), encoding="utf-8")
    (run_dir / "loss.csv").write_text("step,loss\n" + "".join(f"{a},{b}\n" for a, b in result.losses), encoding="utf-8")
    models_dir = settings.models_dir
    models_dir.mkdir(parents=True, exist_ok=True)
    final: Path | None = None
    try:
        with db.session() as s:
            versions = st.list_versions(s)
            name = f"v{len(versions) + 1}"
            final = models_dir / name
            if final.exists():
                if any(v.adapter_path and Path(v.adapter_path) == final for v in versions):
                    raise TrainingError(f"{final} belongs to another version; refusing to overwrite it")
                shutil.rmtree(final)  # left by a registration that was killed before its commit
            active = st.active_version(s)
            # --human-gate: a version that passed the metric gate waits for the experts (there must be one to compare with)
            human = bool(cfg.human_gate and decision.promote and not decision.forced and active and "candidate" in gate.reports)
            outcome = "awaiting-experts" if human else "promoted" if decision.promote else "rejected"
            status = {"awaiting-experts": "candidate", "promoted": "active"}.get(outcome, "rejected")
            report.update(outcome=outcome, candidate_version=name)
            tmp = models_dir / f".tmp-{name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(adapter_dir, tmp)
            card = model_card(
                version=name, base_model=run.base, parent=active_name if run.init_from else None, status=status,
                decision=decision.to_dict(), counts=plan.counts, config=cfg.to_dict(), metrics_candidate=metrics_c,
                metrics_active=metrics_a, active_name=active_name, run_id=run_dir.name, eval_n=len(plan.heldout),
                offline_demo=settings.offline_demo,
            )
            (tmp / "README.md").write_text(card, encoding="utf-8")
            _write_json(tmp / "refine_config.json", {"refine": cfg.to_dict(), "base_model": run.base,
                                                     "init_from": run.init_from, "run_id": run_dir.name})
            if "candidate" in gate.reports:
                gate.reports["candidate"].save(tmp / "eval")
            os.replace(tmp, final)
            st.finish_training_run(s, run.store_run_id, status="completed", counts=plan.counts,
                                   rating_ids=plan.rating_ids if cfg.method == "sft" else _dpo_lineage(plan, "rating_ids"),
                                   preference_ids=[] if cfg.method == "sft" else _dpo_lineage(plan, "preference_ids"),
                                   synthetic_ids=plan.synthetic_ids if cfg.method == "sft" else [],
                                   report=_json_safe({k: v for k, v in report.items() if k != "config"}))
            metrics_record = {"candidate": metrics_c, "active": metrics_a, "compared_with": active_name,
                              "eval_n": len(plan.heldout), "decision": decision.to_dict()}
            if human:
                metrics_record["human_gate"] = {"batch": batch_name(run_dir.name), "n": cfg.human_gate, "active_id": active.id}
            v = st.register_version(s, base_model=run.base, adapter_path=str(final.resolve()),
                                    parent_id=run.parent, training_run_id=run.store_run_id,
                                    metrics=_json_safe(metrics_record), note=f"refine run {run_dir.name}")
            assert v.name == name, (v.name, name)
            if human:
                report["human_gate"] = {"queued": queue(
                    s, candidate_id=v.id, active_id=active.id, heldout=plan.heldout, rep_candidate=gate.reports["candidate"],
                    rep_active=gate.reports[gate.active_key], n=cfg.human_gate, batch=batch_name(run_dir.name),
                    images_dir=settings.images_dir, seed=cfg.seed), "batch": batch_name(run_dir.name)}
            elif decision.promote:
                st.promote(s, v.id, forced=decision.forced, reason=decision.reason)
            else:
                st.reject(s, v.id, decision.reason)
    except BaseException:
        if final is not None and final.exists():
            shutil.rmtree(final, ignore_errors=True)
        raise
    _write_json(run_dir / "report.json", report)
    (run_dir / "report.md").write_text(run_markdown(report), encoding="utf-8")
    _write_json(run_dir / "state.json", {**_read_json(run_dir / "state.json"), "status": "finished", "version": name})
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the adapter is registered; checkpoints are spent
    waiting = (f"; {report['human_gate']['queued']} cases wait for the experts' blind comparison "
               "(Review -> Compare two answers)") if human else ""
    summary = (f"refine: {name} {report['outcome']}{' (forced)' if decision.forced else ''}: {decision.reason}{waiting}; "
               f"{plan.counts['train_examples']} examples, {result.steps} steps, loss {_f(result.final_loss)}; "
               f"run {run_dir.name}")
    return Outcome(Status(report["outcome"]), summary, version=name, run_id=run_dir.name, run_dir=run_dir, report=report)


def _dpo_lineage(plan: Any, key: str) -> list[int]:
    """The rating or pairwise-preference ids behind the preference pairs a DPO run trained on."""
    return sorted({i for p in plan.preference_pairs if not p["heldout"] for i in p[key]})


def _json_safe(d: Any) -> Any:
    return json.loads(json.dumps(d, default=str))


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
