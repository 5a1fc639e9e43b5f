"""thumbs ratings, review-queue counter, refine lock

Why: (1) non-experts asked for a quick thumbs up/down, which must not count as an
expert review, so ratings get a `kind` (every existing row is a full review);
(2) the review queue had to scan every turn's ratings: `turns.expert_raters`
(distinct experts with a full rating, backfilled here, kept by `add_rating`)
plus an index makes it an index scan at 100 000 turns; (3) two refine jobs on the
same store must not train at once: a `locks` table holds the refine lock with the
holder's pid and host so a dead holder's lock can be cleared.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ratings", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=8), server_default="full", nullable=False)
        )
        batch_op.create_check_constraint(op.f("ck_ratings_kind"), "kind IN ('full', 'thumbs')")

    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("expert_raters", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch_op.create_index("ix_turns_queue", ["expert_raters", "id"], unique=False)
    op.execute(
        "UPDATE turns SET expert_raters = ("
        " SELECT count(DISTINCT r.rater_id) FROM ratings r JOIN users u ON u.id = r.rater_id"
        " WHERE r.turn_id = turns.id AND r.kind = 'full' AND u.role = 'expert')"
    )

    op.create_table(
        "locks",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_locks")),
    )


def downgrade() -> None:
    # Refuse rather than turn quick thumbs into what would look like expert reviews.
    n = op.get_bind().execute(sa.text("SELECT count(*) FROM ratings WHERE kind = 'thumbs'")).scalar()
    if n:
        raise RuntimeError(
            f"cannot downgrade below 0002: {n} thumbs ratings would become expert reviews"
        )
    op.drop_table("locks")
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.drop_index("ix_turns_queue")
        batch_op.drop_column("expert_raters")
    with op.batch_alter_table("ratings", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_ratings_kind"), type_="check")
        batch_op.drop_column("kind")
