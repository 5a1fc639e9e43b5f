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
        return torch.bfloat16 if device.split(":")[0] == "cuda" else torch.float32
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


def context_length(config: Any) -> int | None:
    """The longest token sequence the language model reads (its max_position_embeddings), if it says."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


def load_model(
    source: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    image_splitting: str = "auto",
    longest_edge: int = 0,
    trust_remote_code: bool = False,
    quantize: str = "",
    device_map: str = "",
) -> LoadedModel:
    """Load a VLM and its processor from a hub id or a local directory.

    `trust_remote_code` lets a checkpoint run its own Python from the hub (moondream2 does):
    off unless asked for, since that code runs with the user's rights. `quantize="4bit"`
    loads the weights in 4-bit NF4 (bitsandbytes, CUDA only; QLoRA refine trains on it);
    `device_map="auto"` spreads a model larger than one GPU over all of them (accelerate).
    `device` may name a GPU ("cuda:1", as accelerate does per process).
    """
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
        if not trust_remote_code and "auto_map" in _read_config(path):
            raise ModelLoadError(f"model {source!r} runs its own code from its repository (trust_remote_code); that is off "
                                 "by default: pass --trust-remote-code only for a source you trust")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    extra: dict[str, Any] = {}
    if quantize:
        extra["quantization_config"] = quantization_config(quantize, device, torch_dtype)
    if device_map:
        if device_map != "auto":
            raise ModelLoadError(f"device_map must be auto or empty, not {device_map!r}")
        extra["device_map"] = "auto"
    elif quantize:  # bitsandbytes places the quantized weights itself, on this process's GPU
        extra["device_map"] = {"": torch.device(device).index or 0}
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local, trust_remote_code=trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype, local_files_only=local,
                                                            trust_remote_code=trust_remote_code, **extra)
    except ImportError as e:  # a processor or model that needs a package not installed here
        raise ModelLoadError(_missing_package_message(source, e)) from None
    except (OSError, ValueError) as e:
        if not trust_remote_code and "trust_remote_code" in str(e):
            raise ModelLoadError(f"model {source!r} runs its own code from its repository (trust_remote_code); that is "
                                 "off by default: pass --trust-remote-code only for a source you trust") from None
        where = "the local directory" if local else "the Hugging Face Hub (offline, or no such model?)"
        raise ModelLoadError(f"could not load model {source!r} from {where}: {str(e).splitlines()[0]}") from None
    if "device_map" not in extra:
        model.to(device)
    model.eval()
    if getattr(processor, "chat_template", None) is None:
        raise ModelLoadError(f"model {source!r} has no chat template; DermaLoop needs an instruction-tuned VLM")
    processor.tokenizer.padding_side = "left"  # batched generation appends after the prompt
    splitting = _configure_images(processor, image_splitting, device, longest_edge)
    info = ModelInfo(
        source=source,
        model_type=model.config.model_type,
        device=device,
        dtype=str(torch_dtype).removeprefix("torch.") + (f"+{quantize}" if quantize else ""),
        parameters=sum(p.numel() for p in model.parameters()),
        image_splitting=splitting,
        local=local,
    )
    return LoadedModel(model, processor, info)


def quantization_config(quantize: str, device: str, compute_dtype: torch.dtype) -> Any:
    """bitsandbytes' 4-bit NF4 settings (double quantization, computing in `compute_dtype`), or a clear refusal."""
    if quantize != "4bit":
        raise ModelLoadError(f"quantize must be 4bit or empty, not {quantize!r}")
    if device.split(":")[0] != "cuda":
        raise ModelLoadError(f"4-bit loading needs a CUDA GPU (bitsandbytes); this run uses {device}: drop --quantize")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("4-bit loading needs bitsandbytes, which is not installed: pip install bitsandbytes "
                             "(on the CUDA machine)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


# What to install for a package a processor needs (verified here: see README "Model families").
_INSTALL = {"torchvision": "pip install torch==2.14.1 torchvision==0.29.1 (a matching pair; the lock's torch 2.13.0 has no "
                           "loadable torchvision)",
            "num2words": "pip install num2words"}


def _missing_package_message(source: str, error: ImportError) -> str:
    text = str(error)
    for package, how in _INSTALL.items():
        if package.lower() in text.lower():
            return f"model {source!r} needs {package}, which is not installed: {how}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return f"model {source!r} needs a package that is not installed: {first}"


def _read_config(path: Path) -> dict:
    import json

    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


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
