"""QLoRA refine and gradient checkpointing: the option plumbing, the messages, and what checkpointing must not change.

    python -m pytest -q -p no:cacheprovider tests/test_qlora.py

No GPU here: 4-bit loading itself (bitsandbytes, CUDA) is not run. What is tested is
everything around it: `--quantize 4bit` refused in one line before anything is written,
bitsandbytes' absence named, `--gradient-checkpointing` reaching the model and leaving the
loss curve as it was (the same batches, the same dropout masks), and an adapter trained
on a base of one precision loading on a base of another (a 4-bit base's adapter is
plain LoRA tensors, the same file a bf16 or fp32 base takes).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_refine import COLOURS, CORRECTIONS, QUESTION, lesion, seed_store, settings_for

from core.config import Settings
from core.engine import Engine
from core.errors import ModelLoadError
from core.models import load_model, quantization_config

from conftest import draw_lesion


def test_quantize_4bit_on_cpu_is_one_line_and_writes_nothing(tiny_model_dir, dermaloop_home, capsys):
    from training.refine.run import main

    settings = settings_for(dermaloop_home, tiny_model_dir)
    seed_store(settings, [(lesion(c), QUESTION, "No idea.", a) for c, a in zip(COLOURS[:2], CORRECTIONS)], base=str(tiny_model_dir))
    assert main(["--quantize", "4bit", "--min-new", "0", "--gold-holdout", "0", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "4-bit loading needs a CUDA GPU" in err and "drop --quantize" in err
    assert not (dermaloop_home / "runs").exists() or not list((dermaloop_home / "runs").iterdir())


def test_without_bitsandbytes_the_message_names_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ModelLoadError) as err:
        quantization_config("4bit", "cuda:1", torch.bfloat16)  # accelerate names each process's GPU
    assert "\n" not in str(err.value) and "pip install bitsandbytes" in str(err.value)
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        quantization_config("4bit", "cpu", torch.float32)


def test_gradient_checkpointing_option_is_parsed_and_checked():
    from core.config import parse_cli
    from core.errors import InputError
    from training.refine.config import RefineConfig

    (cfg,), _ = parse_cli([RefineConfig], ["--gradient-checkpointing", "on"], prog="python -m training.refine")
    assert cfg.gradient_checkpointing == "on"
    assert RefineConfig().gradient_checkpointing == "auto"
    with pytest.raises(InputError, match="--gradient-checkpointing must be one of auto, on, off"):
        RefineConfig.from_dict({"gradient_checkpointing": "yes"})


def _train_curve(model_dir, *, checkpointing: bool, dtype: str = "float32", steps: int = 5):
    from accelerate import Accelerator

    from training.refine.collate import TrainTurn, encode
    from training.refine.lora import attach_lora, prepare_for_training
    from training.refine.train import LoopConfig, train

    torch.manual_seed(0)
    loaded = load_model(model_dir, device="cpu", dtype=dtype)
    engine = Engine(loaded, Settings.from_env(max_new_tokens=8))
    feats = [encode(engine, TrainTurn(str(i), ("x",), QUESTION, a, None, "free", "expert"), [lesion(c)])
             for i, (c, a) in enumerate(zip(COLOURS, CORRECTIONS))]
    base = prepare_for_training(loaded.model, quantized=False, gradient_checkpointing=checkpointing)
    model = attach_lora(base, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        r=8, alpha=16, dropout=0.1)  # dropout on: checkpointing must replay the same masks
    # Count the starts of a module inside a layer: transformers checkpoints a layer's forward, not its hooks, and
    # torch stops a replay once it has what backward needs, before the module's end.
    mlp = next(m for n, m in model.named_modules() if n.endswith("text_model.layers.0.mlp"))
    calls = []
    mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    cfg = LoopConfig(steps=steps, batch_size=3, grad_accum=1, learning_rate=5e-3, warmup_ratio=0.0, weight_decay=0.0,
                     max_grad_norm=1.0, seed=0, save_steps=0, keep_checkpoints=1)
    result = train(model, feats, cfg, accelerator=Accelerator(cpu=True), pad_id=loaded.processor.tokenizer.pad_token_id,
                   progress=False)
    return result, len(calls), model, loaded


def test_gradient_checkpointing_trains_the_same_loss_curve(tiny_model_dir):
    plain, plain_calls, _, _ = _train_curve(tiny_model_dir, checkpointing=False)
    ckpt, ckpt_calls, model, _ = _train_curve(tiny_model_dir, checkpointing=True)
    assert plain_calls == 5 and ckpt_calls == 10  # checkpointing really ran: every layer's forward replayed in backward
    assert model.base_model.model.is_activation_checkpointing
    assert [s for s, _ in ckpt.losses] == [s for s, _ in plain.losses]
    assert [v for _, v in ckpt.losses] == pytest.approx([v for _, v in plain.losses], rel=1e-4, abs=1e-5)
    assert plain.losses[-1][1] < plain.losses[0][1]  # and it is a curve that learns


def test_an_adapter_trained_on_one_precision_loads_on_another(tiny_model_dir, tmp_path):
    from training.refine.lora import save_adapter

    _, _, model, loaded = _train_curve(tiny_model_dir, checkpointing=True, dtype="bfloat16", steps=3)
    adapter = save_adapter(model, tmp_path / "adapter")
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] and "quantization_config" not in saved
    trained = {n.replace(".default", "").removeprefix("base_model.model."): p.detach().float()
               for n, p in model.named_parameters() if "lora_" in n}
    for dtype in ("float32", "bfloat16"):
        engine = Engine(load_model(tiny_model_dir, device="cpu", dtype=dtype), Settings.from_env(max_new_tokens=4))
        engine.add_adapter("v2", adapter)
        got = {n.replace(".v2", ""): p.detach().float() for n, p in engine.model.named_parameters() if "lora_" in n and ".v2" in n}
        assert got.keys() == trained.keys()
        assert all(torch.allclose(got[n], trained[n], atol=1e-2) for n in got)  # bf16 training: bf16 rounding at most
        assert engine.answer([draw_lesion()], QUESTION, version="v2").status == "complete"
