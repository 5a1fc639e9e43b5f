"""Evaluate a model version on a dataset with the core engine: the seed papers' metrics plus repetition.

    python -m training.evaluate --model PATH_OR_ID [--adapter DIR] --data FILE [--format jsonl|csv|hf|mediqa] --out DIR
    python -m training.evaluate --version v3 --out DIR            # the store's frozen held-out split
    python -m training.evaluate --version v3 --data heldout.jsonl --out DIR
    python -m training.evaluate --predictions PRED [--references REF] [--lang en|zh|es] --out DIR   # no model

With --predictions, scores a file of answers without loading a model or images: the
MEDIQA-M3G / MEDIQA-MAGIC 2024 official deltaBLEU and BERTScore beside our metrics
(training/eval/score.py). Otherwise the model answers every example, and the command
prints a table and writes `report.json` (metrics, per-example outputs, notes),
`report.md` and `predictions.jsonl` (id, prediction: a file --predictions can score
against the official references) to --out. A DermaVQA file (`--format mediqa`) takes
`--lang` and `--images-dir` (the folder holding images_<split>/). Metrics (training/eval/metrics/): BLEU (sacreBLEU, all references),
ROUGE-L and BERTScore F1 (best reference per example, then the mean, as in
MEDIQA-MAGIC), METEOR (only when nltk's WordNet is installed), diagnosis accuracy
(label or synonym named in the answer; examples with a label whose kind is a
diagnosis question or unset), repetition (answers near-identical to the answer for
a different image; distinct-1/2) and answer lengths. `evaluate_engine` is the same
code for the refine gate.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from core.config import opt
from core.errors import DermaLoopError
from core.prompts import ChatTurn
from training.data.examples import FORMATS, Example, detect_format, read_examples, report_problems
from training.errors import DataError
from training.eval.metrics import METRICS, compute_all, parse_metrics
from training.eval.official import LANGUAGES
from training.eval.score import SCORE_METRICS, WEIGHT_MODES

DIAGNOSTIC_KINDS = (None, "diagnosis", "differential")  # examples whose label is scored by diagnosis accuracy
HEADLINE = (  # (metric module, key in its result, report name)
    ("bleu", "bleu", "bleu"),
    ("rouge", "rougeL", "rougeL"),
    ("meteor", "meteor", "meteor"),
    ("bertscore", "bertscore_f1", "bertscore_f1"),
    ("diagnosis", "diagnosis_accuracy", "diagnosis_accuracy"),
    ("repetition", "repetition_rate", "repetition_rate"),
    ("repetition", "distinct_1", "distinct_1"),
    ("repetition", "distinct_2", "distinct_2"),
)


@dataclass
class Report:
    metrics: dict[str, Any]  # headline numbers (None = unavailable), plus answer length statistics
    per_example: list[dict[str, Any]]  # id, question, references, label, prediction, per-metric scores
    details: dict[str, dict] = field(default_factory=dict)  # each metric's full result without per-example lists
    meta: dict[str, Any] = field(default_factory=dict)  # model, version, data, n, notes, timings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        return cls(**json.loads(text))

    def notes(self) -> list[str]:
        out = []
        if "meteor" in self.details and not self.details["meteor"].get("available", True):
            out.append(f"METEOR unavailable: {self.details['meteor'].get('reason')}")
        if self.details.get("bertscore", {}).get("note"):
            out.append(f"BERTScore: {self.details['bertscore']['note']}")
        if "diagnosis" in self.details:
            out.append(f"diagnosis accuracy over {self.details['diagnosis'].get('n', 0)} labelled diagnosis example(s)")
        return out

    def table(self) -> str:
        rows = [(k, format_value(v)) for k, v in self.metrics.items()]
        width = max((len(k) for k, _ in rows), default=10)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        return "\n".join(lines + [f"note: {n}" for n in self.notes()])

    def to_markdown(self) -> str:
        m = self.meta
        head = f"# Evaluation: {m.get('version') or m.get('model', '')}\n\n"
        facts = "".join(f"- {k}: {m[k]}\n" for k in ("model", "adapter", "version", "data", "n", "elapsed_s") if m.get(k) is not None)
        table = "| metric | value |\n| --- | --- |\n" + "".join(f"| {k} | {format_value(v)} |\n" for k, v in self.metrics.items())
        notes = "".join(f"- {n}\n" for n in self.notes())
        repeated = self.details.get("repetition", {}).get("most_repeated_answer")
        if repeated:
            notes += f"- most repeated answer ({self.details['repetition']['largest_copy_group']} images): \"{repeated[:200]}\"\n"
        sample = "".join(
            f"| {e['id']} | {_cell(e['question'])} | {_cell(e['prediction'])} | {_cell(e['references'][0] if e['references'] else '')} |\n"
            for e in self.per_example[:10]
        )
        return (
            head + facts + "\n" + table + ("\n" + notes if notes else "")
            + "\n## First examples\n\n| id | question | answer | reference |\n| --- | --- | --- | --- |\n" + sample
        )

    def save(self, out_dir: str | Path) -> tuple[Path, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(self.to_json(), encoding="utf-8")
        (out / "report.md").write_text(self.to_markdown(), encoding="utf-8")
        return out / "report.json", out / "report.md"


def format_value(v: Any) -> str:
    """A metric value for a table: 4 decimals, "n/a" for None."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _cell(text: str) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text[:120] + ("…" if len(text) > 120 else "")


