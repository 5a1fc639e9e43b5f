"""Refine the model on what experts corrected, then let the gate decide whether it ships.

    python -m training.refine [--synthetic FILE ...] [--synthetic-ratio 1] [--supervision qa]
    python -m training.refine --min-new 20 --every 6h          # a loop for hosts without cron
    accelerate launch --num_processes 2 -m training.refine      # data parallel (GPUs, or --cpu with gloo)
    python -m training.refine --resume                          # continue the run that was killed
    python -m training.refine --list | --rollback v3 | --dry-run

One run: take the store's refine lock; gather gold pairs (corrections win, accepted
answers count) and synthetic QA (`training.refine_data`); stop quietly when fewer
than `--min-new` gold pairs are new; train a LoRA adapter on answer tokens only
(`training.refine_train`, or TRL's DPO on preference pairs with `--method dpo`),
starting from the active version's adapter unless `--from-base`; evaluate the
candidate and the active version on the same held-out set (`training.eval.gate`); then,
in one transaction, record the run and its lineage, register the candidate with
its model card under `<home>/models/<version>/`, and promote or reject it. The run
folder `<home>/runs/<run-id>/` keeps the config, the data plan, checkpoints, the
loss curve and the report (JSON and Markdown). A killed run registers nothing and
can be resumed; its stale lock is taken over.

Exit status: 0 (trained, skipped or dry run), 1 (a problem to fix: the message says
which), 75 (another refine holds the lock; try later).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from core.config import Settings, parse_cli
from core.errors import DermaLoopError
from training.errors import TrainingError
from training.refine.config import RefineActions, RefineConfig, parse_interval

LOCK_NAME = "refine"
EXIT_BUSY = 75


# ------------------------------------------------------------------------ outcome


class Status(str, enum.Enum):
    """How a refine command ended (a str, so it also compares equal to its value)."""

    promoted = "promoted"
    rejected = "rejected"
    skipped = "skipped"  # too little new, nothing to train on
    dry_run = "dry-run"
    busy = "busy"  # another refine holds the lock
    worker = "worker"  # an accelerate process other than the main one: the main one reports
    awaiting = "awaiting-experts"  # passed the metric gate; waits for the experts' blind comparison (--human-gate)


@dataclass(frozen=True)
class RunPlan:
    """What the main process decided and every process trains from (broadcast under accelerate)."""

    run_dir: Path
    base: str  # the base model the candidate is trained on
    init_from: str | None  # the adapter it continues, if any
    parent: int | None  # the store id of the version it continues
    store_run_id: int
    resume: bool


@dataclass
class Outcome:
    status: Status
    summary: str  # the one line printed on stdout
    version: str | None = None
    run_id: str | None = None
    run_dir: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)


def _open_store(settings: Settings):
    from annotation_db.db import Store

    return Store.open(settings.db_url)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _find_run(runs_dir: Path, which: str) -> Path:
    if which != "latest":
        cand = [runs_dir / which, *sorted(runs_dir.glob(f"*-r{which}"))]
        for c in cand:
            if (c / "state.json").exists():
                return c
        raise TrainingError(f"no run {which!r} under {runs_dir}")
    running = [d for d in sorted(runs_dir.glob("*")) if (d / "state.json").exists()
               and _read_json(d / "state.json").get("status") == "running"]
    if not running:
        raise TrainingError(f"no interrupted run to resume under {runs_dir}")
    return running[-1]


def _abandon_interrupted(s: Any, runs_dir: Path) -> None:
    """Runs left 'running' by a killed process (we hold the lock now) are marked failed."""
    from annotation_db import store as st
    from annotation_db.errors import StoreError

    for d in sorted(runs_dir.glob("*")):
        state_path = d / "state.json"
        if not state_path.exists():
            continue
        state = _read_json(state_path)
        if state.get("status") != "running":
            continue
        try:
            st.finish_training_run(s, state["store_run_id"], status="failed", report={"reason": "interrupted; not resumed"})
        except StoreError:
            pass
        state["status"] = "abandoned"
        _write_json(state_path, state)


# ------------------------------------------------------------------------ the run


def run_refine(
    settings: Settings,
    cfg: RefineConfig,
    *,
    force: bool = False,
    resume: str | None = None,
    dry_run: bool = False,
    progress: bool = True,
    explicit_model: bool = False,
    out: Callable[[str], None] = print,
) -> Outcome:
    """One refine run (see the module docstring). Called by every process under accelerate."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    from annotation_db import store as st
    from annotation_db.errors import LockHeld

    cfg.validate()
    import torch

    cpu = settings.device == "cpu"
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if (torch.cuda.is_available() and not cpu) else "no"
    accelerator = Accelerator(cpu=cpu, mixed_precision=mp)
    if settings.quantize and not dry_run:
        from core.models import quantization_config

        # Before the lock and the run record: a run that cannot load its base must leave nothing behind.
        quantization_config(settings.quantize, accelerator.device.type, torch.bfloat16)
    main = accelerator.is_main_process
    payload: list[Any] = [None]
    db = _open_store(settings) if main else None
    owner = f"refine@{socket.gethostname()}:{os.getpid()}"
    try:
        if main:
            try:
                payload[0] = _prepare(db, settings, cfg, owner, resume=resume, dry_run=dry_run,
                                      explicit_model=explicit_model, force=force, out=out)
            except LockHeld as e:
                payload[0] = Outcome(Status.busy, f"refine: another refine is running ({e})")
            except DermaLoopError as e:
                payload[0] = str(e)  # raised in every process below
        if accelerator.num_processes > 1:
            broadcast_object_list(payload, from_process=0)
        plan: RunPlan | Outcome | str = payload[0]
        if isinstance(plan, str):
            raise TrainingError(plan)
        if isinstance(plan, Outcome):
            return plan
        run_dir = plan.run_dir
        cfg = RefineConfig.from_dict(_read_json(run_dir / "config.json")["refine"])
        result, adapter_dir = _train(accelerator, settings, cfg, plan, progress=progress, out=out)
        accelerator.wait_for_everyone()
        if not main:
            return Outcome(Status.worker, "worker process done", run_id=run_dir.name, run_dir=run_dir)
        from training.refine.register import gate_and_register

        return gate_and_register(db, settings, cfg, plan, result, adapter_dir, force=force,
                                 progress=progress, device=str(accelerator.device), out=out)
    finally:
        if db is not None:
            with db.session() as s:
                st.release_lock(s, LOCK_NAME, owner)  # only if this process holds it
            db.dispose()


