"""Diagnosis accuracy as an offline `evaluate` metric: is the expected label named in the answer?

As the seed paper's classification metric: an answer is correct when it contains
the expected label or one of its synonyms, case-insensitively and on word
boundaries (hyphens and underscores count as spaces). Examples without a label
(an empty reference) are not counted.
"""

import re

import datasets
import evaluate

# A small table of common dermatology synonyms; callers add their own (e.g. the phantom classes).
BUILTIN_SYNONYMS = {
    "melanoma": ["malignant melanoma"],
    "basal cell carcinoma": ["bcc", "rodent ulcer", "basalioma"],
    "squamous cell carcinoma": ["scc", "cutaneous squamous cell carcinoma"],
    "melanocytic naevus": ["melanocytic nevus", "naevus", "nevus", "mole"],
    "seborrhoeic keratosis": ["seborrheic keratosis", "basal cell papilloma"],
    "actinic keratosis": ["solar keratosis"],
    "atopic dermatitis": ["atopic eczema", "eczema"],
    "psoriasis": ["plaque psoriasis", "psoriasis vulgaris"],
    "impetigo": ["impetigo contagiosa"],
    "cellulitis": ["erysipelas"],
    "tinea corporis": ["ringworm", "dermatophytosis"],
    "dermatofibroma": ["benign fibrous histiocytoma"],
    "vascular lesion": ["haemangioma", "hemangioma", "angioma"],
}


def normalise(text):
    return " ".join(re.sub(r"[-_]", " ", text.lower()).split())


def accepted_names(label, synonyms):
    """All names that count for `label`: itself, its synonyms, and its group when it is itself a synonym."""
    label_n = normalise(label)
    names = {label_n}
    for key, syns in synonyms.items():
        group = {normalise(key)} | {normalise(s) for s in syns}
        if label_n in group:
            names |= group
    return sorted(n for n in names if n)


def mentions(answer, names):
    text = normalise(answer)
    return any(re.search(r"(?<!\w)" + re.escape(n) + r"(?!\w)", text) for n in names)


class Diagnosis(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of answers naming the expected diagnosis label or a synonym (word-bounded, case-insensitive).",
            citation="",
            inputs_description="predictions: list of str. references: list of str (the expected label; '' = no label). "
            "synonyms: dict label -> list of names (added to the built-in table); use_builtin: bool (default True). "
            "Returns diagnosis_accuracy (None when no example has a label), n, per_example (None where unlabelled).",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, synonyms=None, use_builtin=True):
        table = dict(BUILTIN_SYNONYMS) if use_builtin else {}
        for key, syns in (synonyms or {}).items():
            table[key] = list(table.get(key, [])) + list(syns)
        per_example = []
        for pred, label in zip(predictions, references):
            per_example.append(mentions(pred, accepted_names(label, table)) if label and label.strip() else None)
        scored = [x for x in per_example if x is not None]
        return {
            "diagnosis_accuracy": sum(scored) / len(scored) if scored else None,
            "n": len(scored),
            "per_example": per_example,
        }
