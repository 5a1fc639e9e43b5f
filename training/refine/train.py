"""The refine training loop: LoRA on encoded examples with accelerate, checkpoints and exact resume.

Data order is a pure function of (seed, step): example k of the endless stream is
`permutation(seed, epoch=k // n)[k % n]`, optimizer step s uses stream positions
`[s * accum * world * batch, ...)`, and process `rank` takes its slice of every
micro-batch. Dropout is reseeded from (seed, step, rank) at every step. So a run
resumed from a checkpoint continues on exactly the batches and random draws it would
have had, and `accelerate launch` over N processes trains on N times the batch.

Checkpoints hold only the trainable tensors (LoRA + modules_to_save), the optimizer,
the schedule and the loss curve; each is written to a temp folder and renamed, so a
kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from training.refine.collate import Features, collate
from training.refine.lora import load_trainable_state, trainable_state


@dataclass
class LoopConfig:
    steps: int  # optimizer steps in all
    batch_size: int  # examples per process per micro-batch
    grad_accum: int  # micro-batches per optimizer step
    learning_rate: float
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    seed: int
    save_steps: int  # 0: no checkpoints
    keep_checkpoints: int
    log_every: int = 1  # loss points kept every N steps


@dataclass
class LoopResult:
    steps: int
    losses: list[tuple[int, float]]  # (step, mean loss of that step's batch)
    examples_seen: int  # over all processes, this session only
    tokens_trained: int  # answer tokens (labels) seen, this session only
    seconds: float  # wall time of the steps run in this session
    resumed_from: int  # step of the checkpoint resumed from (0: fresh)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def examples_per_s(self) -> float:
        return self.examples_seen / self.seconds if self.seconds > 0 else 0.0

    @property
    def final_loss(self) -> float | None:
        """Mean loss of the last 10% of logged steps (at least one)."""
        if not self.losses:
            return None
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(v for _, v in tail) / len(tail)


class _Order:
    """Cached epoch permutations of the endless example stream."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def __call__(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch][pos]


def lr_lambda(cfg: LoopConfig) -> Callable[[int], float]:
    warmup = int(cfg.steps * cfg.warmup_ratio)

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        rest = max(1, cfg.steps - warmup)
        return max(0.0, 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / rest))))  # cosine to zero

    return f


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    ckpts = [c for c in ckpts if (c / "state.json").exists()]
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    losses: list, keep: int) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(trainable_state(model), tmp / "trainable.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    old = sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep] if keep > 0 else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return final


def train(
    model: torch.nn.Module,
    features: Sequence[Features],
    cfg: LoopConfig,
    *,
    accelerator: Any,
    pad_id: int,
    run_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> LoopResult:
    """Train the trainable parameters of `model` (a peft model) for `cfg.steps` optimizer steps."""
    from tqdm.auto import tqdm

    assert features, "nothing to train on"
    n, world, rank = len(features), accelerator.num_processes, accelerator.process_index
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        foreach=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    start, losses = 0, []
    if resume and run_dir is not None and (ckpt := latest_checkpoint(run_dir)) is not None:
        load_trainable_state(model, torch.load(ckpt / "trainable.pt", map_location="cpu", weights_only=True))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
        state = json.loads((ckpt / "state.json").read_text())
        start, losses = int(state["step"]), [tuple(x) for x in state["losses"]]
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    order = _Order(n, cfg.seed)
    per_micro = cfg.batch_size * world
    bar = tqdm(total=cfg.steps, initial=start, desc="refine", unit="step", disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True)
    seen = tokens = 0
    t0 = time.perf_counter()
    device = accelerator.device
    step = start
    for step in range(start, cfg.steps):
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)
        # Count the answer tokens of every micro-batch of this step first, so the loss is a
        # mean over all answer tokens of the step (not a mean of micro-batch means).
        micro_sets = []
        for m in range(cfg.grad_accum):
            base = (step * cfg.grad_accum + m) * per_micro + rank * cfg.batch_size
            micro_sets.append([features[order(base + j)] for j in range(cfg.batch_size)])
        local_tokens = sum(f.n_target for mb in micro_sets for f in mb)
        total_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=device), reduction="sum").item())
        step_loss = torch.zeros((), device=device)
        for m, mb in enumerate(micro_sets):
            batch = {k: v.to(device) for k, v in collate(mb, pad_id).items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(accelerator.unwrap_model(model).dtype)
            labels = batch.pop("labels")
            ctx = accelerator.no_sync(model) if m < cfg.grad_accum - 1 else _null()
            with ctx, accelerator.autocast():
                logits = model(**batch, use_cache=False).logits  # a cache only costs time and memory in training
                loss_sum = _token_loss_sum(logits, labels)
                # DDP averages gradients over processes: scale so the result is the global token mean.
                loss = loss_sum * world / max(1, total_tokens)
            accelerator.backward(loss)
            step_loss += loss_sum.detach()
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        mean_loss = float(accelerator.reduce(step_loss, reduction="sum").item()) / max(1, total_tokens)
        seen += per_micro * cfg.grad_accum
        tokens += total_tokens
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            losses.append((step + 1, round(mean_loss, 6)))
        bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
        bar.update(1)
        if on_step is not None:
            on_step(step + 1, mean_loss)
        if run_dir is not None and cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(run_dir, step + 1, accelerator.unwrap_model(model), optimizer, scheduler, losses,
                                cfg.keep_checkpoints)
            accelerator.wait_for_everyone()
    bar.close()
    seconds = time.perf_counter() - t0
    model.eval()
    return LoopResult(cfg.steps, losses, seen, tokens, seconds, start)


def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over the answer tokens (labels != -100)."""
    targets = labels[:, 1:]
    keep = targets != -100
    picked = logits[:, :-1, :][keep].float()  # only answer positions: the full-vocabulary logits of the prompt stay unused
    return torch.nn.functional.cross_entropy(picked, targets[keep], reduction="sum")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
