"""BLEU (sacreBLEU corpus BLEU) as an offline `evaluate` metric; multi-reference as in MEDIQA-MAGIC.

Each prediction may have a different number of references (missing ones are
passed to sacreBLEU as None). Scores are 0-100.
"""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = "Corpus BLEU computed by sacreBLEU over all references of each prediction."
_KWARGS = """
predictions: list of str. references: list of str or list of lists of str.
tokenize: sacreBLEU tokenizer (default "13a"); lowercase: bool (default False).
Returns: bleu (0-100), precisions, brevity_penalty, sys_len, ref_len, signature.
"""


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018.",
            inputs_description=_KWARGS,
            features=[
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, tokenize="13a", lowercase=False):
        refs = [[r] if isinstance(r, str) else list(r) for r in references]
        width = max((len(r) for r in refs), default=1)
        streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
        bleu = sacrebleu.metrics.BLEU(tokenize=tokenize, lowercase=lowercase)
        score = bleu.corpus_score(list(predictions), streams)
        return {
            "bleu": score.score,
            "precisions": list(score.precisions),
            "brevity_penalty": score.bp,
            "sys_len": score.sys_len,
            "ref_len": score.ref_len,
            "signature": str(bleu.get_signature()),
        }
