"""Learning efficiency: held-out diagnosis accuracy after refining on N expert corrections, with and without replay.

    python -m bench.learning [--sizes 10,30,100,300] [--out bench/results/learning] [--quick]

On lesion phantoms (training/data/phantoms.py), through the real loop: expert ratings
with corrections in a fresh store, then `training.refine.run.run_refine`. Figures, not
pass/fail: a Markdown table (printed and saved as `learning.md`, with `learning.json`)
and a plot `learning.png` under --out (matplotlib, which bert-score already requires).
About 20 minutes on 2 busy CPU cores; `--quick` is a smoke run of a few minutes.

The start model. The offline demo's base (training/demo_model.py: a tiny SmolVLM-
architecture model whose vision tower is warmed up on phantom classes), plus a LoRA
adapter refined on phantom *description* questions only ("Describe the lesion." ->
"A single small round uniformly coloured dark brown lesion with a regular border on
Fitzpatrick-like type II skin."). It looks at the image and describes it, but has never
seen a diagnosis answer: it starts at or below chance (1/6) on diagnosis questions. A
bare random language model would also score near 0, but it can do nothing else either,
so it could not show forgetting; a model with a skill of its own can.

Each run, for N in --sizes, replay off and on: a fresh store in a temp home, the start
model registered as the active version, and N expert-style corrections on phantom
TRAIN images the start model never saw (the question asked, the start model's own
answer recorded, rated 2/5 by an expert, corrected with the phantom's diagnosis answer,
diagnosis label set). Then `run_refine` continues the active adapter (as production
does) with gold_holdout 0, the gate's held-out set = a fixed set of held-out phantom
diagnosis questions, and --force (the gate's decision does not matter here; the
candidate's metrics come from the same gate report either way). Every run takes the same
number of optimizer steps, so only the data differ.
- no replay: the corrections alone (synthetic ratio 0);
- replay: as many description QA pairs from the start model's own training data
  (synthetic ratio 1), the rehearsal that the demo's refine does with phantoms.
  Only descriptions: next-step answers name the class and would leak diagnosis labels.

The regression suite measures forgetting of what the start model could do: held-out
phantom description questions (the same held-out images). An answer counts as right
when it is a well-formed description (the phantom description template) whose
class-determined attributes (shape, texture, colour, border) equal the reference's;
ROUGE-L against the reference description is reported beside it. A model that forgets
answers "Most likely melanoma. ..." to "Describe the lesion." and fails both.

Phantoms are not medical images; the seed paper's 70.20 % diagnosis accuracy (SmolVLM,
bacterial skin disease photos) is the shape of result to compare, not the number.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHANCE = 1 / 6  # six balanced phantom classes
DEFAULT_OUT = Path("bench/results/learning")
START_POOL = 300  # phantom TRAIN indices [0, 300) at least: the start model's description data (the replay pool)
DIAG_METRICS = "rouge,diagnosis,repetition"
_DESC = re.compile(
    r"^(?P<count>A single|Two|Three|Four|Five|Six) (?P<size>small|medium|large) (?P<shape>round|oval|irregular|clustered) "
    r"(?P<texture>uniformly coloured|variegated|scaly|crusted) (?P<colour>[a-z -]+?) (?:lesion|lesions) with "
    r"(?P<border>a regular|an irregular) border on Fitzpatrick-like type (?P<tone>I|II|III|IV|V) skin\.?$"
)
CLASS_FIELDS = ("shape", "texture", "colour", "border")  # fixed by the class; count, size and tone vary per image


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    heldout: int  # held-out phantoms (diagnosis questions; the same images' description questions = regression suite)
    start_steps: int  # refine steps of the start model on descriptions
    steps: int  # refine steps of every measured run
    batch_size: int
    learning_rate: float
    eval_tokens: int  # answer length cap for diagnosis answers
    desc_tokens: int  # ... and for description answers


FULL = dict(heldout=60, start_steps=200, steps=100, batch_size=16, learning_rate=5e-3, eval_tokens=16, desc_tokens=32)
QUICK = dict(heldout=12, start_steps=20, steps=4, batch_size=4, learning_rate=5e-3, eval_tokens=8, desc_tokens=32)


def description_fields(text: str) -> dict[str, str] | None:
    """The fields of a phantom description (training.data.phantoms.Phantom.description), None if it is not one."""
    m = _DESC.match(" ".join(text.split()))
    return m.groupdict() if m else None


def regression_accuracy(predictions: list[str], references: list[str]) -> float:
    """Share of answers that are well-formed descriptions with the reference's class attributes."""
    right = 0
    for pred, ref in zip(predictions, references, strict=True):
        p, r = description_fields(pred), description_fields(ref)
        assert r is not None, f"reference is not a phantom description: {ref!r}"
        right += p is not None and all(p[k] == r[k] for k in CLASS_FIELDS)
    return right / len(references)


