"""Engine benchmark: our overhead over a raw `model.generate`, and CPU latency by image budget.

    python -m bench.engine            # SmolVLM-256M's real dimensions, random weights (~3 min on 2 cores)
    python -m bench.engine --quick    # the tiny test model (seconds)
    python -m bench.engine --family NAME|all   # a model family at its published dimensions (bench/families.py)

(a) `Engine.answer` against the same prompt run by hand (chat template, processor,
    `model.generate`, decode), interleaved, median of repeats: ratio = ours / raw
    (target <= 1.05). Both must produce the same tokens; the table says so.
(b) time to first token and tokens/s with image splitting off and on.
(c) decode speed against the machine's limit: a bandwidth probe (a 1 GiB read, in this run)
    divided by the bytes of the language model's weights gives the tokens/s that memory allows;
    each decoding variant (dynamic or static KV cache, threads, the `cpu_decode` modes of core/decode.py,
    fp32 or bf16) is shown as a fraction of that limit and as a ratio to the first row, with whether its
    tokens equal the first row's and how long its first answer took (a compiled mode compiles there).
    `OMP_WAIT_POLICY=PASSIVE` is measured in a child process (OpenMP reads it once, at start).
    The first row is the baseline (the weights as loaded, every thread decoding, as before
    `cpu_decode_threads` and `cpu_decode`).
Machines here are noisy: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from PIL import Image, ImageDraw

from core.config import GenerationSettings, Settings
from core.engine import Engine
from core.models import load_model
from core.prompts import ChatTurn, build_messages
from core.tiny import build_tiny_model


def _lesion(size: tuple[int, int]) -> Image.Image:
    img = Image.new("RGB", size, (224, 186, 160))
    w, h = size
    ImageDraw.Draw(img).ellipse((w // 3, h // 3, 2 * w // 3, 2 * h // 3), fill=(110, 60, 40))
    return img


def _raw_answer(loaded, image: Image.Image, question: str, gen: GenerationSettings, engine: Engine) -> tuple[str, int]:
    """What a user writes without DermaLoop: template, processor, generate, decode."""
    messages, _ = build_messages([ChatTurn(question, None, [image])], system=engine.supports_system)  # the engine's prompt
    text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = loaded.processor(text=[text], images=[[image]], return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.generate(
            **inputs, max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.max_new_tokens, do_sample=False,
            repetition_penalty=gen.repetition_penalty, temperature=None, top_p=None, top_k=None,
        )
    new = out[0, inputs["input_ids"].shape[1]:]
    return loaded.processor.tokenizer.decode(new, skip_special_tokens=True).strip(), len(new)


def overhead(loaded, engine: Engine, image: Image.Image, repeats: int, new_tokens: int) -> dict:
    question = "Describe this lesion."
    gen = GenerationSettings(max_new_tokens=new_tokens, repetition_penalty=1.0)
    # min_new_tokens on both sides: a random model may stop early, and both must do equal work.
    engine._generate = lambda **kw: loaded.model.generate(**kw, min_new_tokens=new_tokens)
    ours, raw = [], []
    same = True
    engine.answer([image], question, generation=gen)  # warm-up both paths
    _raw_answer(loaded, image, question, gen, engine)
    for _ in range(repeats):
        t = time.perf_counter()
        raw_text, raw_tokens = _raw_answer(loaded, image, question, gen, engine)
        raw.append(time.perf_counter() - t)
        t = time.perf_counter()
        answer = engine.answer([image], question, generation=gen)
        ours.append(time.perf_counter() - t)
        same &= answer.text == raw_text and answer.completion_tokens == raw_tokens
    engine._generate = loaded.model.generate
    return {"raw_s": statistics.median(raw), "engine_s": statistics.median(ours), "same_tokens": same}


def latency(engine: Engine, image: Image.Image, new_tokens: int, repeats: int) -> dict:
    gen = GenerationSettings(max_new_tokens=new_tokens, repetition_penalty=1.0)
    engine._generate = lambda **kw: engine.model.generate(**kw, min_new_tokens=new_tokens)
    engine.answer([image], "Describe this lesion.", generation=gen)
    runs = [engine.answer([image], "Describe this lesion.", generation=gen) for _ in range(repeats)]
    engine._generate = engine.model.generate
    ttft = statistics.median(a.ttft_s for a in runs)
    total = statistics.median(a.latency_s for a in runs)
    return {"ttft_s": ttft, "tokens_per_s": new_tokens / total, "latency_s": total, "prompt_tokens": runs[0].prompt_tokens}


def bandwidth_gbs(repeats: int = 3) -> float:
    """Read 1 GiB (a float32 sum): the memory bandwidth a decode step can hope for, in GB/s (best of `repeats`)."""
    x = torch.ones(2**28, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return 2**30 / best / 1e9


def decode_weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads: the language model and its head, not the vision tower,
    and not the input embeddings (one row of them is read per token)."""
    lm, embed = model.get_decoder(), model.get_input_embeddings()
    skip = {id(p) for p in embed.parameters()}
    params = {id(p): p for p in [*lm.parameters(), *model.get_output_embeddings().parameters()] if id(p) not in skip}
    return sum(p.numel() * p.element_size() for p in params.values())


def decode_rate(engine: Engine, image: Image.Image, new_tokens: int, repeats: int, **generate_kw) -> tuple[float, str, float]:
    """Tokens/s after the first token (the decode phase alone), median of `repeats`, the answer, and the
    seconds of the first (warm-up) answer, which includes any compile."""
    gen = GenerationSettings(max_new_tokens=new_tokens, repetition_penalty=1.0)
    engine._generate = lambda **kw: engine.model.generate(**kw, min_new_tokens=new_tokens, **generate_kw)
    runs = [engine.answer([image], "Describe this lesion.", generation=gen) for _ in range(repeats + 1)]
    engine._generate = engine.model.generate
    rate = statistics.median((new_tokens - 1) / (a.latency_s - a.ttft_s) for a in runs[1:])
    return rate, runs[1].text, runs[0].latency_s


