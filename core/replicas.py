"""Tiny replicas of published VLM checkpoints, built offline from their real files.

    python -m core.replicas FAMILY OUT_DIR [--fixtures tests/fixtures/families] [--seed 0] [--real-dims]

A fixture folder (tests/fixtures/families/<family>/, see its SOURCE.md) holds the
published checkpoint's config.json, preprocessor/processor config, chat template,
special tokens and generation config. `build_replica` keeps all of that and shrinks
only what costs time: layers, hidden sizes, image size and the vocabulary (a
byte-level BPE trained in-process with the checkpoint's own special tokens, so the
token ids in the config are remapped by name). Everything else (the template, the
processor class and its options, the stop tokens) is the published one, so a test
on a replica exercises what a person meets with the real checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "families"

_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=1024)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

# Per model_type: config keys holding token ids (remapped by token), stop tokens, extra vocabulary,
# and the shrunk vision / processor settings. The values named here are the only ones changed.
FAMILIES: dict[str, dict[str, Any]] = {
    "idefics3": dict(
        token_keys={"image_token_id": "<image>"},
        stop=["<end_of_utterance>"],
        extra_tokens=["<image>", "<fake_token_around_image>", "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
        vision=dict(_VISION, image_size=64, patch_size=8),
        preprocessor={"size": {"longest_edge": 128}, "max_image_size": {"longest_edge": 64}},
        processor={"image_seq_len": 4},  # (64/8)^2 patches / scale_factor 4 squared
    ),
    "llava": dict(
        token_keys={"image_token_index": "<image>"},
        stop=["</s>"],
        extra_tokens=["<image>"],
        vision=dict(_VISION, image_size=28, patch_size=14, projection_dim=32),
        preprocessor={"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}},
        processor={},
    ),
    "gemma3": dict(
        token_keys={"boi_token_index": "<start_of_image>", "eoi_token_index": "<end_of_image>", "image_token_index": "<image_soft_token>"},
        stop=["<eos>", "<end_of_turn>"],
        extra_tokens=["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
        vision=dict(_VISION, image_size=56, patch_size=14),
        top={"mm_tokens_per_image": 4},  # 4x4 patches pooled to 2x2
        preprocessor={"size": {"height": 56, "width": 56}, "image_seq_length": 4},
        processor={"image_seq_length": 4},
        text={"sliding_window": 512},
    ),
    "mllama": dict(
        token_keys={"image_token_index": "<|image|>"},
        stop=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        extra_tokens=["<|image|>", "<|python_tag|>"],
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, attention_heads=2, num_global_layers=1,
                    intermediate_layers_indices=[0], vision_output_dim=64, image_size=28, patch_size=14),
        preprocessor={"size": {"height": 28, "width": 28}},
        processor={},
        text={"cross_attention_layers": [1], "head_dim": None,
              "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                               "original_max_position_embeddings": 512, "rope_type": "llama3"}},
    ),
    "qwen2_5_vl": dict(
        token_keys={"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                    "vision_token_id": "<|vision_pad|>", "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"},
        stop=["<|im_end|>", "<|endoftext|>"],
        extra_tokens=["<|endoftext|>"],
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1]),
        preprocessor={"max_pixels": 4 * 3136},
        processor={},
        top={"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},  # sums to head_dim / 2
    ),
}
FAMILIES["llava_onevision"] = dict(
    token_keys={"image_token_index": "<image>", "video_token_index": "<video>"},
    stop=["<|im_end|>", "<|endoftext|>"],
    extra_tokens=["<|endoftext|>"],
    vision=dict(_VISION, image_size=28, patch_size=14),
    # the published 6x6 grid of 384 px tiles, scaled to 28 px tiles
    top={"image_grid_pinpoints": [[a * 28, b * 28] for a in range(1, 7) for b in range(1, 7)]},
    preprocessor={"size": {"height": 28, "width": 28}, "image_grid_pinpoints": [[a * 28, b * 28] for a in range(1, 7) for b in range(1, 7)]},
    processor={"num_image_tokens": 4},
)
FAMILIES["smolvlm"] = FAMILIES["idefics3"]
FAMILIES["qwen3_vl"] = dict(
    token_keys={"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"},
    stop=["<|im_end|>", "<|endoftext|>"],
    extra_tokens=["<|endoftext|>"],
    # deepstack taps must name vision layers that exist; position embeddings stay a square grid (4x4)
    vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, deepstack_visual_indexes=[0, 1],
                num_position_embeddings=16),
    preprocessor={"size": {"longest_edge": 4 * 1024, "shortest_edge": 1024}},  # 1 to 4 merged 32x32 patches per image
    processor={},
    text={"rope_scaling": {"mrope_interleaved": True, "mrope_section": [2, 3, 3], "rope_type": "default"}},  # sums to head_dim / 2
)


def fixture_names(root: Path = FIXTURES) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "config.json").exists() and (p / "chat_template.jinja").exists())


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _special_tokens(smap: dict) -> tuple[list[str], dict[str, str]]:
    """All special tokens of a special_tokens_map, and the named extra ones (image_token, boi_token...)."""
    tokens: list[str] = []
    named: dict[str, str] = {}
    for key, value in smap.items():
        values = value if isinstance(value, list) else [value]
        values = [v["content"] if isinstance(v, dict) else v for v in values]
        tokens += [v for v in values if v not in tokens]
        if key not in ("bos_token", "eos_token", "pad_token", "unk_token", "additional_special_tokens"):
            named[key] = values[0]
    return tokens, named


def build_tokenizer(smap: dict, extra_tokens: list[str]):
    """A byte-level BPE (trained here, offline) with the checkpoint's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from core.tiny import _BASE_CORPUS

    specials, named = _special_tokens(smap)
    specials += [t for t in extra_tokens if t not in specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(_BASE_CORPUS), trainer=trainer)
    kwargs = {k: smap[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in smap}
    extra = [t for t in specials if t not in kwargs.values()]
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=extra, extra_special_tokens=named,
                                   model_max_length=_TEXT["max_position_embeddings"], **kwargs)


