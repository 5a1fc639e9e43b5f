"""The one model loader: any VLM that works with AutoProcessor + AutoModelForImageTextToText.

`load_model(source)` takes a hub id or a local directory and returns the model,
its processor and a small record of what was loaded; the app, the trainer, the
evaluator and the benchmarks all call it. Errors a person can fix (a missing
directory, a hub id that cannot be reached) become `ModelLoadError` naming it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import ModelLoadError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    source: str  # hub id or local path as given
    model_type: str  # e.g. idefics3, llava
    device: str
    dtype: str
    parameters: int
    image_splitting: bool | None  # None when the processor has no such option
    local: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel
    processor: Any  # its ProcessorMixin
    info: ModelInfo


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device cuda was asked for but no CUDA GPU is available")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def is_local(source: str) -> bool:
    """A path that exists, or that is written like a path (absolute, ./, ~): never sent to the hub."""
    return Path(source).expanduser().exists() or source.startswith((os.sep, ".", "~")) or source.count("/") > 1


def same_model(a: str, b: str) -> bool:
    """Whether two sources name the same model (local paths compared resolved, hub ids as written)."""
    if is_local(a) and is_local(b):
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a == b


def load_model(
    source: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    image_splitting: str = "auto",
    longest_edge: int = 0,
) -> LoadedModel:
    """Load a VLM and its processor from a hub id or a local directory."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    source = str(source)
    local = is_local(source)
    if local:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model directory not found: {path}")
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is not a model directory: config.json is missing")
        source = str(path)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype, local_files_only=local)
    except (OSError, ValueError) as e:
        where = "the local directory" if local else "the Hugging Face Hub (offline, or no such model?)"
        raise ModelLoadError(f"could not load model {source!r} from {where}: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    if getattr(processor, "chat_template", None) is None:
        raise ModelLoadError(f"model {source!r} has no chat template; DermaLoop needs an instruction-tuned VLM")
    processor.tokenizer.padding_side = "left"  # batched generation appends after the prompt
    splitting = _configure_images(processor, image_splitting, device, longest_edge)
    info = ModelInfo(
        source=source,
        model_type=model.config.model_type,
        device=device,
        dtype=str(torch_dtype).removeprefix("torch."),
        parameters=sum(p.numel() for p in model.parameters()),
        image_splitting=splitting,
        local=local,
    )
    return LoadedModel(model, processor, info)


def _limit_longest_edge(image_processor: Any, longest_edge: int) -> None:
    """Resize images to `longest_edge` before the model: processors that resize to a longest edge
    (Idefics3: SmolVLM, SmolVLM2; fewer tiles when splitting) take it; fixed-size ones cannot."""
    import dataclasses
    import logging

    size = getattr(image_processor, "size", None)
    # transformers 5.x keeps `size` as a SizeDict dataclass, 4.x as a dict.
    current = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    if current is None:
        logging.getLogger("dermaloop.core").warning(
            "longest_edge=%d has no effect: %s gives the model fixed-size images", longest_edge,
            type(image_processor).__name__)
        return
    if isinstance(size, dict):
        image_processor.size = {**size, "longest_edge": longest_edge}
    else:
        image_processor.size = dataclasses.replace(size, longest_edge=longest_edge)


def _configure_images(processor: Any, image_splitting: str, device: str, longest_edge: int) -> bool | None:
    """Apply the image budget: tiling costs ~6x the time on CPU, so `auto` turns it off there."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return None
    if longest_edge:
        _limit_longest_edge(image_processor, longest_edge)
    if not hasattr(image_processor, "do_image_splitting"):
        return None
    if image_splitting != "auto":
        image_processor.do_image_splitting = image_splitting == "on"
    elif device == "cpu":
        image_processor.do_image_splitting = False
    return bool(image_processor.do_image_splitting)