# ---------------------------------------------------------------------------- data


def write_data(root: Path, plan: Plan, n_corrections: int) -> dict[str, Path]:
    """Phantom files: the start model's descriptions (the replay pool), held-out diagnosis and description sets."""
    from training.data.examples import write_jsonl
    from training.data.phantoms import draw, to_examples
    from training.demo_model import IMAGE_SIZE

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)

    def examples(split: str, indices: range, kind: str) -> list:
        out = []
        for i in indices:
            ph = draw(i, 0, split, size=IMAGE_SIZE)
            path = images / f"{ph.id}.png"
            if not path.exists():
                ph.image.save(path)
            out += to_examples(ph, path, kinds=(kind,))
        return out

    files = {"start": root / "start-description.jsonl", "heldout": root / "heldout-diagnosis.jsonl",
             "regression": root / "heldout-description.jsonl"}
    pool = max(START_POOL, n_corrections)  # replay at ratio 1 needs as many descriptions as corrections
    write_jsonl(examples("train", range(pool), "description"), files["start"])
    write_jsonl(examples("heldout", range(plan.heldout), "diagnosis"), files["heldout"])
    write_jsonl(examples("heldout", range(plan.heldout), "description"), files["regression"])
    # The corrections' cases: TRAIN phantoms after the start pool (new patients), balanced over classes.
    files["corrections"] = root / "corrections.jsonl"
    write_jsonl(examples("train", range(pool, pool + n_corrections), "diagnosis"), files["corrections"])
    return files


def build_base(model_dir: Path) -> float:
    """The demo's base: tiny SmolVLM with its phantom tokenizer, vision tower warmed up; returns the probe accuracy."""
    from core.tiny import build_tiny_model
    from training.demo_model import IMAGE_SIZE, phantom_texts, warm_up_vision

    build_tiny_model(model_dir, family="smolvlm", seed=0, extra_texts=phantom_texts(), image_size=IMAGE_SIZE)
    return warm_up_vision(model_dir)


# ---------------------------------------------------------------------------- runs


def settings_for(home: Path, base_dir: Path):
    from core.config import Settings

    # Greedy and no repetition penalty: the measure is what was learned, not decoding tricks.
    return Settings(home=home, model=str(base_dir), device="cpu", repetition_penalty=1.0)


def refine_config(plan: Plan, *, steps: int, synthetic: list[str], ratio: float, heldout: Path, metrics: str):
    from training.refine.config import RefineConfig

    # The demo's refine recipe (training.demo_model.demo_refine_config) with the bench's steps.
    return RefineConfig(
        synthetic=synthetic, synthetic_eval=[str(heldout)], synthetic_ratio=ratio, supervision="qa", min_new=0,
        gold_holdout=0.0, lora_r=16, lora_alpha=32, lora_dropout=0.0, steps=steps, batch_size=plan.batch_size,
        learning_rate=plan.learning_rate, warmup_ratio=0.05, save_steps=0, eval_max_new_tokens=plan.eval_tokens,
        eval_batch_size=30, eval_metrics=metrics, max_repetition=1.0, tolerance=1.0, eval_max=0,
    )


