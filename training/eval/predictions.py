"""Read a predictions file and its references, and align them by encounter id, for scoring without a model.

    python -m training.evaluate --predictions PRED [--references REF] [--lang en|zh|es] --out DIR

Formats (no images needed):
- the shared task's JSON (MEDIQA-M3G / MEDIQA-MAGIC 2024, DermaVQA): a list of
  `{"encounter_id", "responses": [{"content_<lang>": ...}, ...]}`. In a predictions file the
  answer is `responses[0].content_<lang>`; in a references file every response is a
  reference (empty ones kept, as the official scorer keeps them), with `author_id`,
  `completeness` and `contains_freq_ans` for the user weights.
- our JSONL: one object per line with `id` (or `encounter_id`), `prediction`, and optionally
  the references as `references` / `answers` (strings) or `responses` (the dataset's
  objects), and a diagnosis `label`. The Example JSONL (training/data/examples.py) is a
  references file.

`align` pairs each reference encounter with its prediction by id (the official scorer
pairs by position) and fails with one line on missing, extra or duplicate ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.errors import DataError


@dataclass(frozen=True)
class Reference:
    text: str
    author_id: str | None = None  # for the M3G user weights (df_userinfo.csv)
    completeness: Any = None  # 0.0 / 0.5 / 1.0 in the release, kept as read (the weights compare with == 1.0)
    contains_freq_ans: Any = None


@dataclass(frozen=True)
class Encounter:
    id: str
    references: tuple[Reference, ...]
    label: str | None = None  # a diagnosis label, when the file has one
    question: str = ""  # query title + content, for the report only


@dataclass(frozen=True)
class PredictionFile:
    path: Path
    format: str  # "official" | "jsonl"
    predictions: dict[str, str]  # encounter id -> answer, in file order
    languages: tuple[str, ...]  # the content_<lang> fields of the file (official: of its first response)
    encounters: dict[str, Encounter]  # references carried by the file itself (JSONL rows), else empty
    labels: dict[str, str]  # encounter id -> diagnosis label


@dataclass(frozen=True)
class ReferenceFile:
    path: Path
    encounters: list[Encounter]  # file order
    languages: tuple[str, ...]  # the content_<lang> fields of the first response (what the official scorer reads)


@dataclass(frozen=True)
class Pair:
    encounter: Encounter
    prediction: str


def _load(path: Path) -> tuple[str, list[tuple[str, Any]]]:
    """('json' | 'jsonl', [(where, item)])."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    if path.suffix.lower() == ".jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
        return "jsonl", items
    if path.suffix.lower() != ".json":
        raise DataError(f"{path}: expected the shared task's .json or our .jsonl")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of encounters")
    return "json", [(f"item {i}", x) for i, x in enumerate(data)]