def _prepare(db: Any, settings: Settings, cfg: RefineConfig, owner: str, *, resume: str | None, dry_run: bool,
             explicit_model: bool, force: bool, out: Callable[[str], None]) -> RunPlan | Outcome:
    """Main process: lock, data, run record. Returns what every process trains from, or how it ended."""
    from annotation_db import store as st
    from training.refine.data import build_plan

    runs_dir = settings.runs_dir
    if dry_run:
        with db.session() as s:
            active = st.active_version(s)
            active_id = active.id if active else None
        # a dry run writes nothing (not even the split of new images)
        plan = build_plan(db, cfg, images_dir=settings.images_dir, active_version_id=active_id, dry_run=True)
        lines = [f"{k}: {v}" for k, v in plan.counts.items()]
        note = _text_only_note(plan)
        return Outcome(Status.dry_run, "dry run: " + "; ".join(lines) + (f"\n{note}" if note else ""),
                       report={"counts": plan.counts})
    with db.session() as s:
        st.acquire_lock(s, LOCK_NAME, owner, os.getpid(), socket.gethostname())
    try:
        # We hold the lock: a `.tmp-*` adapter copy under models/ is what a registration killed before
        # its commit left behind (never registered), so it goes.
        for leftover in settings.models_dir.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        with db.session() as s:
            if not resume:
                _abandon_interrupted(s, runs_dir)
            from training.refine.human_gate import settle

            for line in settle(s, margin=cfg.human_margin):  # candidates the experts have finished comparing
                out(line)
            active = st.active_version(s)
            active_id = active.id if active else None
        # Outside any session: build_plan reads the store, then the files, then writes the split in
        # a short transaction of its own, so the app's writes never wait on image reading.
        plan = None if resume else build_plan(db, cfg, images_dir=settings.images_dir, active_version_id=active_id)
        with db.session() as s:
            active = st.active_version(s)
            active_info = None if active is None else {"id": active.id, "name": active.name, "base": active.base_model,
                                                       "adapter": active.adapter_path}
            if resume:
                run_dir = _find_run(runs_dir, resume)
                state = _read_json(run_dir / "state.json")
                if state.get("status") != "running":
                    raise TrainingError(f"run {run_dir.name} is {state.get('status')}; only an interrupted run can be resumed")
                saved = _read_json(run_dir / "config.json")
                out(f"refine: resuming run {run_dir.name}")
                return RunPlan(run_dir, saved["base_model"], saved["init_from"], saved["parent"], state["store_run_id"],
                               resume=True)
            assert plan is not None
            note = _text_only_note(plan)
            if note:
                out(note)
            if cfg.min_new and plan.new_gold < cfg.min_new:
                s.rollback()
                return Outcome(Status.skipped, (
                    f"refine: nothing to do: {plan.new_gold} new gold pair(s) since "
                    f"{active.name if active else 'the start'}, fewer than --min-new {cfg.min_new}"))
            if cfg.method == "dpo" and not [p for p in plan.preference_pairs if not p["heldout"]]:
                s.rollback()
                return Outcome(Status.skipped, "refine: --method dpo needs preference pairs (corrections); none yet")
            if cfg.method == "sft" and not plan.train:
                s.rollback()
                return Outcome(Status.skipped, "refine: nothing to train on: no gold pairs and no --synthetic data")
            base = settings.model if (explicit_model or active is None) else active.base_model
            continuing = bool(active is not None and active.adapter_path and not cfg.from_base and base == active.base_model)
            if continuing and cfg.method == "dpo" and _adapts_lm_head(active.adapter_path):
                out(f"refine: {active.name} adapts lm_head, which TRL's DPO cannot train; DPO starts from the bare base")
                continuing = False
            init_from = active.adapter_path if continuing else None
            config_for_run = cfg.to_dict()
            run = st.start_training_run(s, {"refine": config_for_run, "base_model": base, "init_from": init_from,
                                            "active": active_info["name"] if active_info else None})
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            run_dir = runs_dir / f"{stamp}-r{run.id}"
            run_dir.mkdir(parents=True, exist_ok=False)
            (run_dir / "data.json").write_text(plan.to_json(), encoding="utf-8")
            _write_json(run_dir / "config.json", {"refine": config_for_run, "base_model": base, "init_from": init_from,
                                                  "parent": active.id if continuing else None,
                                                  "settings": {k: str(v) for k, v in dataclasses.asdict(settings).items()}})
            _write_json(run_dir / "state.json", {"status": "running", "store_run_id": run.id, "pid": os.getpid()})
            out(f"refine: run {run_dir.name}: {plan.counts['train_examples']} training examples "
                f"({plan.counts['gold_train']} gold, {plan.counts['synthetic_used']} synthetic), "
                f"{plan.counts['eval_examples']} held out")
            return RunPlan(run_dir, base, init_from, active.id if continuing else None, run.id, resume=False)
    except BaseException:
        with db.session() as s:
            st.release_lock(s, LOCK_NAME, owner)
        raise


