"""Synthetic question-answer data from images with metadata and/or captions, and lesion phantoms.

    python -m training.synth --input images.csv --out synth.jsonl [--backend template] [--seed 0]
    python -m training.synth --input images/ --out synth.jsonl --backend openai \\
        --url http://localhost:8000/v1 --model Qwen2-VL-7B --api-key-env OPENAI_API_KEY --rpm 30
    python -m training.synth phantoms --out phantoms/ --n 240 --seed 0 --split train

The seed papers' recipe: several QA pairs per image (describe the morphology; the
most likely diagnosis; the differential; next steps; a caption-style description)
with the image's metadata in the generator's prompt so answers stay grounded
(DermaSynth). Input: a CSV or JSONL with `image` (or `images`, `;`-separated, relative
to the file) and any of `label` (or `diagnosis`), `body_site`, `age`, `sex`,
`fitzpatrick`, `modality`, `duration`, `symptoms`, `morphology`, `differential`
(`;`-separated), `next_step` (or `treatment`), `caption`; or a folder of images with
optional sidecars `<name>.txt` (caption) and `<name>.json` (metadata).

Back-ends: `template` (deterministic and offline: wording varies with --seed, answers
use only the given metadata and caption, a diagnosis is never named unless given)
and `openai` (training/data/synth_openai.py). Output: JSONL of training.data.examples Examples,
written record by record; a rerun skips the records already in --out (resume).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from core.errors import DermaLoopError
from training.data.examples import CONTEXT_FIELDS, IMAGE_SUFFIXES, Example, Problem, check_context, check_images, report_problems, write_jsonl
from training.errors import DataError, SynthError

QA_KINDS = ("description", "diagnosis", "differential", "next_step", "caption")
META_FIELDS = CONTEXT_FIELDS + ("label", "morphology", "differential", "next_step")


@dataclass
class SourceRecord:
    """One image (or image set) with what is known about it."""

    id: str
    images: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)  # label, context fields, morphology, differential, next_step
    caption: str | None = None

    def context(self) -> dict | None:
        return check_context({k: self.metadata[k] for k in CONTEXT_FIELDS if self.metadata.get(k) not in (None, "")})


# ---------------------------------------------------------------- input

def read_sources(path: str | Path, *, check_images_exist: bool = True) -> tuple[list[SourceRecord], list[Problem]]:
    """Records from a CSV/JSONL of image paths with metadata, or from a folder of images."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        rows = _folder_rows(path)
    elif path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            rows = [(f"line {reader.line_num}", dict(r)) for r in reader]
    elif path.suffix.lower() == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"line {i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    rows.append((f"line {i}", DataError(f"not valid JSON ({e.msg})")))
    else:
        raise DataError(f"{path}: input must be a .csv, a .jsonl or a folder of images")
    base = path if path.is_dir() else path.parent
    records, problems, seen = [], [], set()
    for where, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            rec = _record(row, base, default_id=f"{path.stem}-{where.split()[-1]}")
            if rec.id in seen:
                raise DataError(f"duplicate id {rec.id!r}")
            if check_images_exist:
                check_images(Example(rec.id, rec.images, "q", ["a"]))
            rec.context()  # validates the context fields
        except DataError as e:
            problems.append(Problem(str(path), where, str(e)))
            continue
        seen.add(rec.id)
        records.append(rec)
    return records, problems


def _folder_rows(folder: Path) -> list[tuple[str, dict]]:
    rows = []
    for img in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        row: dict[str, Any] = {"id": img.relative_to(folder).with_suffix("").as_posix().replace("/", "-"), "image": str(img)}
        side_json, side_txt = img.with_suffix(".json"), img.with_suffix(".txt")
        try:
            if side_json.exists():
                meta = json.loads(side_json.read_text(encoding="utf-8"))
                row.update(meta if isinstance(meta, dict) else {"_bad": "sidecar JSON is not an object"})
            if side_txt.exists():
                row["caption"] = side_txt.read_text(encoding="utf-8").strip()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            row["_bad"] = f"sidecar of {img.name} is unreadable ({e})"
        rows.append((f"image {img.relative_to(folder)}", row))
    return rows


