"""regenerated answers: a new turn that names the answer it regenerates

Why: a clinician may ask for the latest answer again (the chat's Regenerate). Turns and
their ratings are append-only, so the new answer is a new row and the old one stays as
it was; `turns.regenerates_id` links the two, so the conversation's history (what the
model sees in a follow-up, what a reviewer reads) leaves the regenerated answer out.
Unique: an answer is regenerated at most once (a chain, never two live answers).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.add_column(sa.Column("regenerates_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(batch_op.f("fk_turns_regenerates_id_turns"), "turns", ["regenerates_id"], ["id"],
                                    ondelete="RESTRICT")
        batch_op.create_unique_constraint(batch_op.f("uq_turns_regenerates_id"), ["regenerates_id"])


def downgrade() -> None:
    # Refuse rather than let a regenerated answer and its successor both look like live turns.
    n = op.get_bind().execute(sa.text("SELECT count(*) FROM turns WHERE regenerates_id IS NOT NULL")).scalar()
    if n:
        raise RuntimeError(f"cannot downgrade below 0005: {n} regenerated answer(s) would both look live")
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_turns_regenerates_id"), type_="unique")
        batch_op.drop_constraint(batch_op.f("fk_turns_regenerates_id_turns"), type_="foreignkey")
        batch_op.drop_column("regenerates_id")
