"""Repetition as an offline `evaluate` metric: answers copied across different images, and distinct-n.

The MEDIQA-MAGIC failure: a fine-tuned small VLM answered 10 of 78 test images
with a copy of one training answer. An answer is "repeated" when its normalised
text (lower case, punctuation removed) is at least `threshold` similar (rapidfuzz
ratio, 0-100) to an answer given for a *different* image (`groups` names the
image or image set of each answer). When `expected` (the reference answer of each
item) is given, two items whose expected answers are themselves near-identical
(two images of the same class, answered the same way by design) are not counted
as a copy: a perfect model scores 0. distinct-n = unique n-grams / all n-grams
over all answers (low = the same words again and again).
"""

import re
from collections import Counter

import datasets
import evaluate
import numpy as np
from rapidfuzz import fuzz, process


def normalise(text):
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def distinct_n(texts, n):
    grams = Counter()
    for t in texts:
        words = t.split()
        grams.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


class Repetition(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of answers near-identical to an answer for a different image; distinct-1/2.",
            citation="",
            inputs_description="predictions: list of str. groups: list of str (image key of each answer). "
            "threshold: similarity 0-100 (default 90); expected: optional list of str (reference answers; items whose "
            "references are near-identical may share an answer). Returns repetition_rate, distinct_1, distinct_2, "
            "largest_copy_group, most_repeated_answer, per_example.",
            features=datasets.Features({"predictions": datasets.Value("string"), "groups": datasets.Value("string")}),
        )

    def _compute(self, predictions, groups, threshold=90.0, expected=None):
        norm = [normalise(p) for p in predictions]
        n = len(norm)
        repeated = [False] * n
        if n > 1:
            sim = process.cdist(norm, norm, scorer=fuzz.ratio, workers=1)
            ids = {g: k for k, g in enumerate(dict.fromkeys(groups))}
            key = np.array([ids[g] for g in groups])
            copies = (sim >= threshold) & (key[:, None] != key[None, :])
            if expected is not None:
                assert len(expected) == n
                exp = [normalise(e) for e in expected]
                copies &= process.cdist(exp, exp, scorer=fuzz.ratio, workers=1) < threshold
            repeated = [bool(x) for x in copies.any(axis=1)]
        copies = Counter()
        images_per_text = {}
        for text, g in zip(norm, groups):
            images_per_text.setdefault(text, set()).add(g)
        for text, imgs in images_per_text.items():
            copies[text] = len(imgs)
        top, top_n = copies.most_common(1)[0] if copies else ("", 0)
        return {
            "repetition_rate": sum(repeated) / n if n else 0.0,
            "distinct_1": distinct_n(norm, 1),
            "distinct_2": distinct_n(norm, 2),
            "largest_copy_group": top_n,  # images that got exactly the same (normalised) answer
            "most_repeated_answer": top if top_n > 1 else "",
            "per_example": repeated,
        }
