"""The dataset format of the training package: one `Example` type, its JSONL file, and readers.

An example is one question about one or more images with one or more reference
answers (`answers[0]` is the training target; all of them are references for
scoring). Readers accept:

- `jsonl`: our own format (`write_jsonl`), image paths relative to the file;
- `csv`: columns `image` (or `images`, `;`-separated), `question`, `answer` (or
  `answers` as a JSON list), optional `id`, `caption`, `label`, `source`,
  `template`, `kind`, and the clinical context as a `context` JSON column or as
  `age`, `sex`, `body_site`, `duration`, `symptoms`, `fitzpatrick`, `modality`;
- `hf`: a `datasets` dataset saved with `save_to_disk` with an `image` or
  `images` column (decoded images are stored content-addressed in `images_dir`);
- `mediqa`: the MEDIQA-M3G / MEDIQA-MAGIC 2024 DermaVQA JSON (a list of encounters
  with `encounter_id`, `image_ids`, `query_title_<lang>`, `query_content_<lang>`,
  `responses`), images in the release's `images_<split>/` folder beside it or in
  `images_dir`; one example per encounter, every response a reference, the most
  complete response first; en, zh or es.

Every reader returns `(examples, problems)`: a malformed row (missing or
unreadable image, empty answer, wrong type) becomes a `Problem` naming the file
and line / row / encounter and is skipped. `check_problems(problems, strict=True)`
turns them into a `DataError`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from core.errors import DermaLoopError
from training.errors import DataError

SOURCES = ("expert", "accepted", "synthetic-qa", "caption", "phantom")
KINDS = ("description", "diagnosis", "differential", "next_step", "caption")  # optional question kind
FORMATS = ("jsonl", "csv", "hf", "mediqa")
CONTEXT_FIELDS = ("age", "sex", "body_site", "duration", "symptoms", "fitzpatrick", "modality")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif")


@dataclass
class Example:
    """One training / evaluation item."""

    id: str  # unique within a dataset
    images: list[str | Path]  # image files (absolute once read)
    question: str  # the clinician's text, without the clinical context
    answers: list[str]  # references; answers[0] is the training target
    caption: str | None = None  # a figure-style caption of the image(s)
    label: str | None = None  # diagnosis label of the image(s), if known
    context: dict | None = None  # core.prompts.ClinicalContext as a dict
    source: str = "expert"  # expert | accepted | synthetic-qa | caption | phantom
    template: str = "free"  # a core.prompts.TEMPLATES name
    kind: str | None = None  # description | diagnosis | differential | next_step | caption (None: free question)

    @property
    def answer(self) -> str:
        return self.answers[0]

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["images"] = [_rel(Path(p), relative_to) for p in self.images]
        return d

    @classmethod
    def from_dict(cls, d: Any, base_dir: Path | None = None, *, default_id: str = "", default_source: str = "expert") -> "Example":
        """Validate and build; raises DataError (one line) for anything malformed. Images are not opened here."""
        if not isinstance(d, dict):
            raise DataError(f"expected an object, got {type(d).__name__}")
        images = d.get("images", d.get("image"))
        if isinstance(images, (str, Path)):
            images = [images]
        if not isinstance(images, list) or not images or not all(isinstance(p, (str, Path)) and str(p).strip() for p in images):
            raise DataError("'images' must be a non-empty list of image paths")
        answers = d.get("answers", d.get("answer"))
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError("'answers' must be a list of strings")
        answers = [a.strip() for a in answers if a.strip()]
        if not answers:
            raise DataError("the answer is empty")
        question = d.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError("the question is empty" if isinstance(question, (str, type(None))) else "'question' must be a string")
        for key in ("caption", "label", "id", "kind"):
            if d.get(key) is not None and not isinstance(d[key], (str, int)):
                raise DataError(f"'{key}' must be a string")
        source = d.get("source") or default_source
        if source not in SOURCES:
            raise DataError(f"unknown source {source!r}; one of {', '.join(SOURCES)}")
        kind = d.get("kind") or None
        if kind is not None and kind not in KINDS:
            raise DataError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
        template = d.get("template") or "free"
        from core.prompts import TEMPLATES

        if template not in TEMPLATES:
            raise DataError(f"unknown template {template!r}; one of {', '.join(TEMPLATES)}")
        context = check_context(d.get("context"))
        base = Path(base_dir) if base_dir is not None else None
        paths = [str(_resolve(str(p).strip(), base)) for p in images]
        return cls(
            id=str(d.get("id") or default_id),
            images=paths,
            question=question.strip(),
            answers=answers,
            caption=(str(d["caption"]).strip() or None) if d.get("caption") else None,
            label=(str(d["label"]).strip() or None) if d.get("label") else None,
            context=context,
            source=source,
            template=template,
            kind=kind,
        )

    def clinical_context(self):
        """The context as a `core.prompts.ClinicalContext` (None when empty)."""
        from core.prompts import ClinicalContext

        return ClinicalContext.from_dict(self.context) if self.context else None

    def load_images(self) -> list:
        """The images as RGB PIL images (raises DataError naming the file)."""
        return [load_image(p) for p in self.images]


@dataclass(frozen=True)
class Problem:
    """One malformed row, skipped by a reader."""

    file: str
    where: str  # "line 3", "row 4", "encounter ENC00012"
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.message}"


def check_context(context: Any) -> dict | None:
    if context in (None, "", {}):
        return None
    if isinstance(context, str):
        try:
            context = json.loads(context)
        except json.JSONDecodeError:
            raise DataError("'context' is not valid JSON") from None
    if not isinstance(context, dict):
        raise DataError("'context' must be an object")
    from core.prompts import ClinicalContext

    try:
        return ClinicalContext.from_dict(context).to_dict() or None
    except DermaLoopError as e:
        raise DataError(f"context: {e}") from None


def load_image(path: str | Path):
    from core.images import normalise

    try:
        return normalise(Path(path))[0]
    except DermaLoopError as e:
        raise DataError(f"image {Path(path).name}: {e}") from None


def check_images(example: Example) -> None:
    """Raise DataError when an image of `example` is missing or unreadable."""
    for p in example.images:
        if not Path(p).is_file():
            raise DataError(f"image not found: {p}")
        load_image(p)


# ---------------------------------------------------------------- JSONL

def write_jsonl(examples: Iterable[Example], path: str | Path, *, append: bool = False) -> int:
    """Write (or append) examples, image paths relative to the file's folder where possible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("a" if append else "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_dict(relative_to=path.parent.resolve()), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path, *, check_images_exist: bool = True, default_source: str = "expert") -> tuple[list[Example], list[Problem]]:
    path = _existing(path)

    def build(item: tuple[int, str]) -> Example:
        lineno, line = item
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON ({e.msg})") from None
        return Example.from_dict(row, path.parent, default_id=f"{path.stem}-{lineno}", default_source=default_source)

    with _readable(path), path.open(encoding="utf-8") as f:
        items = ((f"line {n}", (n, line)) for n, line in enumerate(f, 1) if line.strip())
        return _collect(path, items, build, check_images_exist)


