"""Every model family at its published dimensions (random weights): prompt tokens, time to first token, tokens/s.

    python -m bench.engine --family smolvlm          # one family (see tests/fixtures/families)
    python -m bench.engine --family all              # every family, then a Markdown table for the README

Each family's replica is built from its fixture at the published size (`core.replicas`,
`real_dims=True`: every dimension and the vocabulary size as published, the published
image processor, the chat template; weights random, the tokenizer trained offline).
The prompt is the engine's own (safety instruction where the template takes it, one
1536x1152 image, a question) with the processor's published image budget (SmolVLM:
image splitting on). A family whose parameters exceed `--max-params` is not built: it
would not answer on 2 CPU cores in minutes; its row still gives the prompt tokens (from
the processor alone) and says why it was skipped. Few decode tokens (`--new-tokens`):
the figures are for comparing families on this machine, not for quoting as speeds.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from core.config import GenerationSettings, Settings
from core.engine import Engine
from core.models import load_model
from core.prompts import ChatTurn, build_messages
from core.replicas import FIXTURES, build_processor, build_replica, fixture_names, replica_parameters

QUESTION = "Describe this lesion."


@dataclass
class Row:
    family: str
    dims: str  # the checkpoint's size, as built
    prompt_tokens: int
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    skipped: str = ""


def _dims(params: int) -> str:
    return f"{params / 1e9:.2f}B params" if params >= 1e9 else f"{params / 1e6:.0f}M params"


def prompt_tokens(processor, image) -> int:
    """Tokens of the engine's prompt for one image, from the processor alone (no model needed)."""
    system = Engine._template_supports_system(SimpleNamespace(processor=processor))  # the engine's own probe
    messages, _ = build_messages([ChatTurn(QUESTION, None, [image])], system=system)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return int(processor(text=[text], images=[[image]], return_tensors="pt")["input_ids"].shape[1])


def measure(family: str, image, *, new_tokens: int, repeats: int, max_params: float) -> Row:
    params = replica_parameters(family)
    with tempfile.TemporaryDirectory() as tmp:
        if params > max_params:
            processor = build_processor(family, tmp, real_dims=True)
            gb = params * 4 / 1e9
            return Row(family, _dims(params), prompt_tokens(processor, image),
                       skipped=f"not run: {params / 1e9:.1f}B parameters ({gb:.0f} GB in float32) is beyond 2 CPU cores in minutes")
        path = build_replica(family, tmp, real_dims=True)
        loaded = load_model(path, device="cpu", dtype="float32", image_splitting="on")
        engine = Engine(loaded, Settings.from_env(max_prompt_tokens=100_000))
        gen = GenerationSettings(max_new_tokens=new_tokens, repetition_penalty=1.0)
        # every run decodes exactly new_tokens: a random model may stop at once
        engine._generate = lambda **kw: loaded.model.generate(**kw, min_new_tokens=new_tokens)
        runs = [engine.answer([image], QUESTION, generation=gen) for _ in range(repeats)]
        assert all(a.completion_tokens == new_tokens for a in runs), runs
        ttft = statistics.median(a.ttft_s for a in runs)
        decode = statistics.median((new_tokens - 1) / (a.latency_s - a.ttft_s) for a in runs)
        return Row(family, _dims(params), runs[0].prompt_tokens, ttft, decode)


def markdown(rows: list[Row]) -> str:
    lines = ["| family | checkpoint dims | prompt tokens, one 1536x1152 image | time to first token | tokens/s (decode) |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.family} | {r.dims} | {r.prompt_tokens} | {r.skipped} | |")
        else:
            lines.append(f"| {r.family} | {r.dims} | {r.prompt_tokens} | {r.ttft_s:.1f} s | {r.tokens_per_s:.1f} |")
    return "\n".join(lines)


def run(family: str, image, *, new_tokens: int, repeats: int, max_params: float) -> list[Row]:
    names = fixture_names() if family == "all" else [family]
    if family != "all" and family not in fixture_names():
        known = ", ".join(fixture_names())
        raise SystemExit(f"bench.engine: no family {family!r} (with a chat template) under {FIXTURES}; known: {known}")
    rows = []
    for name in names:
        print(f"{name}: building at the published dimensions ...", flush=True)
        row = measure(name, image, new_tokens=new_tokens, repeats=repeats, max_params=max_params)
        print(f"  {row}", flush=True)
        rows.append(row)
    print(f"\n{torch.get_num_threads()} CPU threads, float32, {new_tokens} new tokens, median of {repeats}\n")
    print(markdown(rows))
    return rows
