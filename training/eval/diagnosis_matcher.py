"""Which diagnosis does an answer assert? Negation-aware, primary-diagnosis matching for dermatology answers.

    from training.eval.diagnosis_matcher import Matcher
    m = Matcher.default().with_synonyms({"cherry angioma": ["cherry haemangioma"]})
    m.primary_hit("Most likely a BCC; an SCC is less likely.", "basal cell carcinoma")   # True
    m.primary_hit("This is not melanoma.", "melanoma")                                  # False
    m.coverage_hit("Differential: melanoma, naevus or SK.", "melanoma")                # True
    m.read("Consider psoriasis; eczema is favoured.").primary                          # 'atopic dermatitis'

What a dermatologist would accept (issue 12): the answer's *primary* diagnosis must be
the label's concept or a narrower one (nodular melanoma counts for melanoma); a
diagnosis that is denied ("not melanoma", "melanoma has been ruled out", "no signs of
psoriasis", "unlikely to be", "rather than") is a miss; a differential that merely
lists the label among others is a miss for accuracy but counts for differential
coverage (the label named, not denied, anywhere in the answer).

How (a compact NegEx/pyConText): the text is cut into sentences; in each, diagnosis
mentions come from `dermatology_vocabulary.yaml` (names, synonyms, case-sensitive
abbreviations, British/American spellings, plurals) and cues from
`assertion_cues.yaml`. Mentions joined by list words ("A, B or C") form a chain that
shares its status. A chain's status comes from the nearest backward cue right after it
(it wins, as NegEx post-triggers do), else from the nearest forward cue before it; a
cue's scope ends at a sentence end, another cue, a `terminate` word or an unrelated
mention. The primary diagnosis is the first asserted chain, else the first chain
without a cue, else the first hedged one; a chain naming two or more different
diagnoses ("most likely psoriasis or eczema") has no primary: the answer did not commit.
A strong asserted cue ("most likely ...") that names no known diagnosis means the
primary is outside the vocabulary, so later alternatives are not promoted to primary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from training.errors import MetricError

HERE = Path(__file__).resolve().parent
VOCABULARY = HERE / "dermatology_vocabulary.yaml"
CUES = HERE / "assertion_cues.yaml"
STATUSES = ("negated", "asserted", "hedged", "alternative")  # a mention's status; None = stated without a cue
_ABBREV_DOTS = ("vs", "e.g", "i.e", "eg", "ie", "etc", "approx", "cf", "dr", "incl")  # a dot after these ends no sentence
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " ", "\u2010": "-", "\u2011": "-"})
_LINK = re.compile(r"^(?:[\s,/&-]|\b(?:and/or|and|or|vs\.?|versus|as well as|plus|either|a|an|the|even)\b)*$")
_THAT = re.compile(r"^\s*,?\s*(?:that|whether)\s*$", re.IGNORECASE)
_STRONG = re.compile(r"/|&|\b(?:and|or|vs|versus|as well as|plus)\b")
_L, _R = r"(?<![\w-])", r"(?![\w-])"


def normalise(name: str) -> str:
    """A name as looked up: lower case, curly quotes straightened, hyphens/underscores/spaces as one space."""
    return " ".join(re.sub(r"[-_\s]+", " ", name.translate(_QUOTES).lower()).split())


def _plurals(word: str) -> set[str]:
    out = {word}
    if word.endswith("us"):
        out.add(word[:-2] + "i")  # naevus -> naevi
    if word.endswith("is"):
        out.add(word[:-2] + "es")  # keratosis -> keratoses
    if word.endswith("oma"):
        out |= {word + "s", word + "ta"}  # angiomas, angiomata
    elif word.endswith(("s", "x", "ch", "sh")):
        out.add(word + "es")
    elif word[-1:].isalpha():
        out.add(word + "s")
    return out


def _surface_regex(surface: str) -> str:
    return r"[\s_-]+".join(re.escape(w) for w in surface.split(" "))


@dataclass(frozen=True)
class Cue:
    phrase: str
    category: str  # negated | asserted | hedged | alternative | pseudo | terminate
    forward: bool  # acts on the mentions after it
    backward: bool  # acts on the mentions just before it
    window: int | None = None  # acts only within this many words
    weak: bool = False  # an asserted cue that may point at a non-diagnosis


@dataclass(frozen=True)
class Mention:
    concept: str
    start: int
    end: int
    text: str
    status: str | None  # one of STATUSES, None = no cue
    chain: int = 0  # mentions joined by list words ("A, B or C") share a chain number


@dataclass(frozen=True)
class Reading:
    """What one answer says: its primary diagnosis, the diagnoses it offers and those it denies."""

    primary: str | None  # concept name; None = no committed diagnosis
    candidates: tuple[str, ...]  # every concept named and not denied, in order (differential coverage)
    negated: tuple[str, ...]
    mentions: tuple[Mention, ...]
    uncommitted: bool = False  # the first assertion named two or more diagnoses ("psoriasis or eczema")


@dataclass(frozen=True)
class _Event:
    start: int
    end: int
    cue: Cue | None = None
    concept: str | None = None


@dataclass
class Matcher:
    """A vocabulary (concepts, their names and parents) plus the cue lexicon; reads answers."""

    names: dict[str, str]  # normalised name -> concept (case-insensitive surfaces)
    abbreviations: dict[str, str]  # abbreviation as written -> concept (case-sensitive)
    parents: dict[str, str]  # concept -> broader concept
    spelling: tuple[tuple[str, str], ...]  # (british, american) word pairs
    cues: tuple[Cue, ...]
    codes: dict[str, str] = field(default_factory=dict)  # dataset label code (HAM10000 "nv", "mel") -> concept; labels only
    _compiled: dict = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- building
    @classmethod
    def default(cls) -> "Matcher":
        """The packaged vocabulary and cues (cached; `with_synonyms` returns a new matcher)."""
        return _default_matcher()

    @classmethod
    def from_files(cls, vocabulary: Path = VOCABULARY, cues: Path = CUES, use_concepts: bool = True) -> "Matcher":
        vocab, lexicon = _read_yaml(vocabulary), _read_yaml(cues)
        pairs = tuple((str(a), str(b)) for a, b in vocab.get("spelling_variants") or [])
        m = cls({}, {}, {}, pairs, _parse_cues(lexicon, cues), {})
        for name, spec in (vocab.get("concepts") or {}).items() if use_concepts else ():
            spec = spec or {}
            m._add(normalise(name), [name, *(spec.get("synonyms") or [])], spec.get("abbreviations") or [], where=vocabulary)
            m.codes.update({normalise(str(code)): normalise(name) for code in spec.get("codes") or []})
            if spec.get("parent"):
                m.parents[normalise(name)] = normalise(spec["parent"])
        unknown = sorted(p for p in m.parents.values() if p not in set(m.names.values()))
        if unknown:
            raise MetricError(f"{vocabulary}: parent(s) {', '.join(unknown)} are not concepts")
        return m

    def _variants(self, name: str) -> set[str]:
        out = {normalise(name)}
        for brit, amer in self.spelling:
            for form in list(out):
                words = form.split(" ")
                if brit in words or amer in words:
                    out.add(" ".join(amer if w == brit else w for w in words))
                    out.add(" ".join(brit if w == amer else w for w in words))
        return {" ".join([*v.split(" ")[:-1], last]) for v in out for last in _plurals(v.split(" ")[-1])}

    def _add(self, concept: str, names: Iterable[str], abbreviations: Iterable[str], where: object = "synonyms") -> None:
        for name in names:
            for surface in self._variants(str(name)):
                if self.names.get(surface, concept) != concept:
                    if where != "synonyms":
                        raise MetricError(f"{where}: the name {surface!r} belongs to both {self.names[surface]!r} and {concept!r}")
                    continue  # a caller's synonym already known as another concept keeps its concept
                self.names[surface] = concept
        for abbr in abbreviations:
            for form in (str(abbr), f"{abbr}s"):
                self.abbreviations.setdefault(form, concept)
        self._compiled.clear()

    def concept_of(self, label: str) -> str | None:
        """The concept a label names (a name, an abbreviation or a dataset code, any case), or None when unknown."""
        key = normalise(label)
        codes = {k.lower(): c for k, c in self.abbreviations.items()} | self.codes
        if key in codes:
            return codes[key]
        return next((self.names[v] for v in sorted(self._variants(label)) if v in self.names), None)

    def with_synonyms(self, synonyms: Mapping[str, Iterable[str]] | None = None, labels: Iterable[str] = ()) -> "Matcher":
        """A copy that also knows the caller's {label: [synonyms]} and any unknown labels (matched literally).

        A group whose label or synonym is already a concept joins that concept; otherwise it becomes a new one.
        """
        m = Matcher(dict(self.names), dict(self.abbreviations), dict(self.parents), self.spelling, self.cues, dict(self.codes))
        for key, syns in (synonyms or {}).items():
            group = [str(key), *(str(s) for s in syns or [])]
            concept = next((c for c in (m.concept_of(n) for n in group) if c), None) or normalise(str(key))
            m._add(concept, group, ())
        for label in labels:
            if label and label.strip() and m.concept_of(label) is None:
                m._add(normalise(label), [label], ())
        return m

    def ancestors(self, concept: str) -> list[str]:
        out, seen = [], {concept}
        while concept in self.parents and self.parents[concept] not in seen:
            concept = self.parents[concept]
            out.append(concept)
            seen.add(concept)
        return out

    def counts_for(self, concept: str | None, label_concept: str) -> bool:
        """Whether naming `concept` answers `label_concept` (the same, or a narrower one)."""
        return concept is not None and (concept == label_concept or label_concept in self.ancestors(concept))

    # ---------------------------------------------------------------- reading
    def _patterns(self) -> tuple[re.Pattern, re.Pattern | None, re.Pattern]:
        if not self._compiled:
            surfaces = sorted(self.names, key=len, reverse=True)
            names = re.compile(_L + "(?:" + "|".join(_surface_regex(s) for s in surfaces) + ")" + _R) if surfaces else None
            abbrs = sorted(self.abbreviations, key=len, reverse=True)
            abbr = re.compile(r"(?<![\w-])(?:" + "|".join(map(re.escape, abbrs)) + r")(?![\w-])") if abbrs else None
            cues = sorted({c.phrase for c in self.cues}, key=len, reverse=True)
            # a lookahead finds the longest cue at every position, overlapping ones included; _cues() keeps the longest
            cue = re.compile(r"(?<!\w)(?=(" + "|".join(_surface_regex(c) for c in cues) + r")(?!\w))")
            self._compiled.update(names=names, abbr=abbr, cue=cue, by_phrase={c.phrase: c for c in self.cues})
        return self._compiled["names"], self._compiled["abbr"], self._compiled["cue"]

    def read(self, answer: str) -> Reading:
        """Find every diagnosis in `answer`, its status, and the primary one."""
        text = (answer or "").translate(_QUOTES)
        low = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)  # same length as text: offsets agree
        names, abbr, cue_re = self._patterns()
        by_phrase = self._compiled["by_phrase"]
        mentions: list[Mention] = []
        dangling = False
        for s, e in _sentences(low):
            found = [_Event(m.start(), m.end(), concept=self.names[normalise(m.group())]) for m in (names.finditer(low, s, e) if names else ())]
            taken = [(f.start, f.end) for f in found]
            for m in abbr.finditer(text, s, e) if abbr else ():
                if not any(a < m.end() and m.start() < b for a, b in taken):
                    found.append(_Event(m.start(), m.end(), concept=self.abbreviations[m.group()]))
            cues = _longest_first([(m.start(1), m.end(1)) for m in cue_re.finditer(low, s, e)])
            cues = [_Event(a, b, cue=by_phrase[normalise(low[a:b])]) for a, b in cues if not any(f.start < b and a < f.end for f in found)]
            events = sorted(found + cues, key=lambda ev: ev.start)
            sentence_mentions, sentence_dangling = _statuses(events, text, first_chain=len({m.chain for m in mentions}))
            mentions += sentence_mentions
            dangling = dangling or sentence_dangling
        return self._decide(mentions, dangling)

    def _decide(self, mentions: list[Mention], dangling: bool) -> Reading:
        units: list[list[Mention]] = []  # runs of consecutive chained mentions sharing one status
        for m in mentions:
            prev = units[-1][-1] if units else None
            if prev is not None and prev.status == m.status and prev.chain == m.chain:
                units[-1].append(m)
            else:
                units.append([m])
        live = [u for u in units if u[0].status != "negated"]
        chosen = next((u for u in live if u[0].status == "asserted"), None)
        if chosen is None and not dangling:
            chosen = next((u for u in live if u[0].status is None), None) or next((u for u in live if u[0].status == "hedged"), None)
        primary, uncommitted = None, False
        if chosen is not None:
            concepts = self._collapse([m.concept for m in chosen])
            primary, uncommitted = (concepts[0], False) if len(concepts) == 1 else (None, True)
        candidates = tuple(dict.fromkeys(m.concept for u in live for m in u))
        negated = tuple(dict.fromkeys(m.concept for m in mentions if m.status == "negated"))
        return Reading(primary, candidates, negated, tuple(mentions), uncommitted)

    def _collapse(self, concepts: list[str]) -> list[str]:
        """Distinct concepts, dropping one that is a broader form of another ("melanoma (nodular melanoma)")."""
        distinct = list(dict.fromkeys(concepts))
        return [c for c in distinct if not any(c in self.ancestors(o) for o in distinct if o != c)]

    def primary_hit(self, answer: str, label: str) -> bool:
        """Is the label (or a narrower concept) the answer's primary diagnosis?"""
        label_concept = self.concept_of(label) or normalise(label)
        return self.counts_for(self.read(answer).primary, label_concept)

    def coverage_hit(self, answer: str, label: str) -> bool:
        """Is the label (or a narrower concept) named, and not denied, anywhere in the answer?"""
        label_concept = self.concept_of(label) or normalise(label)
        return any(self.counts_for(c, label_concept) for c in self.read(answer).candidates)


