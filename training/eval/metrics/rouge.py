"""ROUGE-L F-measure (Google's rouge-score) as an offline `evaluate` metric.

Multi-reference: the best-matching reference per prediction (rouge-score's
`score_multi`), then the mean over predictions.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_KWARGS = """
predictions: list of str. references: list of str or list of lists of str.
use_stemmer: bool (default True). Returns: rougeL (0-1, mean F-measure) and per_example.
"""


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE-L F-measure, best reference per prediction, averaged.",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004.",
            inputs_description=_KWARGS,
            features=[
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, use_stemmer=True):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
        scores = []
        for pred, refs in zip(predictions, references):
            refs = [refs] if isinstance(refs, str) else list(refs)
            scores.append(scorer.score_multi(refs, pred)["rougeL"].fmeasure)
        return {"rougeL": sum(scores) / len(scores) if scores else 0.0, "per_example": scores}
