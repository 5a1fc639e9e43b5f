"""Refine training throughput and peak memory: our loop against TRL's SFTTrainer, same run.

    python -m bench.refine [--steps 60] [--batch-size 8] [--examples 48] [--device cpu|cuda]
    python -m bench.refine --real-dims      # SmolVLM-256M-Instruct's dimensions, random weights (8 steps of 4)

Same model (tiny, or with --real-dims a replica of SmolVLM-256M-Instruct at its published
dimensions and vocabulary: core.replicas; one 512 px tile per image, as on CPU), same phantom examples (prompt = the engine's messages,
completion = the answer, loss on the completion only), same LoRA config, learning
rate, batch size and number of steps. Each trainer runs in its own subprocess so
peak memory (max RSS on CPU, max allocated on CUDA) is its own. Gradient checkpointing
is set alike in both (`--gradient-checkpointing`, default off; TRL's SFTConfig turns it
on by default, which costs it time and saves it memory), and so is precision (float32, or
`--bf16` autocast in both: TRL 1.16's SFTConfig defaults to bf16 even on a CPU). Prints examples/s,
peak memory and final loss of both, and the ratios ours / TRL (target: >= 1.0
throughput, final loss no worse). Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# lm_head is trained in full (modules_to_save) in both: TRL 1.16 refuses a LoRA on lm_head (it computes
# log-probabilities from lm_head.weight), and a tiny random model cannot learn with a frozen output layer.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _data(n: int):
    from training.data.phantoms import generate

    out = []
    for ph in generate(n, seed=0, split="train", size=64):
        _, q, a = ph.qa(["diagnosis"])[0]
        out.append((ph.image, q, a))
    return out


def _features(engine, n: int):
    from training.refine.collate import TrainTurn, encode

    return [encode(engine, TrainTurn(str(i), ("x",), q, a, None, "free", "phantom"), [img]) for i, (img, q, a) in enumerate(_data(n))]


def eval_loss(model, feats, pad_id: int, device: str) -> float:
    """Mean answer-token loss over `feats`, computed the same way for both trainers' models."""
    import torch

    from training.refine.collate import collate
    from training.refine.train import _token_loss_sum

    model.eval()
    total = tokens = 0.0
    with torch.no_grad():
        for i in range(0, len(feats), 8):
            batch = {k: v.to(device) for k, v in collate(feats[i:i + 8], pad_id).items()}
            labels = batch.pop("labels")
            total += float(_token_loss_sum(model(**batch, use_cache=False).logits, labels))
            tokens += int((labels[:, 1:] != -100).sum())
    return total / tokens


def _peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(model_dir: str, args: argparse.Namespace) -> dict:
    import torch
    from accelerate import Accelerator

    from core.config import Settings
    from core.engine import Engine
    from core.models import load_model
    from training.refine.lora import attach_lora, prepare_for_training
    from training.refine.train import LoopConfig, train

    torch.manual_seed(0)
    loaded = load_model(model_dir, device=args.device, dtype="float32")
    engine = Engine(loaded, Settings())
    feats = _features(engine, args.examples)
    base = prepare_for_training(loaded.model, quantized=False, gradient_checkpointing=args.gradient_checkpointing == "on")
    model = attach_lora(base, targets=TARGETS, r=16, alpha=32, dropout=0.0, modules_to_save=("lm_head",))
    cfg = LoopConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=1, learning_rate=args.lr, warmup_ratio=0.0,
                     weight_decay=0.0, max_grad_norm=1.0, seed=0, save_steps=0, keep_checkpoints=1)
    acc = Accelerator(cpu=args.device == "cpu", mixed_precision="bf16" if args.bf16 else "no")
    start = time.perf_counter()  # preprocessing included, as TRL's collator does it inside the loop
    result = train(model, feats, cfg, accelerator=acc, pad_id=loaded.processor.tokenizer.pad_token_id, progress=False)
    total = time.perf_counter() - start
    return {"examples_per_s": args.steps * args.batch_size / total, "train_s": result.seconds,
            "peak_mb": _peak_mb(args.device), "final_loss": result.final_loss,
            "eval_loss": eval_loss(model, feats, loaded.processor.tokenizer.pad_token_id, args.device)}