# -------------------------------------------------------------------- helpers
def _sentences(low: str) -> list[tuple[int, int]]:
    out, start = [], 0
    for m in re.finditer(r"[.!?;\n]", low):
        i = m.start()
        if m.group() == ".":
            before = re.search(r"([\w.]+)$", low[start:i])
            if (before and before.group(1).lower() in _ABBREV_DOTS) or (i + 1 < len(low) and low[i - 1:i].isdigit() and low[i + 1].isdigit()):
                continue
        out.append((start, i))
        start = i + 1
    out.append((start, len(low)))
    return [(s, e) for s, e in out if low[s:e].strip()]


def _statuses(events: list[_Event], text: str, first_chain: int = 0) -> tuple[list[Mention], bool]:
    """Statuses of one sentence's mentions, and whether a strong asserted cue named no diagnosis."""
    chains: list[list[tuple[int, bool]]] = []  # per chain: (event index, strongly linked to the previous mention)
    for i, ev in enumerate(events):
        if ev.concept is None:
            continue
        prev = i - 1
        if chains and prev >= 0 and events[prev].concept is not None and _LINK.match(text[events[prev].end:ev.start]):
            gap = text[events[prev].end:ev.start]
            strong = bool(_STRONG.search(gap.lower())) or events[prev].concept == ev.concept
            chains[-1].append((i, strong))
        else:
            chains.append([(i, True)])
    status: dict[int, str | None] = {}
    used_forward: set[int] = set()
    for chain in chains:
        first, last = chain[0][0], chain[-1][0]
        is_list = any(strong for _, strong in chain[1:])  # "A, B or C": every comma is a list comma
        fwd = _scan(events, text, first, step=-1)
        category = fwd.cue.category if fwd else None
        for n, (i, strong) in enumerate(chain):
            if n and category == "negated" and not (strong or is_list):
                category = None  # "not melanoma, a benign naevus": a denial does not cross a lone comma
            status[i] = category
        back = _scan(events, text, last, step=+1)
        if back:
            for i, strong in reversed(chain):  # a backward cue reaches the list, or the strongly linked tail
                status[i] = back.cue.category
                if not (strong or is_list):
                    break
        if fwd and fwd.cue.category == "asserted" and any(status[i] == "asserted" for i, _ in chain):
            used_forward.add(id(fwd))
    dangling = any(ev.cue is not None and ev.cue.category == "asserted" and ev.cue.forward and not ev.cue.weak
                   and not ev.cue.backward and id(ev) not in used_forward for ev in events)
    out = [Mention(events[i].concept, events[i].start, events[i].end, text[events[i].start:events[i].end], status[i], first_chain + n)
           for n, chain in enumerate(chains) for i, _ in chain]
    return out, dangling


