"""`--method dpo`: preference pairs (chosen = the expert's correction, rejected = the model's answer)
trained with TRL's `DPOTrainer` for vision-language models, still LoRA, still gated.

The prompt messages are the engine's own (`core.prompts.build_messages`, with the
system instruction when the template takes one), so the pairs are scored on the
exact text the model is asked with. Verified with TRL 1.16 / transformers 5.23 /
peft 0.21 on the tiny SmolVLM model. TRL computes log-probabilities from
`lm_head.weight` directly, so `lm_head` cannot be a LoRA target here: it is
dropped from the targets, and an active adapter that adapts `lm_head` is not
continued (DPO then starts from the bare base; the run report says so).
Checkpoints are TRL's (`<run>/checkpoints/checkpoint-N`); `--resume` continues the
latest.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from training.refine.train import LoopResult


def preference_rows(plan: Any, engine: Any) -> dict[str, list]:
    from core.prompts import ChatTurn, ClinicalContext, build_messages
    from training.data.examples import load_image

    rows: dict[str, list] = {"images": [], "prompt": [], "chosen": [], "rejected": []}
    for p in plan.preference_pairs:
        if p["heldout"]:
            continue
        images = [load_image(x) for x in p["images"]]
        ctx = ClinicalContext.from_dict(p["context"]) if p.get("context") else None
        messages, _ = build_messages([ChatTurn(p["question"], None, images, ctx, p.get("template") or "free")],
                                     system=engine.supports_system)
        rows["images"].append(images)
        rows["prompt"].append(messages)
        rows["chosen"].append([{"role": "assistant", "content": [{"type": "text", "text": p["chosen"]}]}])
        rows["rejected"].append([{"role": "assistant", "content": [{"type": "text", "text": p["rejected"]}]}])
    return rows


def train_dpo(model: Any, processor: Any, engine: Any, plan: Any, cfg: Any, *, run_dir: Path, accelerator: Any,
              resume: bool, progress: bool) -> LoopResult:
    """Train the peft `model` with DPO on the plan's training preference pairs."""
    import math

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = preference_rows(plan, engine)
    n = len(rows["prompt"])
    assert n, "no preference pairs to train on"
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * n / (cfg.batch_size * cfg.grad_accum * accelerator.num_processes)))
    ckpt_dir = run_dir / "checkpoints"
    args = DPOConfig(
        output_dir=str(ckpt_dir), per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_steps=steps, learning_rate=cfg.learning_rate, warmup_steps=int(steps * cfg.warmup_ratio), weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm or 1e9, beta=cfg.dpo_beta, seed=cfg.seed, logging_steps=1, report_to=[],
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500,
        save_total_limit=max(1, cfg.keep_checkpoints), use_cpu=accelerator.device.type == "cpu",
        bf16=accelerator.mixed_precision == "bf16", disable_tqdm=not progress,
    )
    processor.tokenizer.padding_side = "left"
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows), processing_class=processor)
    last = None
    if resume and ckpt_dir.exists():
        found = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        last = str(found[-1]) if found else None
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - t0
    losses = [(h["step"], float(h["loss"])) for h in trainer.state.log_history if "loss" in h]
    margins = [float(h["rewards/margins"]) for h in trainer.state.log_history if "rewards/margins" in h]
    return LoopResult(steps, losses, steps * cfg.batch_size * cfg.grad_accum * accelerator.num_processes, 0, seconds,
                      int(last.rsplit("-", 1)[1]) if last else 0,
                      extra={"preference_pairs": n, "reward_margin_last": margins[-1] if margins else None})
