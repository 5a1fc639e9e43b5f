"""LoRA adapters: which modules get one, how to start (fresh or from a saved adapter), how to save.

Adapters are plain peft adapters (`adapter_config.json` + `adapter_model.safetensors`),
the format `core.Engine.add_adapter` loads through transformers' `load_adapter`.
Targets are named by leaf name (`q_proj`, ...) and resolved to the language model's
modules only, unless the vision tower is asked for too; `modules_to_save` (default
`lm_head`) are trained in full and saved with the adapter: on a small model the
output layer is where a new answer vocabulary is learned fastest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch

from training.errors import TrainingError

VISION_MARKERS = ("vision", "visual", "image_tower", "vision_tower")  # module-path parts of image encoders


def resolve_targets(model: torch.nn.Module, leaf_names: Iterable[str], *, vision: bool = False) -> list[str]:
    """Full module names of the Linear layers whose last name part is in `leaf_names`.

    Image-encoder modules are left out unless `vision`; a leaf name that matches no
    module raises (a typo should not silently train nothing).
    """
    leaves = [n.strip() for n in leaf_names if n.strip()]
    found: dict[str, list[str]] = {leaf: [] for leaf in leaves}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in found:
            continue
        in_vision = any(m in part for part in name.split(".") for m in VISION_MARKERS)
        if in_vision and not vision:
            continue
        found[leaf].append(name)
    missing = [leaf for leaf, names in found.items() if not names]
    if missing:
        raise TrainingError(f"no {'' if vision else 'language-model '}Linear module named {', '.join(missing)} in this model")
    return sorted(n for names in found.values() for n in names)


def attach_lora(
    model: torch.nn.Module,
    *,
    targets: Iterable[str],
    r: int,
    alpha: int,
    dropout: float,
    vision: bool = False,
    modules_to_save: Iterable[str] = ("lm_head",),
    init_from: str | Path | None = None,
    adapter_name: str = "default",
) -> Any:
    """Wrap `model` in a trainable peft model: a fresh LoRA, or the saved adapter `init_from`.

    Continuing from a saved adapter keeps that adapter's own targets and rank.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if init_from is not None:
        init_from = Path(init_from)
        if not (init_from / "adapter_config.json").exists():
            raise TrainingError(f"cannot continue from {init_from}: no adapter_config.json there")
        return PeftModel.from_pretrained(model, str(init_from), adapter_name=adapter_name, is_trainable=True)
    save = [m for m in modules_to_save if m]
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    unknown = [m for m in save if m not in names]
    if unknown:
        raise TrainingError(f"modules_to_save: no module named {', '.join(unknown)} in this model")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=resolve_targets(model, targets, vision=vision),
        modules_to_save=save or None,
        bias="none",
    )
    return get_peft_model(model, config, adapter_name=adapter_name)


def prepare_for_training(model: torch.nn.Module, *, quantized: bool, gradient_checkpointing: bool) -> torch.nn.Module:
    """Get a base ready for LoRA: QLoRA's preparation on a 4-bit base, checkpointing where asked.

    On a 4-bit base, peft's `prepare_model_for_kbit_training` freezes the base, keeps the
    layers that stay unquantized (norms, embeddings) in float32 for stable gradients, and
    makes the input embeddings' output require grad so checkpointed blocks see a gradient.
    Non-reentrant checkpointing replays the same dropout masks (it restores the RNG), so
    the loss curve equals the one without it; only memory and time change.
    """
    kwargs = {"use_reentrant": False}
    if quantized:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs=kwargs)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        model.config.use_cache = False  # a cache is useless in training and conflicts with recomputation
    return model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors (LoRA weights and modules_to_save copies), detached on CPU."""
    return {n: p.detach().to("cpu").clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise TrainingError(f"checkpoint does not fit this model ({len(missing)} tensors unknown, e.g. {missing[0]})")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def save_adapter(peft_model: Any, out_dir: str | Path) -> Path:
    """Save in standard peft format (safetensors); returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The base embeddings and lm_head are in the base model: never copy them into the adapter.
    peft_model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    assert (out / "adapter_config.json").exists()
    return out


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total