def _shrink(cfg: dict, spec: dict, tokenizer, *, real_dims: bool = False) -> dict:
    """The published config with the token ids remapped to the offline tokenizer's; shrunk unless `real_dims`.

    With `real_dims` every dimension stays as published, the vocabulary size included (the
    offline tokenizer's ids all fall inside it), so the embedding and output layers have
    their real size: what a benchmark at real dimensions needs.
    """
    cfg = copy.deepcopy(cfg)
    text = cfg.get("text_config", cfg)  # Qwen2.5-VL keeps its text settings at the top level
    if not real_dims:
        text.update(_TEXT, vocab_size=len(tokenizer), **spec.get("text", {}))
        for key in [k for k, v in text.items() if v is None]:
            del text[key]  # a None in the spec means: let the config class derive it
    if tokenizer.pad_token_id is not None:
        text["pad_token_id"] = tokenizer.pad_token_id
    for key, tid in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id)):
        text.pop(key, None)
        if tid is not None and text is not cfg:
            text[key] = tid
    if not real_dims:
        if "vocab_size" in cfg and cfg is not text:
            cfg["vocab_size"] = len(tokenizer)
        cfg["vision_config"].update(spec["vision"])
        cfg.update(spec.get("top", {}))
    for key, token in spec["token_keys"].items():
        cfg[key] = tokenizer.convert_tokens_to_ids(token)
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        cfg.pop(key, None)
    return cfg


def _parts(family: str, fixtures: Path, real_dims: bool) -> tuple[Path, dict, Any, dict]:
    """(fixture folder, family spec, offline tokenizer, model config dict) of a replica."""
    src = Path(fixtures) / family
    cfg = _read(src / "config.json")
    if "auto_map" in cfg:
        raise ValueError(f"{family} runs its own code from the hub (auto_map); no offline replica can be built")
    spec = FAMILIES[cfg["model_type"]]
    tokenizer = build_tokenizer(_read(src / "special_tokens_map.json"), spec["extra_tokens"])
    return src, spec, tokenizer, _shrink(cfg, spec, tokenizer, real_dims=real_dims)


def build_processor(family: str, out_dir: str | Path, *, fixtures: Path = FIXTURES, real_dims: bool = False) -> Any:
    """The replica's processor (published files, offline tokenizer), saved in `out_dir` and returned."""
    from transformers import AutoProcessor

    src, spec, tokenizer, _ = _parts(family, fixtures, real_dims)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    shutil.copy(src / "chat_template.jinja", out / "chat_template.jinja")
    for name, changes in (("preprocessor_config.json", spec["preprocessor"]), ("processor_config.json", spec["processor"]),
                          ("video_preprocessor_config.json", {})):  # Qwen3-VL's processor needs its video settings
        data = _read(src / name)
        if data:
            (out / name).write_text(json.dumps({**data, **({} if real_dims else changes)}, indent=2))
    return AutoProcessor.from_pretrained(out, local_files_only=True)


def replica_parameters(family: str, *, fixtures: Path = FIXTURES, real_dims: bool = True) -> int:
    """Parameters of the replica, counted on the meta device (no memory, no time): to decide before building."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    _, _, _, model_cfg = _parts(family, fixtures, real_dims)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**model_cfg))
    return sum(p.numel() for p in model.parameters())


def build_replica(family: str, out_dir: str | Path, *, fixtures: Path = FIXTURES, seed: int = 0, real_dims: bool = False) -> Path:
    """Build, save and return a random replica of the checkpoint in `fixtures/family`: tiny, or with
    `real_dims` at the published dimensions and image budget (for benchmarks; minutes and GBs)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    src, spec, tokenizer, model_cfg = _parts(family, fixtures, real_dims)
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        processor = build_processor(family, tmp, fixtures=fixtures, real_dims=real_dims)
    config = AutoConfig.for_model(**model_cfg)
    model = AutoModelForImageTextToText.from_config(config)
    stops = [tokenizer.convert_tokens_to_ids(t) for t in spec["stop"]]
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "REPLICA.json").write_text(json.dumps({"family": family, "source": (src / "SOURCE.md").read_text().splitlines()[0]
                                                  if (src / "SOURCE.md").exists() else family, "seed": seed,
                                                  "real_dims": real_dims}, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--fixtures", type=Path, default=FIXTURES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-dims", action="store_true", help="keep the published dimensions (random weights)")
    args = parser.parse_args(argv)
    print(build_replica(args.family, args.out_dir, fixtures=args.fixtures, seed=args.seed, real_dims=args.real_dims))


if __name__ == "__main__":
    main()
