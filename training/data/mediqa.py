"""The DermaVQA reader (`--format mediqa`): the MEDIQA-M3G / MEDIQA-MAGIC 2024 release as `Example`s.

The release (github wyim/DermaVQA, commit 686a570): `data/iiyi/{train,valid_ht,test_ht}.json`
(query and responses in en, zh and es; images from https://osf.io/72rp3/ in `images_<split>/`,
named IMG_<encounter>_<n>.jpg) and `data/reddit/{train,valid,test}_answersonly.json` (English
responses only; the query text and images come from Reddit through MEDIQA-MAGIC-2024's
`download_data.py`, which saves `<post id>.<ext>` under the folder it is given).

    python -m training.evaluate --model ID --data valid_ht.json --images-dir DIR --lang en --out DIR
    python -m training.refine --synthetic train.json ...
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any, Sequence

from training.data.examples import Example, Problem, _collect, _existing
from training.errors import DataError

MEDIQA_LANGUAGES = ("en", "zh", "es")
MEDIQA_SPLITS = ("train", "valid", "test")


def read_mediqa(
    path: str | Path,
    *,
    images_dir: str | Path | None = None,
    template: str = "free",
    check_images_exist: bool = True,
    lang: str = "en",
    keep_empty_references: bool = False,
) -> tuple[list[Example], list[Problem]]:
    """One example per encounter of a DermaVQA split (github wyim/DermaVQA data/iiyi, data/reddit).

    The question is query_title_<lang> + query_content_<lang>; every non-empty content_<lang>
    response is a reference, the most complete first. With `keep_empty_references`, empty
    responses stay as "" references after the others (the official scorer keeps them).
    Images: `images_dir` (or its images_<split>/ or <split>/ sub-folder), else beside the file
    (images_<split>/, the release's names; images/<split>/, where MEDIQA-MAGIC-2024's
    download_data.py writes the reddit images; ...). An image id without an extension (reddit)
    matches any `<id>.*`. The reddit *_answersonly.json files have no query text until
    download_data.py fetches it.
    """
    if lang not in MEDIQA_LANGUAGES:
        raise DataError(f"unknown language {lang!r}; one of {', '.join(MEDIQA_LANGUAGES)}")
    path = _existing(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):  # some releases wrap the list
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of encounters")
    folders = mediqa_image_folders(path, images_dir)
    title_key, content_key, answer_key = f"query_title_{lang}", f"query_content_{lang}", f"content_{lang}"

    def build(item: tuple[int, Any]) -> Example:
        i, enc = item
        if not isinstance(enc, dict):
            raise DataError("an encounter must be an object")
        image_ids = enc.get("image_ids")
        if isinstance(image_ids, str):
            image_ids = [image_ids]
        if not isinstance(image_ids, list) or not image_ids:
            raise DataError("'image_ids' must be a non-empty list")
        images = [_find_image(str(name), folders, required=check_images_exist) for name in image_ids]
        title, content = enc.get(title_key) or "", enc.get(content_key) or ""
        if not isinstance(title, str) or not isinstance(content, str):
            raise DataError(f"'{title_key}' and '{content_key}' must be strings")
        if title_key not in enc and content_key not in enc:
            raise DataError(f"no {title_key} or {content_key}" + (": an answers-only reddit file has no query text until MEDIQA-MAGIC-2024's "
                            "download_data.py fetches it (docs/evaluation.md)" if lang == "en" else ""))
        responses = enc.get("responses")
        if not isinstance(responses, list):
            raise DataError("'responses' must be a list")
        ranked, empty = [], 0
        for j, r in enumerate(responses):
            if not isinstance(r, dict) or not isinstance(r.get(answer_key, ""), str):
                raise DataError(f"response {j} must be an object with a string {answer_key}")
            if (r.get(answer_key) or "").strip():
                ranked.append((-_number(r.get("completeness")), j, r[answer_key].strip()))
            else:
                empty += 1
        question = ". ".join(s.strip().rstrip(".") for s in (title, content) if s.strip())
        d = {"id": enc.get("encounter_id") or f"{path.stem}-{i}", "images": images, "question": question + "." if question else "",
             "answers": [text for *_, text in sorted(ranked)], "source": "expert", "template": template}
        ex = Example.from_dict(d, None)
        if keep_empty_references:
            ex.answers.extend([""] * empty)
        return ex

    def where(i: int, enc: Any) -> str:
        enc_id = enc.get("encounter_id") if isinstance(enc, dict) else None
        return f"encounter {enc_id}" if enc_id else f"encounter #{i}"

    return _collect(path, ((where(i, enc), (i, enc)) for i, enc in enumerate(data)), build, check_images_exist)


def mediqa_split(path: Path) -> str | None:
    """The split a DermaVQA file belongs to, from its name: valid_ht.json -> valid, train_answersonly.json -> train."""
    head = path.stem.split("_")[0].lower()
    return head if head in MEDIQA_SPLITS else None


def mediqa_image_folders(path: Path, images_dir: str | Path | None = None) -> list[Path]:
    """Existing folders to look for a DermaVQA file's images in, most specific first."""
    split, stem = mediqa_split(path), path.stem
    names = [f"images_{split}", f"images/{split}", split] if split else []
    if images_dir is not None:
        base = Path(images_dir).expanduser()
        if not base.is_dir():
            raise DataError(f"--images-dir {base}: no such folder")
        candidates = [base / n for n in names] + [base]
    else:
        d = path.parent
        candidates = [d / n for n in names + [f"images_{stem}", f"images/{stem}", stem, f"{stem}_images", "images", "."]]
    return [c for c in dict.fromkeys(candidates) if c.is_dir()]


def _find_image(name: str, folders: Sequence[Path], *, required: bool = True) -> str:
    for folder in folders:
        p = folder / name
        if p.is_file():
            return str(p)
        if not Path(name).suffix:  # reddit ids: the download script saves <id>.<last 3 letters of the URL>
            found = sorted(x for x in folder.glob(glob.escape(name) + ".*") if x.is_file())
            if found:
                return str(found[0])
    if not required:  # scoring without images: keep the expected path
        return str((folders[0] if folders else Path(".")) / name)
    raise DataError(f"image {name} not found in {', '.join(str(f) for f in folders) or 'any images folder beside the file'}")


def _number(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return 0.0