def _record(row: dict, base: Path, default_id: str) -> SourceRecord:
    if not isinstance(row, dict):
        raise DataError("expected an object")
    if row.get("_bad"):
        raise DataError(row["_bad"])
    images = row.get("images", row.get("image"))
    if isinstance(images, str):
        images = [p.strip() for p in images.split(";") if p.strip()]
    if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
        raise DataError("'image' (or 'images') must name at least one image file")
    meta: dict[str, Any] = {}
    for key in META_FIELDS:
        value = row.get(key)
        if key == "label":
            value = value or row.get("diagnosis")
        if key == "next_step":
            value = value or row.get("treatment")
        if value in (None, "", []):
            continue
        if key == "differential":
            value = [v.strip() for v in value.split(";")] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise DataError("'differential' must be a list of names or a ';'-separated string")
            value = [v for v in value if v]
        elif not isinstance(value, (str, int, float)):
            raise DataError(f"'{key}' must be a string or a number")
        meta[key] = value.strip() if isinstance(value, str) else value
    caption = row.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise DataError("'caption' must be a string")
    paths = [str((base / p).resolve()) if not Path(p).is_absolute() else p for p in images]
    return SourceRecord(str(row.get("id") or default_id), paths, meta, (caption or "").strip() or None)


# ---------------------------------------------------------------- template back-end

_Q = {
    "description": ("Describe the morphology of this lesion.", "Describe what you see in this image.",
                    "What are the visible features of the skin lesion?"),
    "diagnosis": ("What is the most likely diagnosis?", "What dermatological condition is shown?",
                  "What is this skin lesion most likely to be?"),
    "differential": ("What is the differential diagnosis?", "What else should be considered?",
                     "Which other conditions could look like this?"),
    "next_step": ("What are the next steps?", "How should this be managed?", "What would you recommend next?"),
    "caption": ("Write a caption for this image.", "Give a short figure caption for this image.",
                "Summarise the image in one caption."),
}
_DIAG = ("Most likely {label}{where}.", "The most likely diagnosis is {label}{where}.", "This is most consistent with {label}{where}.")
_DIFF = ("Besides {label}, consider {others}.", "The differential includes {others}; {label} is the leading diagnosis.",
         "{label} first; {others} should also be considered.")
_NEXT = ("Next step for {label}: {step}", "For {label}: {step}", "Management of {label}: {step}")
_NEXT_GENERIC = ("Confirm {label} on clinical review{dermoscopy}; management follows the confirmed diagnosis.",
                 "Review by a clinician to confirm {label}{dermoscopy}, then treat accordingly.",
                 "The next step is clinical confirmation of {label}{dermoscopy} before treatment.")
_DESC = ("{morph}", "Findings: {morph}", "The image shows {morph_lc}")


class TemplateBackend:
    """Deterministic, offline QA from the given metadata and caption only."""

    name = "template"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.stats: dict[str, int] = {}

    def generate(self, record: SourceRecord, kinds: Sequence[str]) -> list[tuple[str, str, str]]:
        m = record.metadata
        label = m.get("label")
        where = f" on the {m['body_site']}" if m.get("body_site") else ""
        morph = m.get("morphology") or record.caption
        out = []
        for kind in kinds:
            rng = random.Random(f"{self.seed}:{record.id}:{kind}")
            q = rng.choice(_Q[kind])
            if kind == "description" and morph:
                a = rng.choice(_DESC).format(morph=_sentence(morph), morph_lc=_sentence(morph[0].lower() + morph[1:]))
            elif kind == "diagnosis" and label:
                a = rng.choice(_DIAG).format(label=label, where=where)
                detail = m.get("morphology")
                a = f"{a} {_sentence(detail)}" if detail else a
            elif kind == "differential" and label and m.get("differential"):
                others = [d for d in m["differential"] if d.lower() != str(label).lower()]
                if not others:
                    continue
                a = _sentence(rng.choice(_DIFF).format(label=label, others=_join(others)))
                a = a[0].upper() + a[1:]
            elif kind == "next_step" and label:
                if m.get("next_step"):
                    a = rng.choice(_NEXT).format(label=label, step=_sentence(m["next_step"]))
                else:
                    dermoscopy = " with dermoscopy" if m.get("modality") != "histopathology" else ""
                    a = rng.choice(_NEXT_GENERIC).format(label=label, dermoscopy=dermoscopy)
            elif kind == "caption" and record.caption:
                a = _sentence(record.caption)
            else:
                continue  # the metadata does not support this kind: never invent it
            out.append((kind, q, a))
        return out


