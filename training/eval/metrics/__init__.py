"""The evaluation metrics: offline `evaluate` modules in this folder, and a small API around them.

Each `<name>.py` here is an `evaluate.Metric` loaded by path (`evaluate.load` of a
hub name fetches scripts from the hub and fails offline):

    from training.eval import metrics
    metrics.load("bleu").compute(predictions=[...], references=[[...], ...])
    metrics.compute_all(predictions, references, labels=..., groups=...)

bleu (sacreBLEU), rouge (ROUGE-L, rouge-score), meteor (nltk; None without WordNet),
bertscore (bert-score, configurable encoder; offline default: packaged MiniLM),
diagnosis (label or synonym named in the answer), repetition (copies across images, distinct-n).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from training.errors import MetricError

HERE = Path(__file__).resolve().parent
METRICS = ("bleu", "rouge", "meteor", "bertscore", "diagnosis", "repetition")
_LOADED: dict[str, Any] = {}


def load(name: str):
    """The `evaluate.EvaluationModule` of one of METRICS, loaded from this folder (cached)."""
    if name not in METRICS:
        raise MetricError(f"unknown metric {name!r}; one of {', '.join(METRICS)}")
    if name not in _LOADED:
        import evaluate

        _LOADED[name] = evaluate.load(str(HERE / f"{name}.py"), keep_in_memory=True)
    return _LOADED[name]


def parse_metrics(text: str | Sequence[str]) -> tuple[str, ...]:
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise MetricError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    return tuple(names)


def wordnet_available() -> tuple[bool, str]:
    """(available, reason when not): METEOR needs nltk's WordNet corpus."""
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return True, ""
    except LookupError:
        return False, "the WordNet corpus is not installed (nltk.download('wordnet') needs network; it is not on PyPI)"
    except Exception as e:
        return False, f"the WordNet corpus could not be loaded ({type(e).__name__}: {e})"


def default_synonyms() -> dict[str, list[str]]:
    """The phantom classes' synonyms (the built-in dermatology table lives in diagnosis.py)."""
    from training.data.phantoms import synonyms

    return synonyms()


def compute_all(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    labels: Sequence[str | None] | None = None,
    groups: Sequence[str] | None = None,
    metrics: Sequence[str] = METRICS,
    bertscore_model: str | None = None,
    bertscore_layers: int | None = None,
    synonyms: dict[str, list[str]] | None = None,
    repetition_threshold: float = 90.0,
) -> dict[str, dict]:
    """Run the named metrics; returns {metric name: its result dict}.

    `references`: one list of reference strings per prediction. `labels`: the
    expected diagnosis per prediction (None = not scored). `groups`: the image key
    of each prediction (default: each its own image).
    """
    predictions = [p or "" for p in predictions]
    references = [list(r) if not isinstance(r, str) else [r] for r in references]
    assert len(predictions) == len(references)
    out: dict[str, dict] = {}
    for name in parse_metrics(metrics):
        if not predictions:
            out[name] = {}
            continue
        m = load(name)
        if name in ("bleu", "rouge", "meteor"):
            out[name] = m.compute(predictions=predictions, references=references)
        elif name == "bertscore":
            try:
                out[name] = m.compute(predictions=predictions, references=references, model_type=bertscore_model, num_layers=bertscore_layers)
            except (OSError, ValueError, ImportError) as e:
                raise MetricError(f"BERTScore encoder {bertscore_model or 'default'} cannot be loaded ({e})") from None
        elif name == "diagnosis":
            labs = [label or "" for label in (labels or [None] * len(predictions))]
            syn = {**default_synonyms(), **(synonyms or {})}
            out[name] = m.compute(predictions=predictions, references=labs, synonyms=syn)
        elif name == "repetition":
            grp = list(groups) if groups is not None else [str(i) for i in range(len(predictions))]
            expected = [r[0] if r else "" for r in references]
            out[name] = m.compute(predictions=predictions, groups=grp, threshold=repetition_threshold, expected=expected)
    return out
