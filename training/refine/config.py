"""The options of `python -m training.refine`, each defined once (help, allowed values, minimum).

    python -m training.refine --help
    python -m training.refine --config refine.yaml --steps 100     # defaults < variables < file < flags

`RefineConfig` decides what a run does and is saved with every run and adapter
(`RefineConfig.from_dict` reads it back); `RefineActions` says which command runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from annotation_db.models import RATER_ROLES, ROLES
from core.config import check_fields, opt
from training.errors import TrainingError

METHODS = ("sft", "dpo")
SUPERVISION = ("qa", "caption", "qa+caption")  # see training.refine.collate


@dataclass
class RefineConfig:
    """Everything that decides what a refine run does; saved with every run and adapter."""

    _argument_group_name = "refine settings"

    # data
    synthetic: list[str] = opt([], "synthetic QA datasets (jsonl/csv/hf/mediqa)", metavar="FILE")
    synthetic_eval: list[str] = opt([], "synthetic held-out datasets (default: a share of --synthetic's images)", metavar="FILE")
    synthetic_ratio: float = opt(1.0, "synthetic examples per gold training pair (all synthetic when there is no gold)", minimum=0.0)
    synthetic_holdout: float = opt(0.2, "share of synthetic images held out (the store's split), without --synthetic-eval", minimum=0.0)
    supervision: str = opt("qa", "what synthetic data teaches (gold pairs are always QA)", choices=SUPERVISION)
    gold_holdout: float = opt(0.2, "share of gold images held out (the store's frozen split); 0 = train on every gold pair", minimum=0.0)
    accept_threshold: float = opt(4.0, "an uncorrected answer with this mean score or more is gold")
    roles: list[str] = opt(list(RATER_ROLES), "rater roles whose ratings count", choices=ROLES)
    min_new: int = opt(1, "fewer new gold training pairs than this: exit 0 without training", minimum=0)
    # model
    method: str = opt("sft", "sft: answer tokens; dpo: TRL's DPO on preference pairs (chosen = the correction)", choices=METHODS)
    from_base: bool = opt(False, "start from the bare base instead of the active version's adapter")
    lora_r: int = opt(16, "LoRA rank", minimum=1)
    lora_alpha: int = opt(32, "LoRA scale numerator", minimum=1)
    lora_dropout: float = opt(0.05, "LoRA dropout", minimum=0.0)
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head", "Linear leaf names that get LoRA")
    lora_vision: bool = opt(False, "also adapt the vision tower's matching layers")
    modules_to_save: str = opt("", "modules trained in full and saved with the adapter (comma-separated)")
    gradient_checkpointing: str = opt("auto", "recompute activations in the backward pass: less memory for more time "
                                              "(auto: on with --quantize 4bit, the QLoRA recipe; off otherwise)",
                                      choices=("auto", "on", "off"))
    # optimisation
    steps: int = opt(0, "optimizer steps; 0 = from --epochs", minimum=0)
    epochs: float = opt(3.0, "passes over the training examples when --steps is 0", minimum=1e-9)
    batch_size: int = opt(4, "examples per process per micro-batch", minimum=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", minimum=1)
    learning_rate: float = opt(2e-4, "peak learning rate (linear warm-up, then linear decay)", minimum=1e-12)
    warmup_ratio: float = opt(0.05, "share of the steps spent warming up", minimum=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", minimum=0.0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = no clipping)", minimum=0.0)
    max_length: int = opt(4096, "examples with more tokens are left out", minimum=1)
    mixed_precision: str = opt("auto", "auto: bf16 on CUDA, none elsewhere", choices=("auto", "no", "bf16", "fp16"))
    seed: int = opt(0, "seed of the data order, the split and LoRA's initialisation")
    save_steps: int = opt(50, "checkpoint every N steps (0 = never)", minimum=0)
    keep_checkpoints: int = opt(2, "checkpoints kept in the run folder", minimum=0)
    dpo_beta: float = opt(0.1, "DPO temperature", minimum=0.0)
    # gate
    primary_metric: str = opt("auto", "the gate's metric: auto (diagnosis accuracy on expert labels when there are enough, "
                                      "else on every label, else ROUGE-L) or a report metric name")
    tolerance: float = opt(0.05, "non-inferiority margin: the candidate may be worse than the active by at most this much "
                                 "(the lower bound of the paired 95 % interval)", minimum=0.0)
    gate_min_n: int = opt(30, "held-out cases needed for a gate decision; fewer: rejected unless --force", minimum=1)
    max_repetition: float = opt(0.3, "repetition rate allowed (unless no higher than the active version's)", minimum=0.0)
    max_copying: float = opt(0.3, "share of held-out answers copied from a training answer allowed (unless no higher than "
                                  "the active version's)", minimum=0.0)
    human_gate: int = opt(0, "after the metric gate passes, queue N held-out cases for the experts' blind comparison; the "
                             "candidate waits until they are judged (0: off)", minimum=0)
    human_margin: float = opt(0.4, "with --human-gate: promote when the lower bound of the candidate's win rate "
                                   "(95 % Wilson, ties left out) is at least this", minimum=0.0)
    eval_max: int = opt(200, "held-out examples at most (gold first)", minimum=0)
    eval_batch_size: int = opt(8, "answers generated together in the gate", minimum=1)
    eval_max_new_tokens: int = opt(64, "answer length cap in the gate", minimum=1)
    eval_metrics: str = opt("bleu,rouge,diagnosis,repetition", "training.eval.metrics names, comma-separated")

    def validate(self) -> None:
        for name in ("gold_holdout", "synthetic_holdout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise TrainingError(f"--{name.replace('_', '-')} must be at least 0 and below 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RefineConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise TrainingError(f"unknown refine setting(s): {', '.join(sorted(unknown))}")
        cfg = cls(**d)
        check_fields(cfg)
        cfg.validate()
        return cfg


@dataclass
class RefineActions:
    """What the command does; the default is one refine run."""

    _argument_group_name = "actions (default: one refine run)"

    list_versions: bool = opt(False, "list model versions with status and metrics", aliases=["--list"])
    rollback: str | None = opt(None, "make an earlier version active again", metavar="VERSION")
    dry_run: bool = opt(False, "print the data counts and exit")
    resume: str | None = opt(None, "continue a killed run (the latest unless RUN is given)", nargs="?", const="latest", metavar="RUN")
    force: bool = opt(False, "promote even if the gate says no (or without it when nothing is held out), or roll back "
                             "to a version the gate rejected (recorded as forced)")
    every: str | None = opt(None, "repeat forever, e.g. 30m, 6h, 1d", metavar="INTERVAL")
    quiet: bool = opt(False, "no progress bars")


def parse_interval(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise TrainingError(f"--every {text!r}: use a number with s, m, h or d, e.g. 6h") from None