def _id(row: Any, path: Path, where: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{path}: {where}: expected an object")
    value = row.get("encounter_id", row.get("id"))
    if not isinstance(value, (str, int)) or not str(value).strip():
        raise DataError(f"{path}: {where}: no encounter_id (or id)")
    return str(value).strip()


def _content_languages(response: Any) -> tuple[str, ...]:
    if not isinstance(response, dict):
        return ()
    return tuple(k.removeprefix("content_") for k in response if k.startswith("content_"))


def _responses(row: dict, lang: str, where: str) -> tuple[Reference, ...]:
    out = []
    for j, r in enumerate(row["responses"] if isinstance(row["responses"], list) else [None]):
        text = r.get(f"content_{lang}") if isinstance(r, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{where}: response {j} has no content_{lang} string")
        out.append(Reference(text, r.get("author_id"), r.get("completeness"), r.get("contains_freq_ans")))
    return tuple(out)


def _references(row: dict, lang: str, where: str) -> tuple[Reference, ...] | None:
    """The references a row carries: `responses` objects, or `references` / `answers` strings; None when it has none."""
    if "responses" in row:
        return _responses(row, lang, where)
    for key in ("references", "answers"):
        if key in row:
            refs = row[key]
            refs = [refs] if isinstance(refs, str) else refs
            if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
                raise DataError(f"{where}: '{key}' must be a list of strings")
            return tuple(Reference(r) for r in refs)
    return None


def _label(row: dict, where: str) -> str | None:
    label = row.get("label")
    if label is not None and not isinstance(label, (str, int)):
        raise DataError(f"{where}: 'label' must be a string")
    return str(label).strip() or None if label is not None else None


def _question(row: dict, lang: str) -> str:
    if isinstance(row.get("question"), str):
        return row["question"]
    parts = [row.get(f"query_title_{lang}"), row.get(f"query_content_{lang}")]
    return " ".join(p.strip() for p in parts if isinstance(p, str) and p.strip())


def _unique(ids: list[str], path: Path) -> None:
    seen: set[str] = set()
    dups = [i for i in ids if i in seen or seen.add(i)]
    if dups:
        raise DataError(f"{path}: duplicate encounter id(s): {_some(sorted(set(dups)))}")


def _some(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def read_predictions(path: str | Path, lang: str = "en") -> PredictionFile:
    """A predictions file in the shared task's JSON or our JSONL (see the module docstring)."""
    path = Path(path)
    kind, items = _load(path)
    preds: dict[str, str] = {}
    encounters: dict[str, Encounter] = {}
    labels: dict[str, str] = {}
    ids = []
    languages: tuple[str, ...] = (lang,)
    if kind == "json":
        first = items[0][1] if items else None
        if isinstance(first, dict) and isinstance(first.get("responses"), list) and first["responses"]:
            languages = _content_languages(first["responses"][0])
    for where, row in items:
        enc_id = _id(row, path, where)
        ids.append(enc_id)
        at = f"{path}: encounter {enc_id}"
        if kind == "json":
            responses = row.get("responses")
            first = responses[0] if isinstance(responses, list) and responses else None
            text = first.get(f"content_{lang}") if isinstance(first, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{at}: no answer in responses[0].content_{lang} (the shared task's prediction format)")
        else:
            text = row.get("prediction")
            if not isinstance(text, str):
                raise DataError(f"{at}: no 'prediction' string")
            label = _label(row, at)
            if label:
                labels[enc_id] = label
            refs = _references(row, lang, at)
            if refs is not None:
                encounters[enc_id] = Encounter(enc_id, refs, label, _question(row, lang))
        preds[enc_id] = text
    _unique(ids, path)
    if not preds:
        raise DataError(f"{path}: no predictions")
    return PredictionFile(path, "official" if kind == "json" else "jsonl", preds, languages, encounters, labels)


def read_references(path: str | Path, lang: str = "en") -> ReferenceFile:
    """A references file: the shared task's JSON (a DermaVQA split) or our JSONL; every response kept, empty or not."""
    path = Path(path)
    kind, items = _load(path)
    encounters = []
    languages: tuple[str, ...] = (lang,)
    for where, row in items:
        enc_id = _id(row, path, where)
        at = f"{path}: encounter {enc_id}"
        if kind == "json" and not isinstance(row.get("responses"), list):
            raise DataError(f"{at}: no 'responses' list (a predictions or input-only file?)")
        refs = _references(row, lang, at)
        if refs is None:
            raise DataError(f"{at}: no references ('responses', 'references' or 'answers')")
        if kind == "json" and not encounters:
            languages = next((_content_languages(r) for r in row["responses"][:1]), languages)
        encounters.append(Encounter(enc_id, refs, _label(row, at), _question(row, lang)))
    _unique([e.id for e in encounters], path)
    if not encounters:
        raise DataError(f"{path}: no encounters")
    return ReferenceFile(path, encounters, languages)


def align(predictions: PredictionFile, references: ReferenceFile | None) -> list[Pair]:
    """Each reference encounter with its prediction, in the references' order; one-line errors on missing or extra ids."""
    if references is None:
        missing_refs = [i for i in predictions.predictions if i not in predictions.encounters]
        if missing_refs:
            raise DataError(f"{predictions.path}: no references for {_some(missing_refs)}; give --references FILE")
        encounters = list(predictions.encounters.values())
        where = str(predictions.path)
    else:
        encounters = references.encounters
        where = str(references.path)
    ref_ids = {e.id for e in encounters}
    missing = [e.id for e in encounters if e.id not in predictions.predictions]
    extra = [i for i in predictions.predictions if i not in ref_ids]
    if missing:
        raise DataError(f"{predictions.path}: no prediction for {len(missing)} encounter(s) of {where}: {_some(missing)}")
    if extra:
        raise DataError(f"{predictions.path}: {len(extra)} encounter(s) not in {where}: {_some(extra)}")
    pairs = []
    for e in encounters:
        if not e.references:
            raise DataError(f"{where}: encounter {e.id} has no reference (the official scorer cannot score it either)")
        label = e.label or predictions.labels.get(e.id)
        pairs.append(Pair(Encounter(e.id, e.references, label, e.question), predictions.predictions[e.id]))
    return pairs