def train_start(work: Path, base_dir: Path, files: dict[str, Path], plan: Plan) -> Path:
    """Refine the base on phantom descriptions (the real pipeline); returns the start adapter's directory."""
    from training.refine.run import run_refine

    settings = settings_for(work / "start-home", base_dir)
    cfg = refine_config(plan, steps=plan.start_steps, synthetic=[str(files["start"])], ratio=1.0,
                        heldout=files["regression"], metrics="rouge,repetition")
    outcome = run_refine(settings, cfg, force=True, progress=False, explicit_model=True, out=lambda m: None)
    if outcome.version is None:
        raise SystemExit(f"the start model could not be trained: {outcome.summary}")
    return settings.models_dir / outcome.version


def load_engine(base_dir: Path, adapters: dict[str, Path]):
    from core.engine import Engine
    from core.models import load_model

    settings = settings_for(base_dir.parent, base_dir)
    engine = Engine(load_model(str(base_dir), device="cpu", dtype="float32", image_splitting="off"), settings)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


def answers(engine, examples: list, version: str, max_new_tokens: int) -> list[str]:
    """Greedy answers of `version` to `examples` (the engine's prompt, as in the app and the gate)."""
    import dataclasses

    from training.eval.evaluate import evaluate_engine

    gen = dataclasses.replace(engine.settings.generation(), max_new_tokens=max_new_tokens, do_sample=False)
    rep = evaluate_engine(engine, examples, version=version, batch_size=30, metrics=["rouge"], generation=gen, progress=False)
    return [row["prediction"] for row in rep.per_example]


def score(engine, version: str, files: dict[str, Path], plan: Plan) -> dict[str, float]:
    """Held-out diagnosis accuracy and the regression suite of one version."""
    from training.data.examples import read_examples
    from training.eval.evaluate import score_predictions

    held = read_examples(files["heldout"])[0]
    reg = read_examples(files["regression"])[0]
    diag = score_predictions(answers(engine, held, version, plan.eval_tokens), held, metrics=["diagnosis"])
    desc = answers(engine, reg, version, plan.desc_tokens)
    rouge = score_predictions(desc, reg, metrics=["rouge"])
    return {"heldout_accuracy": diag.metrics["diagnosis_accuracy"],
            "regression_accuracy": regression_accuracy(desc, [ex.answers[0] for ex in reg]),
            "regression_rougeL": rouge.metrics["rougeL"], "example_answer": desc[0]}


def seed_store(settings, base_dir: Path, start_adapter: Path, corrections: list, own_answers: list[str]) -> None:
    """The start model as the active version; one asked, low-rated and corrected turn per correction."""
    from annotation_db import store as st
    from annotation_db.db import Store
    from core.images import intake

    db = Store.open(settings.db_url)
    try:
        with db.session() as s:
            v = st.register_version(s, base_model=str(base_dir), adapter_path=str(start_adapter), note="bench start model")
            st.promote(s, v.id, reason="bench.learning start model")
            expert = st.get_or_create_user(s, "bench-expert", "expert")
            clinician = st.get_or_create_user(s, "bench-clinician", "clinician")
            for ex, own in zip(corrections, own_answers, strict=True):
                stored = intake(Path(ex.images[0]), settings.images_dir)
                st.record_image(s, stored.sha256, stored.width, stored.height)
                conv = st.start_conversation(s, clinician.id, None)
                turn = st.record_turn(s, conv.id, ex.question, own, image_hashes=[stored.sha256], template="free",
                                      model_version_id=v.id)
                st.add_rating(s, turn.id, expert.id, 2, correction=ex.answers[0], diagnosis=ex.label)
    finally:
        db.dispose()