def _sentence(text: str) -> str:
    text = str(text).strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---------------------------------------------------------------- pipeline

@dataclass
class Summary:
    records: int = 0
    skipped_done: int = 0  # already in the output (resume)
    examples: int = 0
    by_kind: Counter = field(default_factory=Counter)
    rejects: list[str] = field(default_factory=list)  # record id: reason
    problems: list[Problem] = field(default_factory=list)  # malformed input rows

    def lines(self) -> list[str]:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.by_kind.items())) or "none"
        return [
            f"records read: {self.records} (already done: {self.skipped_done}); input rows skipped: {len(self.problems)}",
            f"examples written: {self.examples} ({kinds})",
            f"records rejected: {len(self.rejects)}" + "".join(f"\n  {r}" for r in self.rejects[:20]),
        ]


def to_examples(record: SourceRecord, pairs: Sequence[tuple[str, str, str]], backend: str) -> list[Example]:
    ctx = record.context()
    return [
        Example(
            id=f"{record.id}-{kind}", images=list(record.images), question=q, answers=[a], caption=record.caption,
            label=record.metadata.get("label"), context=ctx, source="caption" if kind == "caption" else "synthetic-qa",
            template="free", kind=kind,
        )
        for kind, q, a in pairs
    ]


def run(
    records: Sequence[SourceRecord], out: str | Path, backend, *, kinds: Sequence[str] = QA_KINDS, progress: bool = True,
) -> Summary:
    """Generate for every record not yet in `out`, appending as it goes (resumable)."""
    from tqdm.auto import tqdm

    out = Path(out)
    done = _done_records(out)
    summary = Summary(records=len(records))
    for rec in tqdm(records, desc=f"synth ({backend.name})", disable=not progress):
        if rec.id in done:
            summary.skipped_done += 1
            continue
        try:
            pairs = backend.generate(rec, tuple(kinds))
        except SynthError as e:
            summary.rejects.append(str(e))
            continue
        if not pairs:
            summary.rejects.append(f"record {rec.id}: neither metadata nor caption supports any of {', '.join(kinds)}")
            continue
        examples = to_examples(rec, pairs, backend.name)
        write_jsonl(examples, out, append=True)
        summary.examples += len(examples)
        summary.by_kind.update(ex.kind for ex in examples)
    return summary


def _done_records(out: Path) -> set[str]:
    """Record ids already in `out` (examples are named <record id>-<kind>)."""
    done: set[str] = set()
    if out.exists():
        for line in out.read_text(encoding="utf-8").splitlines():
            try:
                ex_id, kind = (lambda d: (d["id"], d.get("kind")))(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue  # a half-written last line of a killed run
            if kind and ex_id.endswith(f"-{kind}"):
                done.add(ex_id[: -len(kind) - 1])
    return done


# ---------------------------------------------------------------- CLI

def _qa_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.synth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, type=Path, help="CSV/JSONL of image paths with metadata, or a folder of images")
    p.add_argument("--out", required=True, type=Path, help="output JSONL (appended to: a rerun resumes)")
    p.add_argument("--backend", choices=("template", "openai"), default="template")
    p.add_argument("--kinds", default=",".join(QA_KINDS), help=f"comma-separated subset of {','.join(QA_KINDS)}")
    p.add_argument("--seed", type=int, default=0, help="template back-end: question and answer wording")
    p.add_argument("--strict", action="store_true", help="a malformed input row is an error instead of being skipped")
    p.add_argument("--hf-out", type=Path, help="also save the output as a datasets dataset in this folder")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("openai back-end")
    g.add_argument("--url", help="base URL of an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    g.add_argument("--model", help="model name at the endpoint")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with the API key")
    g.add_argument("--rpm", type=float, default=60.0, help="requests per minute (0 = unlimited)")
    g.add_argument("--max-retries", type=int, default=4)
    g.add_argument("--backoff", type=float, default=2.0, help="first back-off in seconds, doubling")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    g.add_argument("--temperature", type=float, default=0.3)
    g.add_argument("--cache-dir", type=Path, help="reply cache (default: <out>.cache/)")
    g.add_argument("--send-images", action="store_true", help="attach the images (the endpoint must serve a vision model)")
    return p