def _text_only_note(plan: Any) -> str:
    n = plan.counts.get("gold_text_only_skipped", 0)
    return (f"refine: {n} text-only gold pair(s) (asked without an image) left out of training: "
            "training batches hold image examples only") if n else ""


def _loop_config(cfg: RefineConfig, n_train: int, world: int):
    from training.refine.train import LoopConfig

    steps = cfg.steps or max(1, math.ceil(cfg.epochs * n_train / (cfg.batch_size * cfg.grad_accum * world)))
    return LoopConfig(steps=steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, learning_rate=cfg.learning_rate,
                      warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                      seed=cfg.seed, save_steps=cfg.save_steps, keep_checkpoints=cfg.keep_checkpoints)


def _train(accelerator: Any, settings: Settings, cfg: RefineConfig, run: RunPlan, *, progress: bool,
           out: Callable[[str], None]):
    """Every process: load the base, attach LoRA, encode the plan's examples, train, save the adapter (main)."""
    run_dir = run.run_dir
    import torch

    from core.engine import Engine
    from core.models import load_model
    from training.refine.collate import encode, supervised_turns
    from training.refine.data import DataPlan
    from training.refine.lora import attach_lora, prepare_for_training, save_adapter
    from training.refine.train import train

    torch.manual_seed(cfg.seed)
    plan = DataPlan.from_json((run_dir / "data.json").read_text(encoding="utf-8"))
    loaded = load_model(run.base, device=str(accelerator.device), dtype=settings.dtype,
                        image_splitting=settings.image_splitting, longest_edge=settings.longest_edge,
                        trust_remote_code=settings.trust_remote_code, quantize=settings.quantize, device_map=settings.device_map)
    engine = Engine(loaded, settings)  # for the prompt text only: training text is what the engine asks
    targets = [t for t in cfg.lora_targets.split(",") if t and not (cfg.method == "dpo" and t == "lm_head")]
    checkpointing = cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and bool(settings.quantize))
    base = prepare_for_training(loaded.model, quantized=bool(settings.quantize), gradient_checkpointing=checkpointing)
    model = attach_lora(
        base, targets=targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
        vision=cfg.lora_vision, modules_to_save=[m for m in cfg.modules_to_save.split(",") if m], init_from=run.init_from,
    )
    pad_id = loaded.processor.tokenizer.pad_token_id
    if cfg.method == "dpo":
        from training.refine.dpo import train_dpo

        result = train_dpo(model, loaded.processor, engine, plan, cfg, run_dir=run_dir, accelerator=accelerator,
                           resume=run.resume, progress=progress)
    else:
        turns = supervised_turns(plan.train, cfg.supervision)
        cache: dict[str, Any] = {}
        features, too_long = [], 0
        for t in turns:
            images = [cache.setdefault(p, _load(p)) for p in t.images]
            f = encode(engine, t, images)
            if f.input_ids.numel() > cfg.max_length:
                too_long += 1
                continue
            features.append(f)
        if not features:
            raise TrainingError(f"every training example is longer than --max-length {cfg.max_length} tokens")
        loop = _loop_config(cfg, len(features), accelerator.num_processes)
        if accelerator.is_main_process:
            out(f"refine: {len(features)} training turns ({cfg.supervision}), {too_long} too long, {loop.steps} steps "
                f"on {accelerator.num_processes} process(es), device {accelerator.device}")
        result = train(model, features, loop, accelerator=accelerator, pad_id=pad_id, run_dir=run_dir,
                       resume=run.resume, progress=progress)
        result.extra.update(turns=len(features), too_long=too_long)
    adapter_dir = run_dir / "adapter"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = run_dir / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(model, tmp)
        shutil.rmtree(adapter_dir, ignore_errors=True)
        os.replace(tmp, adapter_dir)
    return result, adapter_dir


