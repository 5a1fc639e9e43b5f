"""Settings of a DermaLoop instance, and the one way every command turns dataclasses into flags.

Each option is defined once, as a dataclass field made with `opt(default, help, choices=...)`.
`parse_cli([Settings, OtherConfig], argv, prog=...)` builds the command line from those
fields with TRL's `TrlParser` (on transformers' `HfArgumentParser`): defaults, then
`DERMALOOP_*` environment variables (for Settings), then `--config FILE` (YAML, any
field), then flags; `--help` shows each field's help and allowed values.

    from core.config import Settings, parse_cli
    (settings,), given = parse_cli([Settings], ["--device", "cpu"], prog="python -m demo")
    Settings.from_env()                     # no command line: defaults, then the environment
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"


def opt(default: Any, help: str, *, choices: Sequence[Any] | None = None, minimum: float | None = None, **argparse_kw: Any) -> Any:
    """A dataclass field with what a person needs to know: its help, its allowed values or minimum
    (checked by `check_fields` for every source: flags, variables, files, code), extra argparse keywords."""
    meta: dict[str, Any] = {"help": help, **argparse_kw}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if minimum is not None:
        meta["minimum"] = minimum
    if isinstance(default, list):
        meta.setdefault("action", ManyValues)
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


class ManyValues(argparse.Action):
    """`--x A B` and `--x A --x B` both give [A, B]; the default (or the config file's list) is replaced."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, "_given_lists", set())
        old = getattr(namespace, self.dest) if self.dest in given else []
        setattr(namespace, self.dest, [*old, *values])
        namespace._given_lists = given | {self.dest}


def check_fields(obj: Any, prefix: str = "--") -> None:
    """Allowed values and minimums from the fields' metadata; InputError (one line) naming the option."""
    from core.errors import InputError

    for f in fields(obj):
        value, name = getattr(obj, f.name), prefix + (f.name.upper() if prefix.isupper() else f.name.replace("_", "-"))
        choices = f.metadata.get("choices")
        bad = [v for v in (value if isinstance(value, list) else [value]) if choices is not None and v not in choices]
        if bad:
            raise InputError(f"{name} must be one of {', '.join(map(str, choices))}, not {bad[0]!r}")
        minimum = f.metadata.get("minimum")
        if minimum is not None and value is not None and value < minimum:
            raise InputError(f"{name} must be at least {minimum}, not {value!r}")


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

    _argument_group_name = "instance settings (each also a DERMALOOP_<NAME> variable)"

    home: Path = opt(Path("dermaloop-data"), "data directory: database, images, model versions, refine runs")
    model: str = opt(DEFAULT_MODEL, "base model: a hub id or a local directory")
    db: str = opt("", "SQLAlchemy URL of the store, e.g. postgresql+psycopg://user:pw@host/db (empty: SQLite in the data directory)")
    device: str = opt("auto", "where the model runs (auto: CUDA, then MPS, then CPU)", choices=("auto", "cpu", "cuda", "mps"))
    dtype: str = opt("auto", "weights' precision (auto: bfloat16 on CUDA, float32 elsewhere)",
                     choices=("auto", "float32", "bfloat16", "float16"))
    image_splitting: str = opt("auto", "split images into tiles (auto: off on CPU, where tiling costs ~6x the time)",
                               choices=("auto", "on", "off"))
    longest_edge: int = opt(0, "resize images to this longest edge before the model (0: the model's default)", minimum=0)
    max_images: int = opt(4, "images per question", minimum=1)
    max_pixels: int = opt(40_000_000, "larger uploads are rejected (decompression bombs)", minimum=1)
    max_upload_bytes: int = opt(50_000_000, "larger files are rejected before decoding", minimum=1)
    max_question_chars: int = opt(4000, "longer questions are rejected", minimum=1)
    max_prompt_tokens: int = opt(8192, "a whole prompt (history, context, image tokens) longer than this is rejected", minimum=1)
    max_new_tokens: int = opt(256, "answer length cap in tokens", minimum=1)
    do_sample: bool = opt(False, "sample answers instead of greedy decoding (greedy: the same input gives the same answer)")
    temperature: float = opt(0.7, "sampling temperature (only when sampling)", minimum=0.0)
    top_p: float = opt(0.9, "nucleus sampling mass (only when sampling)", minimum=0.0)
    repetition_penalty: float = opt(1.1, "penalty on repeated tokens (small VLMs loop without it)", minimum=0.0)
    local_user: str = opt("local-expert", "the single user of the login-free local mode (role expert)")
    offline_demo: bool = opt(False, "use the offline demonstration model and its own data (<home>/offline-demo)")
    review_own_answers: bool = opt(False, "let a rater review answers to their own questions (on: one person can try the whole "
                                          "loop, e.g. in local mode; off: experts review others' answers)")
    trust_remote_code: bool = opt(False, "let the model run its own code from its repository (moondream2 needs it); "
                                         "that code runs with your rights")
    quantize: str = opt("", "4bit: load the weights in 4-bit NF4 (bitsandbytes, CUDA only), for answering and for QLoRA refine", choices=("", "4bit"))
    device_map: str = opt("", "auto: spread a model larger than one GPU over all GPUs (accelerate)", choices=("", "auto"))
    kv_cache_mb: int = opt(1024, "memory for the keys/values of live conversations, so follow-ups skip re-encoding "
                                 "(least recently used dropped first; 0: off)", minimum=0)
    max_batch: int = opt(8, "answers decoded together when clinicians ask at once (dynamic batching, core/scheduler.py; "
                            "1: one answer at a time)", minimum=1)
    feature_cache_mb: int = opt(256, "memory for image features by image content, so an image is encoded once: at upload, "
                                     "and again for no later question or conversation (0: off)", minimum=0)
    backend: str = opt("local", "where answers are generated: local (this process, transformers) or openai (an "
                                "OpenAI-compatible server such as vLLM at --endpoint)", choices=("local", "openai"))
    endpoint: str = opt("", "base URL of the OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (backend openai)")
    endpoint_model: str = opt("", "the server's name for the base model (empty: --model); adapter versions are "
                                  "requested by their version name (vLLM LoRA adapters)")
    cpu_decode_threads: int = opt(1, "CPU threads for decoding once the prompt is encoded (0: as many as torch uses). One "
                                     "thread decoded 21x faster than two on 2 cores shared with other processes, where "
                                     "OpenMP's spinning threads stall every small op (python -m bench.engine)", minimum=0)
    endpoint_timeout_s: float = opt(120.0, "seconds to wait for the server to answer or send the next chunk", minimum=1.0)
    cpu_decode: str = opt("input-major", "how the language model decodes on CPU (core/decode.py): as-loaded; input-major "
                                         "(weights re-laid for MKL, 1.2-1.3x); compiled (torch.compile max-autotune, 2x; the app "
                                         "compiles at start and after a promotion, 1-2 min on 2 cores, more memory, needs g++)",
                          choices=("as-loaded", "input-major", "compiled"))

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
        check_fields(settings, "DERMALOOP_")
        return settings


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


def parse_cli(types: Sequence[type], argv: Sequence[str] | None, *, prog: str, description: str = "",
              environ: dict[str, str] | None = None) -> tuple[tuple[Any, ...], set[str]]:
    """Instances of `types` from defaults < DERMALOOP_* variables (Settings) < `--config FILE` < flags,
    each checked (`check_fields`, then its own `validate()` if any), and the names of the fields that
    were given rather than defaulted. A bad flag exits 2 with argparse's one-line message; a bad
    variable or config file raises InputError."""
    import sys

    from core.errors import InputError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(list(types), prog=prog, description=description, allow_abbrev=False, formatter_class=_Formatter)
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings (any option, by field name); flags override it")
    names = {f.name for t in types for f in fields(t)}
    for t in types:  # `--no-x` beside `--x` for every flag that is off by default (HfArgumentParser adds it for those on)
        for name, typ in _field_types(t).items():
            if typ is bool and not getattr(t, name, True):
                parser.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_false", help=argparse.SUPPRESS)
    given: set[str] = set()
    if Settings in types:
        environ = os.environ if environ is None else environ
        env = Settings.from_env(environ)
        given = {f.name for f in fields(Settings) if environ.get(f"DERMALOOP_{f.name.upper()}") not in (None, "")}
        parser.set_defaults(**{n: getattr(env, n) for n in given})
    if "--config" in argv:
        i = argv.index("--config")
        path = Path(argv[i + 1]) if i + 1 < len(argv) else None
        loaded = _read_config(path)
        unknown = set(loaded) - names
        if unknown:
            raise InputError(f"--config {path}: unknown setting(s): {', '.join(sorted(unknown))}")
        parser.set_defaults(**loaded)
        given |= set(loaded)
        del argv[i:i + 2]
    ns = parser.parse_args(argv)
    flags = {s: a.dest for a in parser._actions for s in a.option_strings}
    given |= {flags[x.split("=", 1)[0]] for x in argv if x.split("=", 1)[0] in flags}
    out = []
    for t in types:
        obj = t(**{f.name: getattr(ns, f.name) for f in fields(t)})
        check_fields(obj)
        if hasattr(obj, "validate"):
            obj.validate()
        out.append(obj)
    return tuple(out), given


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each option's default after its help."""


def _Parser(*args: Any, **kwargs: Any):
    """transformers' HfArgumentParser, given each field's metadata without our own keys (argparse would refuse them)."""
    import copy

    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        @staticmethod
        def _parse_dataclass_field(parser, f):
            f = copy.copy(f)  # HfArgumentParser also rewrites the field's type in place
            f.metadata = {k: v for k, v in f.metadata.items() if k != "minimum"}
            HfArgumentParser._parse_dataclass_field(parser, f)

        def error(self, message):  # one line, not the whole usage block
            self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    return Parser(*args, usage="%(prog)s [options]", **kwargs)


def _read_config(path: Path | None) -> dict[str, Any]:
    import yaml

    from core.errors import InputError

    if path is None or not path.is_file():
        raise InputError(f"--config: no such file: {path or '(missing)'}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise InputError(f"--config {path}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise InputError(f"--config {path}: expected a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}
