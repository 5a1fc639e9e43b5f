"""Diagnosis accuracy and differential coverage as an offline `evaluate` metric.

    from training.eval import metrics
    metrics.load("diagnosis").compute(predictions=["Most likely BCC; SCC is less likely."],
                                      references=["basal cell carcinoma"])
    # {'diagnosis_accuracy': 1.0, 'differential_coverage': 1.0, 'n': 1, ...}

diagnosis_accuracy: the share of labelled answers whose *primary* diagnosis is the
label (or a narrower concept: "nodular melanoma" for "melanoma"), read by
training/eval/diagnosis_matcher.py: negation-aware ("not melanoma", "melanoma has
been ruled out" are misses), and a differential that merely lists the label among
others, or an uncommitted "psoriasis or eczema", is a miss.
differential_coverage: the share whose answer names the label, not denied, anywhere
(as the primary diagnosis or among the alternatives).
Names, synonyms, abbreviations and spellings come from
training/eval/dermatology_vocabulary.yaml; `synonyms` adds the caller's. Examples
without a label (an empty reference) are not counted.
"""

import datasets
import evaluate

from training.eval.diagnosis_matcher import Matcher, normalise  # noqa: F401  (normalise: kept for callers)


def _builtin_synonyms() -> dict[str, list[str]]:
    """The packaged vocabulary as {concept: [every other name]} (read-only view, for reports and callers)."""
    m = Matcher.default()
    out: dict[str, list[str]] = {}
    for name, concept in sorted(m.names.items()):
        if name != concept:
            out.setdefault(concept, []).append(name)
    for abbr, concept in sorted(m.abbreviations.items()):
        out.setdefault(concept, []).append(abbr)
    return out


BUILTIN_SYNONYMS = _builtin_synonyms()


def matcher_for(labels, synonyms=None, use_builtin=True) -> Matcher:
    """The vocabulary (packaged unless use_builtin=False) plus the caller's synonyms and any unknown labels."""
    base = Matcher.default() if use_builtin else Matcher.from_files(use_concepts=False)
    return base.with_synonyms(synonyms, labels=[label for label in labels if label])


class Diagnosis(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of answers whose primary diagnosis is the expected label (negation-aware, synonyms, "
            "abbreviations, spellings), and share naming it anywhere as a candidate (differential coverage).",
            citation="NegEx: Chapman et al., J Biomed Inform 2001. ConText: Harkema et al., J Biomed Inform 2009.",
            inputs_description="predictions: list of str. references: list of str (the expected label; '' = no label). "
            "synonyms: dict label -> list of names (added to the vocabulary); use_builtin: bool (default True). "
            "Returns diagnosis_accuracy and differential_coverage (None when no example has a label), n, "
            "per_example and per_example_coverage (None where unlabelled).",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, synonyms=None, use_builtin=True):
        labels = [label if label and label.strip() else None for label in references]
        matcher = matcher_for(labels, synonyms, use_builtin)
        per_example, coverage = [], []
        for pred, label in zip(predictions, labels):
            if label is None:
                per_example.append(None)
                coverage.append(None)
                continue
            reading = matcher.read(pred or "")
            target = matcher.concept_of(label)
            per_example.append(matcher.counts_for(reading.primary, target))
            coverage.append(any(matcher.counts_for(c, target) for c in reading.candidates))
        scored = [x for x in per_example if x is not None]
        covered = [x for x in coverage if x is not None]
        return {
            "diagnosis_accuracy": sum(scored) / len(scored) if scored else None,
            "differential_coverage": sum(covered) / len(covered) if covered else None,
            "n": len(scored),
            "per_example": per_example,
            "per_example_coverage": coverage,
        }
