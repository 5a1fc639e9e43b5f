"""Settings of a DermaLoop instance: one typed dataclass, read from the environment.

Precedence: dataclass defaults < environment variables (`DERMALOOP_*`) < CLI flags.
`add_settings_args(parser)` generates the flags from the dataclass fields, so a
new setting needs one line here and nothing in the CLIs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"


@dataclass(frozen=True)
class GenerationSettings:
    """How one answer is decoded (stored with every turn)."""

    max_new_tokens: int = 256  # answer length cap
    do_sample: bool = False  # greedy by default: the same input gives the same answer
    temperature: float = 0.7  # only when sampling
    top_p: float = 0.9  # only when sampling
    repetition_penalty: float = 1.1  # small VLMs loop without it

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Settings:
    """Everything a running instance needs to know; see README "Configuration"."""

    home: Path = Path("dermaloop-data")  # DERMALOOP_HOME: data directory
    model: str = DEFAULT_MODEL  # DERMALOOP_MODEL: base model, hub id or local path
    db: str = ""  # DERMALOOP_DB: SQLAlchemy URL; empty = SQLite file in home
    device: str = "auto"  # DERMALOOP_DEVICE: auto|cpu|cuda|mps
    dtype: str = "auto"  # DERMALOOP_DTYPE: auto (bf16 on CUDA, fp32 elsewhere)|float32|bfloat16|float16
    image_splitting: str = "auto"  # DERMALOOP_IMAGE_SPLITTING: auto (off on CPU: ~6x slower)|on|off
    longest_edge: int = 0  # DERMALOOP_LONGEST_EDGE: resize images to this edge before the model; 0 = model default
    max_images: int = 4  # images per question
    max_pixels: int = 40_000_000  # larger uploads are rejected (decompression bombs)
    max_upload_bytes: int = 50_000_000  # larger files are rejected before decoding
    max_question_chars: int = 4000  # longer questions are rejected
    max_prompt_tokens: int = 8192  # a whole prompt (history, context, image tokens) longer than this is rejected
    max_new_tokens: int = 256  # generation defaults, see GenerationSettings
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    local_user: str = "local-expert"  # the single user of local mode (role expert)
    offline_demo: bool = False  # DERMALOOP_OFFLINE_DEMO: use the offline demonstration model and its own data (<home>/offline-demo)
    trust_remote_code: bool = field(default=False, metadata={
        "help": "let the model run its own code from its repository (moondream2 needs it); off: that code runs with your rights"})
    quantize: str = field(default="", metadata={
        "help": "4bit: load the weights in 4-bit NF4 (bitsandbytes, CUDA only), for inference and QLoRA refine"})
    device_map: str = field(default="", metadata={"help": "auto: spread a model larger than one GPU over all GPUs (accelerate)"})

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{(self.home / 'annotations.db').resolve()}"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    def generation(self) -> GenerationSettings:
        names = {f.name for f in fields(GenerationSettings)}
        return GenerationSettings(**{n: getattr(self, n) for n in names})

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "Settings":
        """Defaults, then `DERMALOOP_<FIELD>` variables, then `overrides` (None values ignored)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f, typ in _field_types(cls).items():
            raw = environ.get(f"DERMALOOP_{f.upper()}")
            if raw not in (None, ""):
                values[f] = _parse(f, typ, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "home" in values:
            values["home"] = Path(values["home"])
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        from core.errors import InputError

        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise InputError(f"device must be auto, cpu, cuda or mps, not {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InputError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if self.image_splitting not in ("auto", "on", "off"):
            raise InputError(f"image_splitting must be auto, on or off, not {self.image_splitting!r}")
        for name in ("max_images", "max_pixels", "max_new_tokens", "max_question_chars", "max_upload_bytes",
                     "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1")


def _field_types(cls: type) -> dict[str, type]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _parse(name: str, typ: type, raw: str) -> Any:
    from core.errors import InputError

    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ is Path:
            return Path(raw)
        return typ(raw)
    except ValueError:
        raise InputError(f"DERMALOOP_{name.upper()}={raw!r} is not a valid {typ.__name__}") from None


def add_settings_args(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Add one `--flag` per Settings field (or those in `only`); defaults stay None = not given."""
    for name, typ in _field_types(Settings).items():
        if only is not None and name not in only:
            continue
        flag = "--" + name.replace("_", "-")
        help_ = f"overrides DERMALOOP_{name.upper()}"
        if typ is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(flag, dest=name, type=typ, default=None, help=help_)


def settings_from_args(args: argparse.Namespace) -> Settings:
    names = {f.name for f in fields(Settings)}
    return Settings.from_env(**{k: v for k, v in vars(args).items() if k in names})