def image_key(ex: Example) -> str:
    return "|".join(sorted(str(p) for p in ex.images))


def score_predictions(
    predictions: Sequence[str],
    examples: Sequence[Example],
    *,
    metrics: Sequence[str] = METRICS,
    bertscore_model: str | None = None,
    bertscore_layers: int | None = None,
    synonyms: dict[str, list[str]] | None = None,
    meta: dict[str, Any] | None = None,
) -> Report:
    """Score given answers against the examples' references (no model involved)."""
    assert len(predictions) == len(examples)
    names = parse_metrics(metrics)
    labels = [ex.label if ex.kind in DIAGNOSTIC_KINDS else None for ex in examples]
    results = compute_all(
        list(predictions), [ex.answers for ex in examples], labels=labels, groups=[image_key(ex) for ex in examples],
        metrics=names, bertscore_model=bertscore_model, bertscore_layers=bertscore_layers, synonyms=synonyms,
    )
    headline: dict[str, Any] = {}
    for module, key, name in HEADLINE:
        if module in names:
            headline[name] = results.get(module, {}).get(key)
    headline.update(length_stats(predictions))
    per_example = []
    for i, (ex, pred) in enumerate(zip(examples, predictions)):
        row = {"id": ex.id, "images": [str(p) for p in ex.images], "question": ex.question, "references": list(ex.answers),
               "label": labels[i], "kind": ex.kind, "source": ex.source, "prediction": pred}
        for name in ("rouge", "meteor", "bertscore", "diagnosis", "repetition"):
            values = results.get(name, {}).get("per_example") or []
            if i < len(values):
                row[{"rouge": "rougeL", "bertscore": "bertscore_f1", "repetition": "repeated"}.get(name, name)] = values[i]
        per_example.append(row)
    details = {k: {kk: vv for kk, vv in v.items() if kk != "per_example"} for k, v in results.items()}
    return Report(headline, per_example, details, dict(meta or {}, n=len(examples), metrics=list(names)))


def length_stats(predictions: Sequence[str]) -> dict[str, Any]:
    words = [len(p.split()) for p in predictions]
    if not words:
        return {}
    return {
        "answer_words_mean": statistics.fmean(words),
        "answer_words_median": statistics.median(words),
        "answer_words_min": min(words),
        "answer_words_max": max(words),
        "empty_answers": sum(1 for p in predictions if not p.strip()),
    }


def evaluate_engine(
    engine,
    examples: Sequence[Example],
    *,
    version: str | None = None,
    batch_size: int = 8,
    metrics: Sequence[str] = METRICS,
    generation=None,
    progress: bool = True,
    bertscore_model: str | None = None,
    bertscore_layers: int | None = None,
    synonyms: dict[str, list[str]] | None = None,
) -> Report:
    """Answer every example with `engine` (batched, greedy unless `generation` says otherwise) and score the answers."""
    from tqdm.auto import tqdm

    if not examples:
        raise DataError("no examples to evaluate")
    start = time.perf_counter()
    predictions: list[str] = []
    tokens = 0
    with tqdm(total=len(examples), desc=f"evaluate {version or engine.default_version}", disable=not progress) as bar:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            requests = [ChatTurn(ex.question, None, ex.load_images(), ex.clinical_context(), ex.template) for ex in chunk]
            answers = engine.answer_batch(requests, generation=generation, version=version, batch_size=batch_size)
            predictions.extend(a.text for a in answers)
            tokens += sum(a.completion_tokens for a in answers)
            bar.update(len(chunk))
    gen_s = time.perf_counter() - start
    meta = {
        "model": engine.info.source,
        "version": version or engine.default_version,
        "generation": (generation or engine.settings.generation()).to_dict(),
        "generation_s": round(gen_s, 2),
        "completion_tokens": tokens,
    }
    report = score_predictions(predictions, examples, metrics=metrics, bertscore_model=bertscore_model,
                               bertscore_layers=bertscore_layers, synonyms=synonyms, meta=meta)
    report.meta["elapsed_s"] = round(time.perf_counter() - start, 2)
    return report