def run_trl(model_dir: str, args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from core.config import Settings
    from core.engine import Engine
    from core.models import load_model
    from core.prompts import ChatTurn, build_messages
    from training.refine.lora import resolve_targets

    torch.manual_seed(0)
    loaded = load_model(model_dir, device=args.device, dtype="float32")
    engine = Engine(loaded, Settings())
    rows: dict[str, list] = {"images": [], "prompt": [], "completion": []}
    for img, q, a in _data(args.examples):
        messages, _ = build_messages([ChatTurn(q, None, [img])], system=engine.supports_system)
        rows["images"].append([img])
        rows["prompt"].append(messages)
        rows["completion"].append([{"role": "assistant", "content": [{"type": "text", "text": a}]}])
    losses: list[float] = []

    class Keep(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    # the same modules as ours: given leaf names, peft would also adapt the vision tower's q/k/v
    targets = resolve_targets(loaded.model, TARGETS)
    out = tempfile.mkdtemp(prefix="bench-trl-")
    cfg = SFTConfig(output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=args.lr,
                    lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
                    report_to=[], save_strategy="no", use_cpu=args.device == "cpu", seed=0, completion_only_loss=True,
                    disable_tqdm=True, dataloader_num_workers=0, max_length=None,
                    gradient_checkpointing=args.gradient_checkpointing == "on",  # TRL's default is on: set alike
                    bf16=args.bf16)  # TRL's default is bf16 autocast, on a CPU too: set alike
    trainer = SFTTrainer(model=loaded.model, args=cfg, train_dataset=Dataset.from_dict(rows), processing_class=loaded.processor,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, modules_to_save=["lm_head"]),
                         callbacks=[Keep()])
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 10):]
    peak = _peak_mb(args.device)
    feats = _features(engine, args.examples)
    return {"examples_per_s": args.steps * args.batch_size / total, "train_s": total, "peak_mb": peak,
            "final_loss": sum(tail) / len(tail) if tail else None,
            "eval_loss": eval_loss(trainer.model, feats, loaded.processor.tokenizer.pad_token_id, args.device)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help="default 60 (tiny), 8 (--real-dims)")
    p.add_argument("--batch-size", type=int, help="default 8 (tiny), 4 (--real-dims)")
    p.add_argument("--examples", type=int, help="default 48 (tiny), 16 (--real-dims)")
    p.add_argument("--lr", type=float, help="default 2e-3 (tiny), 2e-4 (--real-dims)")
    p.add_argument("--real-dims", action="store_true", help="SmolVLM-256M-Instruct's dimensions instead of the tiny model")
    p.add_argument("--gradient-checkpointing", choices=("off", "on"), default="off",
                   help="in both trainers alike (TRL's own default is on, ours off)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in both trainers (TRL's own default; ours: --mixed-precision bf16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # per-step overhead dominates the tiny model; at real dimensions a few steps already take minutes on CPU
    for name, tiny, real in (("steps", 60, 8), ("batch_size", 8, 4), ("examples", 48, 16), ("lr", 2e-3, 2e-4)):
        if getattr(args, name) is None:
            setattr(args, name, real if args.real_dims else tiny)
    if args.worker:
        fn = run_ours if args.worker == "ours" else run_trl
        print("RESULT " + json.dumps(fn(args.model_dir, args)), flush=True)
        return
    from core.tiny import build_tiny_model
    from training.demo_model import phantom_texts

    with tempfile.TemporaryDirectory() as tmp:
        if args.real_dims:
            from core.replicas import build_replica

            model_dir = build_replica("smolvlm", Path(tmp) / "smolvlm-256m", real_dims=True)
        else:
            model_dir = build_tiny_model(Path(tmp) / "tiny", extra_texts=phantom_texts())
        results = {}
        for worker in ("ours", "trl"):
            cmd = [sys.executable, "-m", "bench.refine", "--worker", worker, "--model-dir", str(model_dir),
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--examples", str(args.examples),
                   "--lr", str(args.lr), "--device", args.device, "--gradient-checkpointing", args.gradient_checkpointing]
            cmd += ["--bf16"] if args.bf16 else []
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{worker} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
            results[worker] = json.loads(line[7:])
    o, t = results["ours"], results["trl"]
    model = "SmolVLM-256M-Instruct's dimensions (random weights)" if args.real_dims else "tiny SmolVLM"
    print(f"refine bench: {args.steps} steps x batch {args.batch_size}, {model}, LoRA r16 (attention + MLP) + lm_head, device {args.device}, "
          f"gradient checkpointing {args.gradient_checkpointing} in both, {'bf16 autocast' if args.bf16 else 'float32'} in both")
    for name, r in results.items():
        print(f"  {name:<5} {r['examples_per_s']:8.3f} examples/s  peak {r['peak_mb']:8.1f} MB  "
              f"final training loss {r['final_loss']:.4f} (as logged)  answer-token loss after training {r['eval_loss']:.4f}")
    print(f"  ratio ours/TRL: throughput {o['examples_per_s'] / t['examples_per_s']:.2f}x (target >= 1.0), "
          f"peak memory {o['peak_mb'] / t['peak_mb']:.2f}x, answer-token loss {o['eval_loss']:.4f} vs {t['eval_loss']:.4f} "
          f"(same tokens, same masking; TRL's logged loss also counts the newline after the eos)")


if __name__ == "__main__":
    main()