def decode_variants(path: str, image: Image.Image, new_tokens: int, repeats: int, which: str = "all") -> list[dict]:
    """Decode tokens/s of each variant, and the bandwidth limit measured beside it. The first row is the
    baseline: the weights as loaded, every torch thread decoding (cpu_decode_threads=0), a dynamic KV cache,
    fp32. `which`: all; modes (float32 only: the baseline and each `cpu_decode` mode, core/decode.py);
    baseline (its row alone)."""
    only_default = which != "all"
    rows = []
    threads = Settings.from_env().cpu_decode_threads
    modes = [(f"{mode}{' (default)' if mode == Settings().cpu_decode else ''}, cpu_decode_threads={threads}", {}, {"cpu_decode": mode})
             for mode in ("input-major", "compiled")]
    for dtype in ("float32",) if only_default else ("float32", "bfloat16"):
        loaded = load_model(path, device="cpu", dtype=dtype, image_splitting="off")
        limit = bandwidth_gbs() * 1e9 / decode_weight_bytes(loaded.model)
        variants = [(f"as loaded, cpu_decode_threads={threads}", {}, {"cpu_decode": "as-loaded"}), *modes]
        if dtype == "float32":
            every = {"cpu_decode": "as-loaded", "cpu_decode_threads": 0}
            variants = [(f"as loaded, all {torch.get_num_threads()} threads (cpu_decode_threads=0)", {}, every),
                        *([] if only_default else [("as loaded, static cache, all threads", {"cache_implementation": "static"}, every)]),
                        *variants]
        for name, kw, overrides in variants[:1] if which == "baseline" else variants:
            engine = Engine(loaded, Settings.from_env(**overrides))
            rate, text, first_s = decode_rate(engine, image, new_tokens, repeats, **kw)
            rows.append({"dtype": dtype, "variant": name, "tokens_per_s": rate, "limit": limit, "text": text, "first_s": first_s})
    return rows


def print_decode(rows: list[dict], label: str = "(c)") -> None:
    base = rows[0]
    print(f"{label} decode speed vs the memory-bandwidth limit (bandwidth probe / language-model weight bytes)")
    print("| dtype | variant | tokens/s | limit tokens/s | fraction of limit | vs first row | same tokens | first answer s (compile) |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['variant']} | {r['tokens_per_s']:.1f} | {r['limit']:.1f} | {r['tokens_per_s'] / r['limit']:.2f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['text'] == base['text']} | {r['first_s']:.1f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model instead of SmolVLM-256M dimensions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--decode-only", metavar="MODEL_DIR", help=argparse.SUPPRESS)  # the child run of (c)
    parser.add_argument("--family", help="a family of tests/fixtures/families (or all): prompt tokens, TTFT, tokens/s")
    parser.add_argument("--max-params", type=float, default=1.0e9, help="with --family: larger replicas are not run")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    image = _lesion((1536, 1152))
    if args.family:
        from bench.families import run

        run(args.family, image, new_tokens=args.new_tokens, repeats=args.repeats, max_params=args.max_params)
        return
    if args.decode_only:
        print(json.dumps(decode_variants(args.decode_only, image, args.new_tokens, args.repeats, which="baseline")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        print("building", "the tiny model" if args.quick else "a random model with SmolVLM-256M-Instruct's dimensions", "...")
        path = build_tiny_model(tmp, real_dims=not args.quick)
        rows = decode_variants(str(path), image, args.new_tokens, args.repeats)
        passive = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "DERMALOOP_CPU_DECODE_THREADS": "0"}
        child = subprocess.run([sys.executable, "-m", "bench.engine", "--decode-only", str(path), "--new-tokens", str(args.new_tokens),
                                "--repeats", str(args.repeats)], env=passive, capture_output=True, text=True, check=True)
        for r in json.loads(child.stdout.strip().splitlines()[-1]):
            rows.append({**r, "variant": f"{r['variant']}, OMP_WAIT_POLICY=PASSIVE"})
        print_decode(rows)
        print()
        loaded = load_model(path, device="cpu", image_splitting="off")
        engine = Engine(loaded, Settings())
        print(f"{loaded.info.parameters / 1e6:.0f}M parameters, {torch.get_num_threads()} CPU threads\n")
        o = overhead(loaded, engine, image, args.repeats, args.new_tokens)
        print("(a) engine overhead, same prompt, same tokens")
        print("| path | median s | ratio |\n|---|---|---|")
        print(f"| raw model.generate | {o['raw_s']:.3f} | 1.00 |")
        print(f"| Engine.answer | {o['engine_s']:.3f} | {o['engine_s'] / o['raw_s']:.3f} |")
        print(f"identical output: {o['same_tokens']}  (target ratio <= 1.05)\n")
        rows = []
        for splitting in ("off", "on"):
            loaded.processor.image_processor.do_image_splitting = splitting == "on"
            rows.append((splitting, latency(engine, image, args.new_tokens, args.repeats)))
        base = rows[0][1]
        print(f"(b) CPU latency by image budget, {args.new_tokens} new tokens, a 1536x1152 image")
        print("| image splitting | prompt tokens | time to first token s | tokens/s | total s | total vs off |\n|---|---|---|---|---|---|")
        for splitting, r in rows:
            ratio = r["latency_s"] / base["latency_s"]
            print(f"| {splitting} | {r['prompt_tokens']} | {r['ttft_s']:.2f} | {r['tokens_per_s']:.1f} | "
                  f"{r['latency_s']:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