# ---------------------------------------------------------------- the store's held-out split

def store_heldout_examples(settings, *, out=None) -> list[Example]:
    """Gold pairs whose images lie in the store's frozen held-out split.

    Only reads the split (refine assigns it, with its own --gold-holdout and --seed): images
    not assigned yet are not evaluated, and the number of pairs skipped is said.
    """
    import sys

    from annotation_db import store as st
    from annotation_db.db import Store
    from core.images import image_path

    db = Store.open(settings.db_url)
    try:
        with db.session() as s:
            pairs = st.gold_pairs(s).pairs
            hashes = sorted({h for p in pairs for h in p.image_hashes})
            split = st.get_split(s, hashes) if hashes else {}
    finally:
        db.dispose()
    unassigned = [p for p in pairs if p.image_hashes and any(h not in split for h in p.image_hashes)
                  and not any(split.get(h) == "heldout" for h in p.image_hashes)]
    if unassigned:
        (out or (lambda m: print(m, file=sys.stderr)))(
            f"evaluate: {len(unassigned)} gold pair(s) skipped: their images have no split yet (refine assigns it)")
    return [
        Example(
            id=f"turn-{p.turn_id}", images=[str(image_path(settings.images_dir, h)) for h in p.image_hashes],
            question=p.question, answers=[p.target], context=p.context or None, source=p.source, template=p.template,
        )
        for p in pairs
        if p.image_hashes and any(split.get(h) == "heldout" for h in p.image_hashes)
    ]


def resolve_version(settings, name: str) -> tuple[str, str | None]:
    """(base model, adapter dir or None) of a store version."""
    from annotation_db import store as st
    from annotation_db.db import Store

    db = Store.open(settings.db_url)
    try:
        with db.session() as s:
            v = st.get_version(s, int(name) if name.isdigit() else name)
            return v.base_model, v.adapter_path
    finally:
        db.dispose()


# ---------------------------------------------------------------- CLI

@dataclass
class EvaluateOptions:
    """What `python -m training.evaluate` scores and where the report goes (the instance: core.config.Settings)."""

    _argument_group_name = "evaluation"

    out: Path = field(metadata={"help": "folder for report.json, report.md and predictions.jsonl"})
    adapter: Path | None = opt(None, "a LoRA adapter folder on top of --model")
    version: str | None = opt(None, "a model version of the store (id or name): its base and adapter")
    data: Path | None = opt(None, "dataset file or folder (default with --version: the store's held-out split)")
    format: str = opt("auto", "dataset format", choices=("auto",) + FORMATS)
    split: str | None = opt(None, "split of a datasets DatasetDict")
    template: str | None = opt(None, "prompt template for every example (default: each example's own)")
    predictions: Path | None = opt(None, "score this file (shared-task JSON or our JSONL) without a model")
    references: Path | None = opt(None, "with --predictions: the references (a DermaVQA split JSON or our JSONL)")
    lang: str = opt("en", "language of the answers and references (content_<lang>, query_*_<lang>)", choices=LANGUAGES)
    weights: str = opt("auto", "deltaBLEU reference weights: auto = as the official scorer (df_userinfo.csv weights when zh is scored)",
                       choices=WEIGHT_MODES)
    userinfo: Path | None = opt(None, "DermaVQA's df_userinfo.csv (default: beside --references)")
    images_dir: Path | None = opt(None, "folder of the images of a mediqa/DermaVQA --data file (default: beside it)")
    metrics: str | None = opt(None, f"comma-separated subset of {','.join(METRICS)} (with --predictions: of {','.join(SCORE_METRICS)})")
    batch_size: int = opt(8, "examples answered together", minimum=1)
    limit: int | None = opt(None, "evaluate only the first N examples")
    strict: bool = opt(False, "a malformed row is an error instead of being skipped")
    bertscore_model: str | None = opt(None, "BERTScore encoder: hub id or local path (default: the packaged MiniLM)")
    bertscore_layers: int | None = opt(None, "BERTScore layer (default: bert-score's choice, else the last)")
    synonyms: Path | None = opt(None, "JSON file {label: [synonyms]} for diagnosis accuracy")
    progress: bool = opt(True, "progress bars")


