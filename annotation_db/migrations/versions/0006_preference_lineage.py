"""training lineage of blind pairwise preferences

Why: a DPO run learns from experts' blind A/B preferences as well as from ratings. When a
conversation is erased, the tombstone must name every model version that learned from it,
including through a preference on a pairwise case copied from it; `training_run_ratings`
cannot hold those, so `training_run_preferences` does, in the same shape.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "training_run_preferences",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("preference_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["preference_id"], ["pairwise_preferences.id"],
                                name=op.f("fk_training_run_preferences_preference_id_pairwise_preferences"), ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["run_id"], ["training_runs.id"],
                                name=op.f("fk_training_run_preferences_run_id_training_runs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "preference_id", name=op.f("pk_training_run_preferences")),
    )
    with op.batch_alter_table("training_run_preferences", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_training_run_preferences_preference_id"), ["preference_id"], unique=False)


def downgrade() -> None:
    # Refuse rather than forget which versions learned from experts' judgements (erasure relies on it).
    n = op.get_bind().execute(sa.text("SELECT count(*) FROM training_run_preferences")).scalar()
    if n:
        raise RuntimeError(f"cannot downgrade below 0006: the lineage of {n} trained preference(s) would be lost")
    with op.batch_alter_table("training_run_preferences", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_training_run_preferences_preference_id"))
    op.drop_table("training_run_preferences")
