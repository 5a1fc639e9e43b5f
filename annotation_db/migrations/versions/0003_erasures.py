"""erasures: a conversation's content removed on request, with a tombstone

Why: a patient may withdraw consent, or a wrong image may be uploaded; ratings are
otherwise append-only, so an erasure is the one sanctioned removal of content. The
rows stay (ids, scores, lineage: counts still add up) while their text and image
links go; `conversations.erased_at` lets every read skip them cheaply, and the
`erasures` tombstone records who, when, why, what was removed and which model
versions learned from it (so the admin knows what to retrain).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "erasures",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("conversation_id", sa.Integer(), nullable=False),
        sa.Column("erased_by_id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("turn_ids", sa.JSON(), nullable=False),
        sa.Column("rating_ids", sa.JSON(), nullable=False),
        sa.Column("images_unlinked", sa.Integer(), nullable=False),
        sa.Column("images_deleted", sa.Integer(), nullable=False),
        sa.Column("trained_versions", sa.JSON(), nullable=False),
        sa.Column("training_runs", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("(CURRENT_TIMESTAMP)"),
                  nullable=False),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"],
                                name=op.f("fk_erasures_conversation_id_conversations"), ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["erased_by_id"], ["users.id"], name=op.f("fk_erasures_erased_by_id_users"),
                                ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_erasures")),
        sa.UniqueConstraint("conversation_id", name=op.f("uq_erasures_conversation_id")),
    )
    with op.batch_alter_table("erasures", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_erasures_erased_by_id"), ["erased_by_id"], unique=False)


def downgrade() -> None:
    # Refuse rather than let erased conversations look like live ones (empty turns in queues and exports).
    n = op.get_bind().execute(sa.text("SELECT count(*) FROM erasures")).scalar()
    if n:
        raise RuntimeError(f"cannot downgrade below 0003: {n} erased conversation(s) would look like live ones")
    with op.batch_alter_table("erasures", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_erasures_erased_by_id"))
    op.drop_table("erasures")
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_column("erased_at")