def main(argv: list[str] | None = None) -> int:
    from annotation_db.errors import StoreError
    from core.config import Settings, parse_cli

    try:
        (args, settings), given = parse_cli([EvaluateOptions, Settings], argv, prog="python -m training.evaluate",
                                            description=__doc__)
        report = _score(args) if args.predictions else _run(args, settings, explicit_model="model" in given)
    except (DermaLoopError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    json_path, md_path = report.save(args.out)
    print(f"reports: {json_path} {md_path}")
    return 0


def _run(args: EvaluateOptions, settings: Any, *, explicit_model: bool) -> Report:
    from core.engine import Engine
    from core.models import load_model

    metrics = parse_metrics(args.metrics or METRICS)
    if args.adapter and args.version:
        raise DataError("give --adapter or --version, not both")
    model, adapter = settings.model, args.adapter
    if args.version:
        base, adapter_path = resolve_version(settings, args.version)
        model = settings.model if explicit_model else base
        adapter = Path(adapter_path) if adapter_path else None
    if args.data:
        fmt = detect_format(args.data) if args.format == "auto" else args.format
        # hf: where decoded images are stored; mediqa: where the release's images are looked up
        images_dir = args.images_dir or (settings.images_dir if fmt == "hf" else None)
        examples, problems = read_examples(args.data, fmt, strict=args.strict, split=args.split, template=args.template,
                                           images_dir=images_dir, lang=args.lang, keep_empty_references=True)
        report_problems(problems, len(examples))
        data_name = str(args.data)
    elif args.version:
        examples, data_name = store_heldout_examples(settings), f"store held-out split ({settings.db_url})"
    else:
        raise DataError("give --data FILE, or --version NAME to use the store's held-out split")
    if args.limit:
        examples = examples[: args.limit]
    if not examples:
        raise DataError(f"no usable examples in {data_name}")
    synonyms = _synonyms(args.synonyms)
    loaded = load_model(model, device=settings.device, dtype=settings.dtype, image_splitting=settings.image_splitting,
                        longest_edge=settings.longest_edge)
    engine = Engine(loaded, settings)
    version = None
    if adapter:
        version = args.version or "adapter"
        engine.add_adapter(version, adapter)
    report = evaluate_engine(engine, examples, version=version, batch_size=args.batch_size, metrics=metrics,
                             progress=args.progress, bertscore_model=args.bertscore_model,
                             bertscore_layers=args.bertscore_layers, synonyms=synonyms)
    report.meta.update(model=str(model), adapter=str(adapter) if adapter else None, data=data_name)
    _write_predictions(args.out, report)
    return report


def _write_predictions(out: Path, report: Report) -> Path:
    """predictions.jsonl (id, prediction) beside the report, for `--predictions` scoring against the official references."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.jsonl"
    rows = ({"id": e["id"], "prediction": e["prediction"], **({"label": e["label"]} if e.get("label") else {})} for e in report.per_example)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _synonyms(path: Path | None) -> dict[str, list[str]] | None:
    if path is None:
        return None
    try:
        synonyms = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(synonyms, dict)
    except (OSError, ValueError, AssertionError):
        raise DataError(f"{path}: expected a JSON object {{label: [synonyms]}}") from None
    return synonyms


def _score(args: EvaluateOptions):
    """Score-only mode: no model, no images."""
    from training.eval.score import score_files

    if args.adapter or args.version or args.data:
        raise DataError("--predictions scores a file without a model: leave out --adapter, --version and --data")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else SCORE_METRICS
    report = score_files(args.predictions, args.references, lang=args.lang, weights=args.weights, userinfo=args.userinfo,
                         metrics=metrics, bertscore_model=args.bertscore_model, bertscore_layers=args.bertscore_layers,
                         synonyms=_synonyms(args.synonyms))
    report.meta["out"] = str(args.out)
    return report

