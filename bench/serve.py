"""Serving benchmark: follow-ups from the KV cache, clinicians asking at once, cache memory, decode vs bandwidth.

    python -m bench.serve            # SmolVLM-256M's real dimensions, random weights (~10 min on 2 cores)
    python -m bench.serve --quick    # the tiny test model (a minute)
    DERMALOOP_CPU_DECODE=compiled python -m bench.serve --new-tokens 128 --skip-follow-up --skip-budget
                                     # (c) with the compiled decode step and 128-token answers

(a) a follow-up's time to first token, image splitting on: the conversation's cached keys/values
    (core/kv_cache.py) against encoding it again, and whether both give the same tokens (target >= 20x);
(b) the cache's memory per conversation after that follow-up;
(c) 1, 4 and 8 clinicians asking at once: total tokens/s through the batching scheduler
    (core/scheduler.py) against answering them one at a time (target >= 2x at 4), and p50/p95 time
    to first token as each clinician sees it (from asking); twice: images encoded at the question
    ("cold"), and encoded at upload (`Engine.prepare`, core/features.py: the app's path, where the
    clinician types while the image is encoded), one at a time and batched alike;
(d) decode tokens/s for one clinician as a fraction of the memory-bandwidth limit (bench.engine (c));
(e) the image budget: prompt tokens and time to first token with image splitting on and off, for a
    first question (image encoded at the question, or at upload) and a cached follow-up.
Ratios are taken within this run; machines here are noisy and shared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import torch

from bench.engine import _lesion, decode_variants, print_decode
from core.config import GenerationSettings, Settings
from core.engine import Engine
from core.models import load_model
from core.prompts import ChatTurn
from core.scheduler import Scheduler
from core.tiny import build_tiny_model


def follow_up(path: str, new_tokens: int) -> dict:
    engine = Engine(load_model(path, device="cpu", image_splitting="on"), Settings())
    gen = GenerationSettings(max_new_tokens=new_tokens, repetition_penalty=1.0)
    image = _lesion((1536, 1152))
    first = engine.answer([image], "What is this lesion?", generation=gen, conversation="case")
    history = [ChatTurn("What is this lesion?", first.text, [image])]
    engine.features.clear()  # re-encoded means everything again, vision tower included
    full = engine.answer([], "Is it dangerous?", history=history, generation=gen)
    features = engine.answer([], "Is it dangerous?", history=history, generation=gen)  # the image's features cached now
    cached = engine.answer([], "Is it dangerous?", history=history, generation=gen, conversation="case")
    return {"prompt_tokens": full.prompt_tokens, "full_ttft": full.ttft_s, "features_ttft": features.ttft_s, "cached_ttft": cached.ttft_s,
            "same": full.text == cached.text == features.text, "bytes": engine.kv_cache.nbytes, "reused": engine.kv_cache.stats.reused_tokens}


def clinicians(engine: Engine, n: int, new_tokens: int, uploaded: bool, repeats: int) -> dict:
    """n questions asked at the same moment: through the scheduler, and one at a time, alternately
    `repeats` times (the best of each: other processes share these cores); `uploaded`: each image encoded
    beforehand (at upload) for both, else encoded at the question for both."""
    gen = GenerationSettings(max_new_tokens=new_tokens, repetition_penalty=1.0)
    asks = [([_lesion((640 + 32 * i, 480))], f"Clinician {i}: what is this lesion?") for i in range(n)]
    engine._generate = lambda **kw: engine.model.generate(**kw, min_new_tokens=new_tokens)  # equal work per answer

    def images_ready() -> None:
        engine.features.clear()
        if uploaded:
            engine.prepare([im for imgs, _ in asks for im in imgs])

    def batched() -> tuple[float, list[float]]:
        images_ready()
        scheduler = Scheduler(engine, max_batch=8, window_s=0.05)
        ttft: list[float] = []
        tokens = 0

        def read(handle, asked):
            nonlocal tokens
            handle.wait()  # a token, not a chunk: a random model's first words may print nothing
            ttft.append(handle.first_token_at - asked)
            tokens += handle.result.completion_tokens

        start = time.perf_counter()
        threads = [threading.Thread(target=read, args=(scheduler.submit(imgs, q, generation=gen), time.perf_counter())) for imgs, q in asks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        scheduler.close()
        return tokens / (time.perf_counter() - start), ttft

    def one_at_a_time() -> float:
        images_ready()
        start = time.perf_counter()
        tokens = sum(engine.answer(imgs, q, generation=gen).completion_tokens for imgs, q in asks)
        return tokens / (time.perf_counter() - start)

    runs = [(batched(), one_at_a_time()) for _ in range(repeats)]
    engine._generate = engine.model.generate
    (batched_tps, ttft), sequential_tps = max((b for b, _ in runs), key=lambda b: b[0]), max(s for _, s in runs)
    q = statistics.quantiles(ttft, n=20, method="inclusive") if len(ttft) > 1 else [ttft[0]] * 19
    return {"n": n, "batched_tps": batched_tps, "sequential_tps": sequential_tps, "p50": statistics.median(ttft), "p95": q[18]}


IMAGE_SIZE = (1536, 1152)  # a phone photo's proportions


def budget(path: str, splitting: str, new_tokens: int) -> dict:
    """Time to first token for one image question with splitting on or off: the image encoded at the
    question, or at upload (Engine.prepare, timed apart); then a follow-up from the conversation cache."""
    engine = Engine(load_model(path, device="cpu", image_splitting=splitting), Settings())
    gen = GenerationSettings(max_new_tokens=new_tokens, repetition_penalty=1.0)
    image = _lesion(IMAGE_SIZE)
    engine.answer([_lesion((320, 240))], "warm-up", generation=GenerationSettings(max_new_tokens=2))
    cold = engine.answer([image], "What is this lesion?", generation=gen)
    engine.features.clear()
    start = time.perf_counter()
    engine.prepare([image])
    prepare_s = time.perf_counter() - start
    warm = engine.answer([image], "What is this lesion?", generation=gen, conversation="case")
    history = [ChatTurn("What is this lesion?", warm.text, [image])]
    follow = engine.answer([], "Is it dangerous?", history=history, generation=gen, conversation="case")
    return {"prompt_tokens": cold.prompt_tokens, "cold": cold.ttft_s, "warm": warm.ttft_s, "prepare_s": prepare_s, "follow": follow.ttft_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model instead of SmolVLM-256M dimensions")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-follow-up", action="store_true", help="leave out (a) and (b)")
    parser.add_argument("--repeats", type=int, default=2, help="(c): batched and one at a time alternately, the best of each")
    parser.add_argument("--skip-budget", action="store_true", help="leave out (e)")
    parser.add_argument("--skip-decode", action="store_true", help="leave out (d)")
    parser.add_argument("--clinicians", type=lambda t: [int(x) for x in t.split(",")], default=[1, 4, 8],
                        help="how many clinicians ask at once, comma-separated (default 1,4,8)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_tiny_model(tmp, real_dims=not args.quick))
        print(f"model: {'tiny' if args.quick else 'SmolVLM-256M dimensions, random weights'}; {torch.get_num_threads()} CPU threads\n")
        f = None if args.skip_follow_up else follow_up(path, args.new_tokens)
        if f is not None:
            print("(a) follow-up time to first token, image splitting on")
            print(f"| prompt tokens | re-encoded s | re-encoded, image features cached s | cached s | ratio | same tokens |\n"
                  f"|---|---|---|---|---|---|\n"
                  f"| {f['prompt_tokens']} | {f['full_ttft']:.2f} | {f['features_ttft']:.2f} | {f['cached_ttft']:.3f} | "
                  f"{f['full_ttft'] / f['cached_ttft']:.1f}x | {f['same']} |  (target >= 20x)\n")
            print(f"(b) cache memory: {f['bytes'] / 2**20:.1f} MiB for one conversation of {f['reused']} reused + new tokens\n")
        engine = Engine(load_model(path, device="cpu", image_splitting="off"), Settings.from_env())  # DERMALOOP_CPU_DECODE=compiled
        engine.warm_up()  # compiles, with cpu_decode compiled (as the app does at start)
        engine.answer([_lesion((640, 480))], "warm-up", generation=GenerationSettings(max_new_tokens=2))
        print(f"(c) clinicians asking at once, {args.new_tokens} tokens each, image splitting off, cpu_decode {engine.settings.cpu_decode}")
        print("| images encoded | clinicians | one at a time tokens/s | batched tokens/s | ratio | p50 time to first token s | p95 s |\n"
              "|---|---|---|---|---|---|---|")
        for uploaded in (False, True):
            for n in args.clinicians:
                c = clinicians(engine, n, args.new_tokens, uploaded, args.repeats)
                print(f"| {'at upload' if uploaded else 'at the question'} | {n} | {c['sequential_tps']:.1f} | {c['batched_tps']:.1f} | "
                      f"{c['batched_tps'] / c['sequential_tps']:.2f}x | {c['p50']:.2f} | {c['p95']:.2f} |", flush=True)
        print("(target >= 2x at 4)\n")
        if not args.skip_budget:
            print(f"(e) image budget: one {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image, {args.new_tokens} tokens")
            print("| image splitting | prompt tokens | first question, encoded at the question s | encoded at upload s | upload encoding s "
                  "| cached follow-up s |\n|---|---|---|---|---|---|")
            for splitting in ("off", "on"):
                b = budget(path, splitting, args.new_tokens)
                print(f"| {splitting} | {b['prompt_tokens']} | {b['cold']:.2f} | {b['warm']:.2f} | {b['prepare_s']:.2f} | {b['follow']:.2f} |",
                      flush=True)
            print()
        if not args.skip_decode:
            print_decode(decode_variants(path, _lesion((1536, 1152)), args.new_tokens, repeats=3, which="modes"), "(d)")


if __name__ == "__main__":
    main()
