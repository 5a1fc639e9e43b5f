"""The diagnosis matcher against a table of answers a dermatologist would score, plus the vocabulary and metric API."""

from pathlib import Path

import pytest

from training.data import phantoms
from training.data.synth import _DIAG, _DIFF
from training.errors import MetricError
from training.eval import metrics
from training.eval.diagnosis_matcher import Matcher

# (answer, label, primary diagnosis is the label, label offered anywhere and not denied)
TABLE = [
    # plain hits, case and punctuation
    ("Most likely melanoma.", "melanoma", True, True),
    ("MELANOMA", "melanoma", True, True),
    ("melanoma!!", "melanoma", True, True),
    ("Most likely Malignant Melanoma, refer urgently.", "melanoma", True, True),
    ("This is most consistent with psoriasis on the elbows.", "psoriasis", True, True),
    ("The most likely diagnosis is impetigo.", "impetigo", True, True),
    ("Impression: basal cell carcinoma.", "basal cell carcinoma", True, True),
    ("In keeping with a dermatofibroma.", "dermatofibroma", True, True),
    # negations: pre, post, pseudo
    ("This is not melanoma.", "melanoma", False, False),
    ("Melanoma has been ruled out.", "melanoma", False, False),
    ("No signs of psoriasis.", "psoriasis", False, False),
    ("There are no features of melanoma; this is a benign naevus.", "melanoma", False, False),
    ("There are no features of melanoma; this is a benign naevus.", "melanocytic naevus", True, True),
    ("This is unlikely to be melanoma.", "melanoma", False, False),
    ("Melanoma is unlikely.", "melanoma", False, False),
    ("This is eczema rather than psoriasis.", "psoriasis", False, False),
    ("This is eczema rather than psoriasis.", "atopic dermatitis", True, True),
    ("Melanoma was excluded on dermoscopy; seborrhoeic keratosis.", "melanoma", False, False),
    ("This is not consistent with melanoma.", "melanoma", False, False),
    ("No melanoma, BCC or SCC is seen.", "squamous cell carcinoma", False, False),
    ("Not melanoma, but a benign naevus.", "naevus", True, True),
    ("Not melanoma, a benign naevus.", "naevus", True, True),
    ("A naevus, not a melanoma.", "melanoma", False, False),
    ("No doubt this is psoriasis.", "psoriasis", True, True),
    ("Most likely eczema, psoriasis is unlikely.", "psoriasis", False, False),
    ("Most likely eczema, psoriasis is unlikely.", "eczema", True, True),
    # differentials: coverage but not accuracy
    ("Differential: melanoma, BCC, SCC, naevus, SK or DF.", "melanoma", False, True),
    ("The differential includes melanoma, basal cell carcinoma and seborrhoeic keratosis.", "basal cell carcinoma", False, True),
    ("Could be melanoma, BCC, SCC, a naevus or a dermatofibroma.", "dermatofibroma", False, True),
    ("Most likely a seborrhoeic keratosis; melanoma cannot be excluded.", "melanoma", False, True),
    ("Most likely a seborrhoeic keratosis; melanoma cannot be excluded.", "seborrheic keratosis", True, True),
    ("Consider tinea corporis; psoriasis is the most likely diagnosis.", "psoriasis", True, True),
    ("Consider tinea corporis; psoriasis is the most likely diagnosis.", "tinea corporis", False, True),
    ("Most likely psoriasis or eczema.", "psoriasis", False, True),
    ("Psoriasis vs eczema.", "eczema", False, True),
    ("Biopsy to exclude melanoma.", "melanoma", False, True),
    # a cue opening a that-clause governs the assertion inside it
    ("It can't be ruled out that this is melanoma.", "melanoma", False, True),
    ("We cannot rule out that this is a melanoma; most likely a seborrhoeic keratosis.", "seborrhoeic keratosis", True, True),
    ("It is not excluded that this is melanoma.", "melanoma", False, True),
    ("I doubt that this is melanoma.", "melanoma", False, False),
    ("It is possible that this is impetigo.", "impetigo", True, True),
    ("It is clear that this is psoriasis.", "psoriasis", True, True),
    ("Psoriasis. Seborrhoeic dermatitis is less likely.", "seborrhoeic dermatitis", False, True),
    ("Most likely prurigo nodularis. Psoriasis is less likely.", "psoriasis", False, True),  # primary outside the vocabulary
    # hedges
    ("Possibly impetigo; swab to confirm.", "impetigo", True, True),
    ("Could be eczema.", "eczema", True, True),
    ("Suspicious for melanoma; refer.", "melanoma", True, True),
    # synonyms, abbreviations, spellings, plurals, subtypes
    ("This is a BCC.", "basal cell carcinoma", True, True),
    ("A rodent ulcer on the nose.", "basal cell carcinoma", True, True),
    ("Likely an AK.", "actinic keratosis", True, True),
    ("Multiple seborrheic keratoses on the back.", "seborrhoeic keratosis", True, True),
    ("A benign nevus.", "melanocytic naevus", True, True),
    ("A hemangioma.", "haemangioma", True, True),
    ("Cherry-haemangioma.", "cherry angioma", True, True),
    ("Nodular melanoma.", "melanoma", True, True),
    ("Melanoma.", "nodular melanoma", False, False),  # the broader name does not answer a subtype label
    ("Erysipelas of the lower leg.", "cellulitis", True, True),
    ("A blue naevus.", "melanocytic naevus", False, False),  # kept apart on purpose (see the vocabulary)
    ("Bowen's disease (SCC in situ).", "bowen’s disease", True, True),
    ("Most likely a benign naevus.", "nv", True, True),  # HAM10000 code as the label
    ("Most likely an oak leaf.", "actinic keratosis", False, False),  # abbreviations are case-sensitive words
    ("A melanomatous change?", "melanoma", False, False),
    ("Non-melanoma skin cancer.", "melanoma", False, False),
    ("Looks like eczema.", "psoriasis", False, False),
    ("", "melanoma", False, False),
]