def measure(work: Path, base_dir: Path, start_adapter: Path, files: dict[str, Path], plan: Plan, n: int, replay: bool,
            own: list[str]) -> dict[str, Any]:
    """One refine run on the first n corrections; the candidate's held-out and regression figures."""
    from training.data.examples import read_examples
    from training.refine.run import run_refine

    home = work / f"run-{n}-{'replay' if replay else 'plain'}"
    settings = settings_for(home, base_dir)
    corrections = read_examples(files["corrections"])[0][:n]
    seed_store(settings, base_dir, start_adapter, corrections, own[:n])
    cfg = refine_config(plan, steps=plan.steps, synthetic=[str(files["start"])] if replay else [], ratio=1.0 if replay else 0.0,
                        heldout=files["heldout"], metrics=DIAG_METRICS)
    t0 = time.perf_counter()
    outcome = run_refine(settings, cfg, force=True, progress=False, out=lambda m: None)
    seconds = time.perf_counter() - t0
    rep = outcome.report
    if not rep:
        raise SystemExit(f"refine with {n} corrections did not train: {outcome.summary}")
    counts = rep["counts"]
    assert counts["gold_train"] == n and counts["synthetic_used"] == (n if replay else 0), counts
    engine = load_engine(base_dir, {"candidate": settings.models_dir / outcome.version})
    regression = score(engine, "candidate", files, plan)
    return {
        "corrections": n, "replay": replay,
        "heldout_accuracy": rep["metrics_candidate"]["diagnosis_accuracy"],  # the gate's own figure
        "start_accuracy_in_gate": rep["metrics_active"]["diagnosis_accuracy"],
        "regression_accuracy": regression["regression_accuracy"], "regression_rougeL": regression["regression_rougeL"],
        "heldout_accuracy_rescored": regression["heldout_accuracy"],  # the bench's own pass: must equal the gate's
        "train_examples": counts["train_examples"], "steps": rep["training"]["steps"],
        "train_seconds": rep["training"]["seconds"], "seconds": seconds, "gate": rep["decision"].get("reason"),
        "example_description": regression["example_answer"],
    }


# ---------------------------------------------------------------------------- output


def markdown(start: dict[str, Any], rows: list[dict[str, Any]], plan: Plan) -> str:
    head = ("| corrections | replay | held-out diagnosis accuracy | regression accuracy (descriptions) | regression ROUGE-L "
            "| training examples | steps | seconds |\n| ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    first = (f"| 0 (start) | – | {start['heldout_accuracy']:.3f} | {start['regression_accuracy']:.3f} | "
             f"{start['regression_rougeL']:.3f} | – | – | – |\n")
    body = "".join(
        f"| {r['corrections']} | {'yes' if r['replay'] else 'no'} | {r['heldout_accuracy']:.3f} | {r['regression_accuracy']:.3f} | "
        f"{r['regression_rougeL']:.3f} | {r['train_examples']} | {r['steps']} | {r['seconds']:.0f} |\n" for r in rows)
    note = (f"\nHeld-out: {plan.heldout} phantom diagnosis questions (chance {CHANCE:.3f}); regression: the same "
            f"{plan.heldout} images' description questions. Every run: {plan.steps} steps x batch {plan.batch_size}, "
            f"LoRA r16 continuing the start adapter; seconds = the whole refine run (training and the gate's evaluation) "
            f"on CPU.\n")
    return head + first + body + note