def _phantom_parser() -> argparse.ArgumentParser:
    from training.data.phantoms import PHANTOM_KINDS, SPLITS

    p = argparse.ArgumentParser(prog="python -m training.synth phantoms",
                                description="Lesion phantoms (procedural, NOT medical images): PNGs + a JSONL of Examples.")
    p.add_argument("--out", required=True, type=Path, help="folder: images/ and <split>.jsonl are written here")
    p.add_argument("--n", type=int, default=240, help="number of phantom images (balanced over the classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--kinds", default=",".join(PHANTOM_KINDS), help=f"comma-separated subset of {','.join(PHANTOM_KINDS)}")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    return p


def _kinds(text: str, allowed: Sequence[str]) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in allowed]
    if bad or not kinds:
        raise SynthError(f"unknown kind(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(allowed)}")
    return kinds


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["phantoms"]:
            return _main_phantoms(argv[1:])
        return _main_qa(argv)
    except DermaLoopError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main_phantoms(argv: list[str]) -> int:
    from training.data.phantoms import PHANTOM_KINDS, write_phantoms

    args = _phantom_parser().parse_args(argv)
    if args.n < 1 or args.size < 32:
        raise SynthError("--n must be at least 1 and --size at least 32")
    path = write_phantoms(args.out, args.n, args.seed, args.split, kinds=_kinds(args.kinds, PHANTOM_KINDS), size=args.size,
                          progress=True)
    print(f"{args.n} phantoms ({args.split}, seed {args.seed}) -> {path}")
    print("Phantoms are procedurally drawn shapes, not medical images; their labels carry no clinical meaning.")
    return 0


def _main_qa(argv: list[str]) -> int:
    args = _qa_parser().parse_args(argv)
    kinds = _kinds(args.kinds, QA_KINDS)
    records, problems = read_sources(args.input)
    if args.strict and problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}")
    report_problems(problems, len(records))
    if args.backend == "template":
        backend = TemplateBackend(args.seed)
    else:
        from training.data.synth_openai import OpenAIBackend, OpenAIConfig

        if not args.url or not args.model:
            raise SynthError("the openai back-end needs --url and --model")
        cache = args.cache_dir or args.out.with_name(args.out.name + ".cache")
        backend = OpenAIBackend(OpenAIConfig(
            url=args.url, model=args.model, api_key_env=args.api_key_env, temperature=args.temperature, timeout_s=args.timeout,
            max_retries=args.max_retries, backoff_s=args.backoff, rpm=args.rpm, cache_dir=str(cache), send_images=args.send_images,
        ))
    summary = run(records, args.out, backend, kinds=kinds, progress=not args.no_progress)
    summary.problems = problems
    for line in summary.lines():
        print(line)
    if getattr(backend, "stats", None):
        print("back-end: " + ", ".join(f"{k} {v}" for k, v in backend.stats.items()))
    if args.hf_out:
        from training.data.examples import read_jsonl, save_hf

        examples, _ = read_jsonl(args.out)
        save_hf(examples, args.hf_out)
        print(f"datasets dataset -> {args.hf_out}")
    return 0 if summary.examples or summary.skipped_done else 1