def _adapts_lm_head(adapter_dir: str) -> bool:
    cfg_path = Path(adapter_dir) / "adapter_config.json"
    if not cfg_path.exists():
        return False
    data = _read_json(cfg_path)
    targets = data.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    return any(t == "lm_head" or str(t).endswith(".lm_head") for t in targets) or "lm_head" in (data.get("modules_to_save") or [])


def _load(path: str):
    from training.data.examples import load_image

    return load_image(path)


# ------------------------------------------------------------------------ other actions


def list_versions(settings: Settings) -> str:
    from annotation_db import store as st

    db = _open_store(settings)
    try:
        with db.session() as s:
            rows = []
            for v in st.list_versions(s):
                m = (v.metrics or {}).get("candidate") or {}
                key = next((k for k in ("diagnosis_accuracy", "rougeL") if m.get(k) is not None), None)
                metric = f"{key}={m[key]:.4f}" if key else ""
                rows.append((v.name, v.status.value, metric, v.base_model, v.adapter_path or "(bare base)", v.status_reason or ""))
    finally:
        db.dispose()
    if not rows:
        return "no model versions yet"
    head = ("version", "status", "metric", "base", "adapter", "reason")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows])


def rollback(settings: Settings, version: str, *, forced: bool = False) -> str:
    from annotation_db import store as st

    db = _open_store(settings)
    try:
        with db.session() as s:
            before = st.active_version(s)
            v = st.rollback(s, version, reason=f"rollback from {before.name if before else 'none'} (refine --rollback)",
                            forced=forced)
            return f"refine: {v.name} is active again (was {before.name if before else 'none'})"
    finally:
        db.dispose()


