"""Score a predictions file without a model: the MEDIQA-M3G / MEDIQA-MAGIC 2024 official scores beside ours.

    python -m training.evaluate --predictions PRED [--references REF] [--lang en|zh|es] --out DIR \\
        [--weights auto|userinfo|none] [--userinfo df_userinfo.csv] [--bertscore-model ID_OR_DIR]

Reads the files (training/eval/predictions.py), aligns them by encounter id, and computes
deltaBLEU and BERTScore as the shared task's scorer does (training/eval/official.py), plus our
own sacreBLEU BLEU, ROUGE-L, repetition, and diagnosis accuracy when the rows carry a `label`.
Writes `report.json` (with `official_scores`, laid out as the official scores.json) and
`report.md`: every metric with its definition and whether it is the official one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from training.errors import DataError
from training.eval import official
from training.eval.predictions import Pair, align, read_predictions, read_references

SCORE_METRICS = ("deltableu", "bertscore", "bleu", "rouge", "diagnosis", "repetition")
WEIGHT_MODES = ("auto", "userinfo", "none")
DEFINITIONS = {
    "deltableu": "deltaBLEU of the MEDIQA-M3G/MAGIC 2024 scorer (evaluation/nlg/sacrebleu_deltableu.py corpus_bleu_t): corpus "
    "level, hypothesis lowercased (references not), tokeniser 13a (zh: zh), exp smoothing, effective order, each matched n-gram "
    "weighted by the best weight of a reference containing it; 0-100",
    "bertscore_f1": "BERTScore F1 (bert-score, no idf, no rescaling) of the prediction against each reference, best per encounter, "
    "then the mean",
    "bleu": "our BLEU: sacreBLEU corpus BLEU over all references of each encounter (13a; zh: zh), cased; 0-100",
    "rougeL": "our ROUGE-L F-measure (rouge-score, stemmed), best reference per encounter, mean",
    "diagnosis_accuracy": "share of answers naming the row's diagnosis label or a synonym (training/eval/metrics/diagnosis.py)",
    "repetition_rate": "share of answers near-identical (rapidfuzz >= 90) to the answer of a different encounter",
}


@dataclass(frozen=True)
class Metric:
    name: str
    value: float | None
    official: bool  # computed as the shared task's scorer computes it
    definition: str
    note: str = ""


@dataclass
class ScoreReport:
    metrics: list[Metric]
    official_scores: dict[str, float]  # as the official scores.json: deltableu_<lang>, BERTScore_<lang> (official encoder only)
    per_example: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False, default=str)

    def table(self) -> str:
        width = max(len(m.name) for m in self.metrics)
        rows = [f"{m.name:<{width}}  {_fmt(m.value):>8}  {'official' if m.official else 'ours / non-standard'}" for m in self.metrics]
        return "\n".join(rows + [f"note: {n}" for n in self.notes()])

    def notes(self) -> list[str]:
        return [f"{m.name}: {m.note}" for m in self.metrics if m.note] + list(self.meta.get("notes", []))

    def to_markdown(self) -> str:
        m = self.meta
        keys = ("predictions", "references", "lang", "n", "weights", "bertscore_encoder")
        facts = "".join(f"- {k}: {m[k]}\n" for k in keys if m.get(k) is not None)
        table = "| metric | value | official | definition |\n| --- | --- | --- | --- |\n" + "".join(
            f"| {x.name} | {_fmt(x.value)} | {'yes' if x.official else 'no'} | {x.definition} |\n" for x in self.metrics)
        notes = "".join(f"- {n}\n" for n in self.notes())
        sample = "".join(f"| {e['id']} | {_cell(e['prediction'])} | {_cell(next((r for r in e['references'] if r.strip()), ''))} |\n"
                         for e in self.per_example[:10])
        return (f"# Scores of {m.get('predictions')}\n\n{facts}\n{table}" + (f"\n## Notes\n\n{notes}" if notes else "")
                + "\n## First encounters\n\n| id | prediction | a reference |\n| --- | --- | --- |\n" + sample)

    def save(self, out_dir: str | Path) -> tuple[Path, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(self.to_json(), encoding="utf-8")
        (out / "report.md").write_text(self.to_markdown(), encoding="utf-8")
        return out / "report.json", out / "report.md"


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _cell(text: str) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text[:120] + ("…" if len(text) > 120 else "")


def reference_weights(pairs: Sequence[Pair], mode: str, userinfo: Path | None, scored_languages: set[str]) -> tuple[list[list[float]], str]:
    """The deltaBLEU weight of every reference, and a sentence saying which weights apply and why."""
    if mode not in WEIGHT_MODES:
        raise DataError(f"unknown --weights {mode!r}; one of {', '.join(WEIGHT_MODES)}")
    ones = [[1.0] * len(p.encounter.references) for p in pairs]
    if mode == "none":
        return ones, "1.0 for every reference (--weights none)"
    if userinfo is None:
        if mode == "userinfo":
            raise DataError("--weights userinfo needs the user table: give --userinfo df_userinfo.csv (DermaVQA data/iiyi/)")
        return ones, "1.0 for every reference (no df_userinfo.csv beside the references; the MEDIQA-MAGIC scorer's weights)"
    if mode == "auto" and "zh" not in scored_languages:
        return ones, (f"1.0 for every reference: the M3G scorer applies the user weights only when the scored languages "
                      f"({', '.join(sorted(scored_languages))}) include zh")
    users = official.read_userinfo(userinfo)
    out = []
    for p in pairs:
        row = []
        for r in p.encounter.references:
            if r.author_id not in users:
                raise DataError(f"encounter {p.encounter.id}: author {r.author_id!r} is not in {userinfo}")
            row.append(official.user_weight(users[r.author_id], r.completeness, r.contains_freq_ans))
        out.append(row)
    return out, f"user weights from {userinfo} (author validation and rank, completeness, contains_freq_ans)"


def score_files(
    predictions: str | Path,
    references: str | Path | None = None,
    *,
    lang: str = "en",
    weights: str = "auto",
    userinfo: str | Path | None = None,
    metrics: Sequence[str] = SCORE_METRICS,
    bertscore_model: str | None = None,
    bertscore_layers: int | None = None,
    synonyms: dict[str, list[str]] | None = None,
) -> ScoreReport:
    if lang not in official.LANGUAGES:
        raise DataError(f"unknown --lang {lang!r}; one of {', '.join(official.LANGUAGES)}")
    unknown = [m for m in metrics if m not in SCORE_METRICS]
    if unknown:
        raise DataError(f"unknown metric(s) {', '.join(unknown)} for --predictions; choose from {', '.join(SCORE_METRICS)}")
    pred = read_predictions(predictions, lang)
    refs = read_references(references, lang) if references else None
    pairs = align(pred, refs)
    scored = set(pred.languages) & set(refs.languages if refs else pred.languages)
    if userinfo is None and refs is not None and (refs.path.parent / "df_userinfo.csv").is_file():
        userinfo = refs.path.parent / "df_userinfo.csv"  # where the official M3G scorer reads it
    hyps = [p.prediction for p in pairs]
    texts = [[r.text for r in p.encounter.references] for p in pairs]
    out: list[Metric] = []
    meta: dict[str, Any] = {"predictions": str(pred.path), "references": str(refs.path) if refs else "(in the predictions file)",
                            "format": pred.format, "lang": lang, "n": len(pairs), "scored_languages": sorted(scored),
                            "notes": ["aligned by encounter id (the official scorer pairs by position)"]}
    per_example: list[dict[str, Any]] = [{"id": p.encounter.id, "prediction": p.prediction, "references": t, "label": p.encounter.label}
                                         for p, t in zip(pairs, texts)]
    official_scores: dict[str, float] = {}
    if "deltableu" in metrics:
        w, why = reference_weights(pairs, weights, Path(userinfo) if userinfo else None, scored)
        d = official.delta_bleu(hyps, texts, w, lang=lang)
        meta["weights"] = why
        official_scores[f"deltableu_{lang}"] = d.score
        out.append(Metric("deltableu", d.score, True, DEFINITIONS["deltableu"]))
        for e, ws in zip(per_example, w):
            e["weights"] = ws
    if "bertscore" in metrics:
        enc = official.choose_encoder(lang, bertscore_model, bertscore_layers)
        best = official.bertscore_best(hyps, texts, enc)
        value = sum(best) / len(best)
        want = "%s layer %d" % official.OFFICIAL_ENCODERS[lang]
        note = "" if enc.official else f"encoder {enc.name} layer {enc.layer}: NOT the official BERTScore ({want}); not comparable"
        meta["bertscore_encoder"] = f"{enc.name}, layer {enc.layer}"
        if enc.official:
            official_scores[f"BERTScore_{lang}"] = value
        out.append(Metric("bertscore_f1", value, enc.official, DEFINITIONS["bertscore_f1"] + f"; official encoder: {want}", note))
        for e, f in zip(per_example, best):
            e["bertscore_f1"] = f
    out += _ours(metrics, hyps, texts, pairs, per_example, lang, synonyms)
    return ScoreReport(out, official_scores, per_example, meta)


def _ours(metrics, hyps, texts, pairs, per_example, lang, synonyms) -> list[Metric]:
    """Our own metrics (training/eval/metrics), named as ours."""
    from training.eval import metrics as m

    out = []
    if "bleu" in metrics:
        value = m.load("bleu").compute(predictions=hyps, references=texts, tokenize="zh" if lang == "zh" else "13a")["bleu"]
        out.append(Metric("bleu", value, False, DEFINITIONS["bleu"], "not the official deltaBLEU; do not compare with shared-task BLEU"))
    if "rouge" in metrics:
        if lang == "zh":
            out.append(Metric("rougeL", None, False, DEFINITIONS["rougeL"], "not computed for zh: rouge-score's tokeniser keeps only a-z0-9"))
        else:
            r = m.compute_all(hyps, texts, metrics=("rouge",))["rouge"]
            out.append(Metric("rougeL", r["rougeL"], False, DEFINITIONS["rougeL"]))
            for e, v in zip(per_example, r["per_example"]):
                e["rougeL"] = v
    labels = [p.encounter.label for p in pairs]
    if "diagnosis" in metrics and any(labels):
        d = m.compute_all(hyps, texts, labels=labels, metrics=("diagnosis",), synonyms=synonyms)["diagnosis"]
        note = f"over {d['n']} labelled encounter(s)"
        out.append(Metric("diagnosis_accuracy", d["diagnosis_accuracy"], False, DEFINITIONS["diagnosis_accuracy"], note))
        for e, v in zip(per_example, d["per_example"]):
            e["diagnosis"] = v
    if "repetition" in metrics:
        r = m.compute_all(hyps, texts, groups=[p.encounter.id for p in pairs], metrics=("repetition",))["repetition"]
        out.append(Metric("repetition_rate", r["repetition_rate"], False, DEFINITIONS["repetition_rate"]))
        for e, v in zip(per_example, r["per_example"]):
            e["repeated"] = v
    return out