def _longest_first(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Non-overlapping spans, longer ones first ("no features of" beats "there are no" + "features of")."""
    kept: list[tuple[int, int]] = []
    for a, b in sorted(spans, key=lambda x: (x[0] - x[1], x[0])):
        if not any(a < d and c < b for c, d in kept):
            kept.append((a, b))
    return sorted(kept)


def _scan(events: list[_Event], text: str, i: int, step: int) -> _Event | None:
    """The cue acting on mention `i` from before it (step -1: a forward cue) or after it (step +1: a backward cue)."""
    j = i + step
    while 0 <= j < len(events):
        ev = events[j]
        if ev.cue is None or ev.cue.category in ("pseudo", "terminate"):
            return None  # another mention, a pseudo-trigger or a conjunction ends the scope
        acts = ev.cue.forward if step < 0 else ev.cue.backward
        if not acts:
            return None  # a cue pointing the other way belongs to another clause
        if ev.cue.window is not None:
            between = text[ev.end:events[i].start] if step < 0 else text[events[i].end:ev.start]
            if len(between.split()) > ev.cue.window:
                return None
        if step < 0 and ev.cue.category == "asserted" and j > 0:
            outer = events[j - 1]
            # "cannot be ruled out that this is X", "I doubt that it is X": a cue that opens the
            # that-clause governs the assertion inside it, whichever way the cue points elsewhere
            if (outer.cue is not None and outer.cue.category in ("negated", "alternative", "hedged")
                    and _THAT.match(text[outer.end:ev.start])):
                return outer
        return ev
    return None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise MetricError(f"{path}: cannot be read as YAML ({e})") from None
    if not isinstance(data, dict):
        raise MetricError(f"{path}: expected a mapping at the top level")
    return data


def _parse_cues(lexicon: dict, where: Path) -> tuple[Cue, ...]:
    entries: dict[str, dict] = {}
    for category, spec in lexicon.items():
        if category in ("pseudo", "terminate"):
            spec = {"forward": spec}
        if category not in (*STATUSES, "pseudo", "terminate") or not isinstance(spec, dict):
            raise MetricError(f"{where}: unknown cue category {category!r}")
        for direction, items in spec.items():
            if direction not in ("forward", "backward", "both"):
                raise MetricError(f"{where}: {category}: unknown direction {direction!r}")
            for item in items or []:
                item = item if isinstance(item, dict) else {"phrase": item}
                if not isinstance(item.get("phrase"), str):
                    raise MetricError(f"{where}: {category}: {item.get('phrase')!r} is not a phrase (quote yes/no/on/off in YAML)")
                phrase = normalise(str(item["phrase"]))
                entry = entries.setdefault(phrase, {"category": category, "forward": False, "backward": False,
                                                    "window": item.get("window"), "weak": bool(item.get("weak"))})
                if entry["category"] != category:
                    raise MetricError(f"{where}: the cue {phrase!r} is both {entry['category']} and {category}")
                entry["forward"] |= direction in ("forward", "both")
                entry["backward"] |= direction in ("backward", "both")
    return tuple(Cue(p, **e) for p, e in entries.items())


@lru_cache(maxsize=1)
def _default_matcher() -> Matcher:
    return Matcher.from_files()