@contextlib.contextmanager
def _readable(path: Path):
    """A file that is not UTF-8 text (or a CSV with a NUL byte) is one DataError naming the file."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None


# ---------------------------------------------------------------- CSV

def read_csv(path: str | Path, *, check_images_exist: bool = True, default_source: str = "expert") -> tuple[list[Example], list[Problem]]:
    path = _existing(path)
    with _readable(path), path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        if not ({"image", "images"} & cols and "question" in cols and {"answer", "answers"} & cols):
            raise DataError(f"{path}: a CSV needs the columns image (or images), question and answer (or answers)")

        def build(item: tuple[int, dict]) -> Example:
            lineno, row = item
            d: dict[str, Any] = {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
            images = d.pop("images", None) or d.pop("image", None) or ""
            d["images"] = [p.strip() for p in images.split(";") if p.strip()]
            answers = d.pop("answers", None) or d.pop("answer", None) or ""
            if answers.startswith("["):
                try:
                    answers = json.loads(answers)
                except json.JSONDecodeError:
                    raise DataError("'answers' is not a valid JSON list") from None
            d["answers"] = answers
            ctx = {k: d.pop(k) for k in CONTEXT_FIELDS if k in d}
            if not d.get("context"):
                d["context"] = {k: v for k, v in ctx.items() if v}
            return Example.from_dict(d, path.parent, default_id=f"{path.stem}-{lineno}", default_source=default_source)

        items = ((f"line {reader.line_num}", (reader.line_num, row)) for row in reader)
        return _collect(path, items, build, check_images_exist)


# ---------------------------------------------------------------- datasets on disk

def save_hf(examples: Sequence[Example], out_dir: str | Path) -> Path:
    """Save examples as a `datasets` dataset with the images embedded (an `images` column of Image)."""
    import datasets

    rows = [ex.to_dict() for ex in examples]
    data = {k: [r[k] for r in rows] for k in (f.name for f in dataclasses.fields(Example))}
    data["context"] = [json.dumps(c) if c else "" for c in data["context"]]
    ds = datasets.Dataset.from_dict(data).cast_column("images", datasets.Sequence(datasets.Image()))
    ds = ds.map(lambda r: r, features=ds.features)  # embed the image bytes so the dataset is self-contained
    ds.save_to_disk(str(out_dir))
    return Path(out_dir)


def read_hf(
    path: str | Path, *, split: str | None = None, images_dir: str | Path | None = None, default_source: str = "expert"
) -> tuple[list[Example], list[Problem]]:
    """Read a dataset saved with `save_to_disk`; decoded images are stored content-addressed in `images_dir`."""
    import datasets

    from core.images import intake

    path = _existing(path)
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a folder that is not a dataset
        raise DataError(f"{path}: not a datasets dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        split = split or next((s for s in ("test", "validation", "train") if s in ds), names[0])
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; splits: {', '.join(names)}")
        ds = ds[split]
    images_dir = Path(images_dir) if images_dir else _default_images_dir()
    cols = set(ds.column_names)
    if not ({"image", "images"} & cols and "question" in cols and {"answer", "answers"} & cols):
        raise DataError(f"{path}: the dataset needs the columns image (or images), question and answer (or answers)")

    def build(item: tuple[int, dict]) -> Example:
        i, row = item
        imgs = row.pop("images", None) if "images" in row else row.pop("image", None)
        imgs = [] if imgs is None else imgs if isinstance(imgs, list) else [imgs]
        paths = []
        for img in imgs:
            if isinstance(img, str):  # a path column rather than decoded images
                paths.append(str(_resolve(img, path)))
                continue
            try:
                paths.append(str(intake(img, images_dir).path))
            except DermaLoopError as e:
                raise DataError(f"image: {e}") from None
        row["images"] = paths
        ex = Example.from_dict(row, path, default_id=f"{path.name}-{i}", default_source=default_source)
        if any(isinstance(x, str) for x in imgs):
            check_images(ex)
        return ex

    return _collect(path, ((f"row {i}", (i, row)) for i, row in enumerate(ds)), build, False)


# ---------------------------------------------------------------- any format

def detect_format(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        return "hf"
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix == ".json":
        return "mediqa"
    raise DataError(f"{p}: cannot tell the format from the name; pass --format {'|'.join(FORMATS)}")


def read_examples(
    path: str | Path,
    fmt: str = "auto",
    *,
    strict: bool = False,
    images_dir: str | Path | None = None,
    split: str | None = None,
    template: str | None = None,
    check_images_exist: bool = True,
    lang: str = "en",
    keep_empty_references: bool = False,
) -> tuple[list[Example], list[Problem]]:
    """Read any supported format; with `strict`, any problem raises DataError.

    `images_dir`: for hf, where decoded images are stored; for mediqa, where the images are
    looked up. `lang` and `keep_empty_references`: mediqa only (see `read_mediqa`).
    """
    fmt = detect_format(path) if fmt in ("auto", "", None) else fmt
    if fmt == "jsonl":
        result = read_jsonl(path, check_images_exist=check_images_exist)
    elif fmt == "csv":
        result = read_csv(path, check_images_exist=check_images_exist)
    elif fmt == "hf":
        result = read_hf(path, split=split, images_dir=images_dir)
    elif fmt == "mediqa":
        from training.data.mediqa import read_mediqa

        result = read_mediqa(path, images_dir=images_dir, template=template or "free", check_images_exist=check_images_exist,
                             lang=lang, keep_empty_references=keep_empty_references)
    else:
        raise DataError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if template and fmt != "mediqa":
        for ex in result[0]:
            ex.template = template
    check_problems(result[1], strict=strict)
    return result


def check_problems(problems: Sequence[Problem], *, strict: bool) -> None:
    if strict and problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; fix the data or run without --strict to skip such rows")


def report_problems(problems: Sequence[Problem], n_read: int, *, file=None, limit: int = 20) -> None:
    """Print the problems (at most `limit`) and the count, for a CLI."""
    file = file or sys.stderr
    for p in problems[:limit]:
        print(f"skipped: {p}", file=file)
    if len(problems) > limit:
        print(f"... and {len(problems) - limit} more", file=file)
    if problems:
        print(f"{len(problems)} malformed row(s) skipped, {n_read} read", file=file)


def _collect(path: Path, items: Iterable[tuple[str, Any]], build, check: bool) -> tuple[list[Example], list[Problem]]:
    """Build an Example from each (where, raw) item; a DataError becomes a Problem and the item is skipped."""
    examples: list[Example] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for where, raw in items:
        try:
            ex = build(raw)
            _finish(ex, seen, check)
        except DataError as e:
            problems.append(Problem(str(path), where, str(e)))
            continue
        examples.append(ex)
    return examples, problems


def _finish(ex: Example, seen: set[str], check: bool) -> None:
    if ex.id in seen:
        raise DataError(f"duplicate id {ex.id!r}")
    if check:
        check_images(ex)
    seen.add(ex.id)


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    return p


def _resolve(p: str, base: Path | None) -> Path:
    path = Path(p).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return path.resolve() if path.is_absolute() else path


def _rel(p: Path, base: Path | None) -> str:
    if base is not None:
        try:
            return p.resolve().relative_to(base).as_posix()
        except ValueError:
            pass
    return str(p.resolve()) if base is not None else str(p)


def _default_images_dir() -> Path:
    from core.config import Settings

    return Settings.from_env().images_dir
