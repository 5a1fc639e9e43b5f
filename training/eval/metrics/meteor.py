"""METEOR (nltk) as an offline `evaluate` metric; needs the WordNet corpus.

WordNet is not on PyPI, so without it the metric reports itself unavailable with
the reason instead of failing (`meteor` is None). Tokenisation: lower-cased words
and punctuation by a regular expression (no punkt download). Multi-reference:
nltk's own (best reference).
"""

import re

import datasets
import evaluate
from nltk.translate.meteor_score import meteor_score

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text):
    return _TOKEN.findall(text.lower())


def find_wordnet():
    """(wordnet reader or None, reason when None)."""
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet, ""
    except LookupError:
        return None, "the WordNet corpus is not installed (nltk.download('wordnet') needs network; it is not on PyPI)"
    except Exception as e:  # a broken corpus install
        return None, f"the WordNet corpus could not be loaded ({type(e).__name__}: {e})"


class Meteor(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="METEOR with exact, stem and WordNet-synonym matching (nltk).",
            citation="Banerjee and Lavie, METEOR, 2005.",
            inputs_description="predictions: list of str. references: list of str or list of lists of str. "
            "Returns meteor (0-1 or None), available, reason, per_example.",
            features=[
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, wordnet=None):
        reason = ""
        if wordnet is None:
            wordnet, reason = find_wordnet()
        if wordnet is None:
            return {"meteor": None, "available": False, "reason": reason, "per_example": []}
        scores = []
        for pred, refs in zip(predictions, references):
            refs = [refs] if isinstance(refs, str) else list(refs)
            scores.append(meteor_score([tokenize(r) for r in refs], tokenize(pred), wordnet=wordnet))
        return {"meteor": sum(scores) / len(scores) if scores else 0.0, "available": True, "reason": "", "per_example": scores}
