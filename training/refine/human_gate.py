"""`--human-gate N`: after the metric gate passes, experts compare the candidate and the active version blind.

    python -m training.refine --human-gate 20          # queue 20 held-out cases; the version waits as a candidate
    python -m training.refine                          # a later run (cron, --every) settles it first

`queue` puts N held-out cases (expert cases first, then a seeded sample) into the
store's pairwise queue (annotation_db.pairwise), with both versions' answers from the
gate's own evaluation; the candidate is registered as `candidate`, neither promoted
nor rejected. Experts judge them in Review -> Compare two answers. `settle` runs at the
start of every refine (under the refine lock): once every queued case has a judgement,
the candidate is promoted when the lower bound of its win rate's Wilson interval
(ties left out) is at least `margin`, otherwise rejected with the numbers; a candidate
whose active version changed meanwhile is rejected as stale.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence


def batch_name(run_id: str) -> str:
    return f"refine-{run_id}"


def queue(s: Any, *, candidate_id: int, active_id: int, heldout: Sequence[Any], rep_candidate: Any, rep_active: Any,
          n: int, batch: str, images_dir: Path, seed: int = 0) -> int:
    """Queue up to `n` held-out cases for blind comparison; returns how many are queued."""
    from annotation_db import pairwise as pw
    from core.images import intake

    answers_c = {r["id"]: r["prediction"] for r in rep_candidate.per_example}
    answers_a = {r["id"]: r["prediction"] for r in rep_active.per_example}
    gold = [ex for ex in heldout if ex.id.startswith("turn-")]  # what experts asked about comes first
    rest = [ex for ex in heldout if not ex.id.startswith("turn-")]
    random.Random(seed).shuffle(rest)
    cases = []
    for ex in (gold + rest)[:n]:
        # Gold images already lie in the store under their hash; others are stored so the app can show them.
        hashes = [Path(p).stem if ex.id.startswith("turn-") else intake(p, images_dir).sha256 for p in ex.images]
        cases.append(pw.CaseIn(question=ex.question, candidate_answer=answers_c[ex.id], active_answer=answers_a[ex.id],
                               image_hashes=hashes, context=ex.context, template=ex.template or "free",
                               turn_id=int(ex.id[5:]) if ex.id.startswith("turn-") else None, key=ex.id))
    return len(pw.add_pairwise_cases(s, cases, candidate=candidate_id, active=active_id, batch=batch).case_ids)


def settle(s: Any, *, margin: float) -> list[str]:
    """Promote or reject every candidate whose blind comparisons are all judged; one line per waiting version."""
    from annotation_db import pairwise as pw
    from annotation_db import store as st
    from training.eval.stats import win_rate

    lines = []
    for v in st.list_versions(s):
        gate = (v.metrics or {}).get("human_gate")
        if v.status.value != "candidate" or not gate:
            continue
        summary = pw.pairwise_summary(s, batch=gate["batch"])
        x = summary[0] if summary else None
        if x is None or x.judged_cases < x.cases:
            lines.append(f"refine: {v.name} waits for the experts: {x.judged_cases if x else 0} of "
                         f"{x.cases if x else gate['n']} blind comparisons judged (Review -> Compare two answers)")
            continue
        wr = win_rate(x.wins, x.losses, x.ties)
        active = st.active_version(s)
        if active is None or active.id != gate["active_id"]:
            st.reject(s, v.id, f"rejected: the active version changed while the experts compared; {wr.summary()}")
            lines.append(f"refine: {v.name} rejected (stale: the active version changed)")
        elif wr.ci_low is not None and wr.ci_low >= margin:
            st.promote(s, v.id, reason=f"passed the gate and the experts' blind review: {wr.summary()}")
            lines.append(f"refine: {v.name} promoted by the experts: {wr.summary()}")
        else:
            st.reject(s, v.id, f"rejected by the experts' blind review: {wr.summary()}")
            lines.append(f"refine: {v.name} rejected by the experts: {wr.summary()}")
    return lines
