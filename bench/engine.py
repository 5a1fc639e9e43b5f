"""Engine benchmark: our overhead over a raw `model.generate`, and CPU latency by image budget.

    python -m bench.engine            # SmolVLM-256M's real dimensions, random weights (~3 min on 2 cores)
    python -m bench.engine --quick    # the tiny test model (seconds)

(a) `Engine.answer` against the same prompt run by hand (chat template, processor,
    `model.generate`, decode), interleaved, median of repeats: ratio = ours / raw
    (target <= 1.05). Both must produce the same tokens; the table says so.
(b) time to first token and tokens/s with image splitting off and on.
Machines here are noisy: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import statistics
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model instead of SmolVLM-256M dimensions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        print("building", "the tiny model" if args.quick else "a random model with SmolVLM-256M-Instruct's dimensions", "...")
        path = build_tiny_model(tmp, real_dims=not args.quick)
        image = _lesion((1536, 1152))
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
