"""pairwise review: cases both versions answered, and experts' blind preferences

Why: a metric gate cannot tell whether a clinician would prefer the candidate's
answers; blind pairwise review by experts can (issue 12). `pairwise_cases` keeps
what was asked (images by hash, question, context, template) and the two versions'
answers, grouped by `batch` (a refine run's human gate, an on-demand comparison),
unique per (batch, key) so queueing again adds nothing; `pairwise_preferences` is
append-only like `ratings` (the latest per case and rater counts), keeping the
order the rater saw, what they clicked and the winning version.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    op.create_table(
        "pairwise_cases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("batch", sa.String(length=100), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("turn_id", sa.Integer(), nullable=True),
        sa.Column("image_hashes", sa.JSON(), nullable=False),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("context", sa.JSON(), nullable=False),
        sa.Column("template", sa.String(length=200), nullable=False),
        sa.Column("candidate_version_id", sa.Integer(), nullable=False),
        sa.Column("active_version_id", sa.Integer(), nullable=False),
        sa.Column("candidate_answer", sa.Text(), nullable=False),
        sa.Column("active_answer", sa.Text(), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("(CURRENT_TIMESTAMP)"),
                  nullable=False),
        sa.CheckConstraint("candidate_version_id <> active_version_id", name=op.f("ck_pairwise_cases_two_versions")),
        sa.ForeignKeyConstraint(["active_version_id"], ["model_versions.id"],
                                name=op.f("fk_pairwise_cases_active_version_id_model_versions"), ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["candidate_version_id"], ["model_versions.id"],
                                name=op.f("fk_pairwise_cases_candidate_version_id_model_versions"), ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["turn_id"], ["turns.id"], name=op.f("fk_pairwise_cases_turn_id_turns"),
                                ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pairwise_cases")),
        sa.UniqueConstraint("batch", "key", name=op.f("uq_pairwise_cases_batch_key")),
    )
    with op.batch_alter_table("pairwise_cases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_pairwise_cases_active_version_id"), ["active_version_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_pairwise_cases_candidate_version_id"), ["candidate_version_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_pairwise_cases_turn_id"), ["turn_id"], unique=False)

    op.create_table(
        "pairwise_preferences",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=False),
        sa.Column("rater_id", sa.Integer(), nullable=False),
        sa.Column("shown_first", _enum("shown_first", "candidate", "active"), nullable=False),
        sa.Column("choice", _enum("choice", "a", "b", "tie"), nullable=False),
        sa.Column("winner", _enum("winner", "candidate", "active", "tie"), nullable=False),
        sa.Column("preferred_version_id", sa.Integer(), nullable=True),
        sa.Column("correction", sa.Text(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("(CURRENT_TIMESTAMP)"),
                  nullable=False),
        sa.ForeignKeyConstraint(["case_id"], ["pairwise_cases.id"],
                                name=op.f("fk_pairwise_preferences_case_id_pairwise_cases"), ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["preferred_version_id"], ["model_versions.id"],
                                name=op.f("fk_pairwise_preferences_preferred_version_id_model_versions"),
                                ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["rater_id"], ["users.id"], name=op.f("fk_pairwise_preferences_rater_id_users"),
                                ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pairwise_preferences")),
    )
    with op.batch_alter_table("pairwise_preferences", schema=None) as batch_op:
        batch_op.create_index("ix_pairwise_preferences_case_rater", ["case_id", "rater_id", "id"], unique=False)
        batch_op.create_index(batch_op.f("ix_pairwise_preferences_preferred_version_id"), ["preferred_version_id"],
                              unique=False)
        batch_op.create_index(batch_op.f("ix_pairwise_preferences_rater_id"), ["rater_id"], unique=False)


def downgrade() -> None:
    # Refuse rather than drop experts' judgements (append-only, like ratings); queued cases alone may go.
    n = op.get_bind().execute(sa.text("SELECT count(*) FROM pairwise_preferences")).scalar()
    if n:
        raise RuntimeError(f"cannot downgrade below 0004: {n} pairwise preference(s) by experts would be lost")
    with op.batch_alter_table("pairwise_preferences", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pairwise_preferences_rater_id"))
        batch_op.drop_index(batch_op.f("ix_pairwise_preferences_preferred_version_id"))
        batch_op.drop_index("ix_pairwise_preferences_case_rater")
    op.drop_table("pairwise_preferences")
    with op.batch_alter_table("pairwise_cases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pairwise_cases_turn_id"))
        batch_op.drop_index(batch_op.f("ix_pairwise_cases_candidate_version_id"))
        batch_op.drop_index(batch_op.f("ix_pairwise_cases_active_version_id"))
    op.drop_table("pairwise_cases")