@pytest.fixture(scope="module")
def matcher():
    return Matcher.default()


@pytest.mark.parametrize("answer,label,primary,covered", TABLE, ids=[f"{i}:{a[:40]}->{lab}" for i, (a, lab, _, _) in enumerate(TABLE)])
def test_table(matcher, answer, label, primary, covered):
    m = matcher.with_synonyms(labels=[label])
    assert m.primary_hit(answer, label) is primary, m.read(answer)
    assert m.coverage_hit(answer, label) is covered, m.read(answer)


def test_table_is_large_and_balanced():
    assert len(TABLE) >= 40
    assert sum(p for _, _, p, _ in TABLE) >= 15 and sum(not p for _, _, p, _ in TABLE) >= 15
    assert sum(c and not p for _, _, p, c in TABLE) >= 8  # differentials: covered, not primary


def test_reading_names_primary_candidates_and_denials(matcher):
    r = matcher.read("Melanoma has been ruled out; most likely a seborrhoeic keratosis, BCC less likely.")
    assert r.primary == "seborrhoeic keratosis"
    assert r.candidates == ("seborrhoeic keratosis", "basal cell carcinoma") and r.negated == ("melanoma",)
    assert [m.status for m in r.mentions] == ["negated", "asserted", "alternative"]
    hedged = matcher.read("Most likely psoriasis or eczema.")
    assert hedged.primary is None and hedged.uncommitted


def test_every_phantom_diagnosis_answer_matches_its_class_only():
    syn = phantoms.synonyms()
    labels = [c.name for c in phantoms.CLASSES]
    m = Matcher.default().with_synonyms(syn, labels=labels)
    for ph in phantoms.generate(12, seed=0, split="heldout", size=32):
        answer = ph.qa(["diagnosis"])[0][2]
        assert [lab for lab in labels if m.primary_hit(answer, lab)] == [ph.label], answer
    for c in phantoms.CLASSES:  # every synonym of a class is read as that class
        for name in c.synonyms:
            assert m.primary_hit(f"Most likely {name}.", c.name), name


def test_synthetic_templates_are_read_as_their_label(matcher):
    for template in _DIAG:
        assert matcher.primary_hit(template.format(label="impetigo", where=" on the face"), "impetigo"), template
    for template in _DIFF:  # the synthetic differential answers name the label as the leading diagnosis
        answer = template.format(label="impetigo", others="folliculitis, ecthyma and cellulitis")
        assert matcher.primary_hit(answer, "impetigo"), answer
        assert matcher.coverage_hit(answer, "cellulitis") and not matcher.primary_hit(answer, "cellulitis"), answer


def test_unknown_label_is_matched_literally_and_synonyms_join_concepts():
    m = Matcher.default().with_synonyms({"angry lesion": ["furious plaque"]}, labels=["angry lesion"])
    assert m.primary_hit("Most likely a furious plaque.", "angry lesion")
    assert not m.primary_hit("Not an angry lesion.", "angry lesion")
    joined = Matcher.default().with_synonyms({"psoriasis": ["silvery plaque disease"]})
    assert joined.concept_of("silvery plaque disease") == "psoriasis"


def test_vocabulary_errors_are_one_line(tmp_path: Path):
    dup = tmp_path / "v.yaml"
    dup.write_text("concepts:\n  melanoma: {synonyms: [mole]}\n  naevus: {synonyms: [mole]}\n", encoding="utf-8")
    with pytest.raises(MetricError, match="belongs to both"):
        Matcher.from_files(vocabulary=dup)
    orphan = tmp_path / "o.yaml"
    orphan.write_text("concepts:\n  nodular melanoma: {parent: melanoma}\n", encoding="utf-8")
    with pytest.raises(MetricError, match="not concepts"):
        Matcher.from_files(vocabulary=orphan)
    cues = tmp_path / "c.yaml"
    cues.write_text("negated:\n  forward: [no]\n", encoding="utf-8")  # YAML reads a bare no as False
    with pytest.raises(MetricError, match="not a phrase"):
        Matcher.from_files(cues=cues)


def test_metric_reports_accuracy_and_coverage():
    m = metrics.load("diagnosis")
    preds = ["Most likely melanoma.", "This is not melanoma.", "Differential: melanoma, naevus, SK.", "Melanoma is unlikely; a naevus.", "x"]
    got = m.compute(predictions=preds, references=["melanoma"] * 4 + [""])
    assert got["per_example"] == [True, False, False, False, None]
    assert got["per_example_coverage"] == [True, False, True, False, None]
    assert got["diagnosis_accuracy"] == pytest.approx(1 / 4) and got["differential_coverage"] == pytest.approx(2 / 4) and got["n"] == 4
    bare = m.compute(predictions=["A BCC."], references=["basal cell carcinoma"], use_builtin=False)
    assert bare["diagnosis_accuracy"] == 0.0  # without the vocabulary the abbreviation is unknown
    out = metrics.compute_all(["Shotgun: melanoma, BCC, SCC, naevus, SK or DF."], [["Most likely melanoma."]], labels=["melanoma"],
                              metrics=["diagnosis"])
    assert out["diagnosis"]["diagnosis_accuracy"] == 0.0 and out["diagnosis"]["differential_coverage"] == 1.0