def _demo_defaults(settings: Settings, cfg: RefineConfig, out: Callable[[str], None]) -> Settings:
    """In offline demo mode (training.demo_model): the demo's data directory and store, its phantoms as
    the synthetic data and the gate's eval set unless others are given."""
    from training.demo_model import demo_settings, phantom_data

    demo = demo_settings(settings)
    train, heldout = phantom_data(demo)
    cfg.synthetic = cfg.synthetic or [str(train)]
    cfg.synthetic_eval = cfg.synthetic_eval or [str(heldout)]
    why = "asked for" if settings.offline_demo else "the production store has no model versions"
    out(f"refine: offline demo mode: working on {demo.home} ({why})")
    return demo


BACKOFF_S = 60.0  # --every: first wait after a failed run; doubles per failure, at most the interval


def main(argv: list[str] | None = None) -> int:
    from annotation_db.errors import StoreError
    from training.demo_model import in_demo_mode

    try:  # configuration: a mistake here ends the command, even with --every
        (cfg, act, settings), given = parse_cli([RefineConfig, RefineActions, Settings], argv, prog="python -m training.refine",
                                                description=__doc__)
        interval = parse_interval(act.every) if act.every else None
        explicit_model = "model" in given
        if in_demo_mode(settings):
            settings, explicit_model = _demo_defaults(settings, cfg, print), False
        if act.list_versions:
            print(list_versions(settings))
            return 0
        if act.rollback:
            print(rollback(settings, act.rollback, forced=act.force))
            return 0
    except (DermaLoopError, StoreError) as e:
        print(f"refine: {e}", file=sys.stderr)
        return 1
    failures, resume = 0, act.resume
    try:
        while True:
            try:
                outcome = run_refine(settings, cfg, force=act.force, resume=resume, dry_run=act.dry_run,
                                     progress=not act.quiet, explicit_model=explicit_model)
            except (DermaLoopError, StoreError, OSError) as e:
                print(f"refine: {e}", file=sys.stderr, flush=True)
                if interval is None:
                    return 1
                failures += 1
                wait = min(interval, BACKOFF_S * 2 ** (failures - 1))
                print(f"refine: run failed ({failures} in a row); next try in {wait:.0f} s", file=sys.stderr, flush=True)
                time.sleep(wait)
                continue
            failures = 0
            if outcome.status is not Status.worker:
                print(outcome.summary, flush=True)
            if interval is None:
                return EXIT_BUSY if outcome.status is Status.busy else 0
            resume = None  # only the first run of a loop resumes
            time.sleep(interval)
    except KeyboardInterrupt:
        print("refine: interrupted", file=sys.stderr)
        return 130