def plot(start: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    panels = (("heldout_accuracy", "held-out diagnosis accuracy"), ("regression_accuracy", "regression: description accuracy"))
    for ax, (key, title) in zip(axes, panels):
        for replay, style in ((False, "o-"), (True, "s--")):
            pts = sorted((r["corrections"], r[key]) for r in rows if r["replay"] is replay)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label="replay" if replay else "no replay")
        ax.axhline(start[key], color="grey", lw=1, ls=":", label="start model")
        if key == "heldout_accuracy":
            ax.axhline(CHANCE, color="red", lw=1, ls="-.", label="chance (1/6)")
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["corrections"] for r in rows}), labels=[str(n) for n in sorted({r["corrections"] for r in rows})])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("expert corrections")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Refine on phantom corrections (tiny SmolVLM, CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(plan: Plan, out: Path, work: Path, log=print) -> dict[str, Any]:
    from training.data.examples import read_examples

    t0 = time.perf_counter()
    base_dir = work / "base"
    probe = build_base(base_dir)
    files = write_data(work / "phantoms", plan, max(plan.sizes))
    log(f"base: tiny SmolVLM, vision warm-up probe accuracy {probe:.2f} ({time.perf_counter() - t0:.0f} s)")
    start_adapter = train_start(work, base_dir, files, plan)
    engine = load_engine(base_dir, {"start": start_adapter})
    start = score(engine, "start", files, plan)
    corrections = read_examples(files["corrections"])[0]
    own = answers(engine, corrections, "start", plan.eval_tokens)  # what the start model said: recorded as the turn's answer
    del engine
    log(f"start model: held-out diagnosis accuracy {start['heldout_accuracy']:.3f} (chance {CHANCE:.3f}), regression "
        f"accuracy {start['regression_accuracy']:.3f}, ROUGE-L {start['regression_rougeL']:.3f} "
        f"({time.perf_counter() - t0:.0f} s); e.g. {start['example_answer']!r}")
    rows = []
    for n in plan.sizes:
        for replay in (False, True):
            row = measure(work, base_dir, start_adapter, files, plan, n, replay, own)
            rows.append(row)
            log(f"{n:>4} corrections, replay {'on ' if replay else 'off'}: held-out {row['heldout_accuracy']:.3f} "
                f"(x{row['heldout_accuracy'] / CHANCE:.1f} chance), regression {row['regression_accuracy']:.3f} "
                f"(start {start['regression_accuracy']:.3f}), {row['steps']} steps, {row['seconds']:.0f} s")
            shutil.rmtree(work / f"run-{n}-{'replay' if replay else 'plain'}", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(start, rows, plan)
    (out / "learning.md").write_text(table, encoding="utf-8")
    result = {"plan": plan.__dict__, "probe_accuracy": probe, "start": start, "rows": rows, "chance": CHANCE,
              "total_seconds": time.perf_counter() - t0}
    (out / "learning.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    plot(start, rows, out / "learning.png")
    log("\n" + table)
    log(f"wrote {out / 'learning.md'}, {out / 'learning.json'}, {out / 'learning.png'} ({time.perf_counter() - t0:.0f} s in all)")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="numbers of corrections, comma-separated (default 10,30,100,300; --quick 4,8)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for learning.md, learning.json, learning.png")
    p.add_argument("--quick", action="store_true", help="a smoke run: few held-out phantoms, a few steps")
    p.add_argument("--steps", type=int, help="refine steps of every measured run")
    p.add_argument("--start-steps", type=int, help="refine steps of the start model")
    p.add_argument("--work", type=Path, help="keep the models and stores here (default: a temp folder, removed)")
    args = p.parse_args(argv)
    import transformers

    # The gate loads a second adapter into a model that holds the candidate; transformers' load report then lists
    # the candidate's weights as "missing" from that checkpoint (harmless) for every run: keep the figures readable.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        sizes = tuple(int(x) for x in (args.sizes or ("4,8" if args.quick else "10,30,100,300")).split(",") if x.strip())
    except ValueError:
        p.error(f"--sizes {args.sizes!r}: give whole numbers separated by commas, e.g. 10,30,100")
    if not sizes or min(sizes) < 1:
        p.error("--sizes: at least one size, each 1 or more")
    knobs = dict(QUICK if args.quick else FULL)
    knobs.update({k: v for k, v in (("steps", args.steps), ("start_steps", args.start_steps)) if v})
    plan = Plan(sizes=sizes, **knobs)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        return run(plan, args.out, args.work)
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        return run(plan, args.out, Path(tmp))


if __name__ == "__main__":
    main()
