"""Validations: requests, reviewers, reviews, information requests.

Revision ID: 0003
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0001"
branch_labels = ("validations",)
depends_on = None


def _when(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "validations",
        sa.Column("validation_id", sa.String(length=128), primary_key=True),
        sa.Column("requester", sa.String(length=63), nullable=False),
        sa.Column("coordinator", sa.String(length=63), nullable=False),
        sa.Column("project_id", sa.String(length=128), nullable=True),
        sa.Column("external_ref", sa.JSON(), nullable=True),
        sa.Column("self_assessment", sa.JSON(), nullable=False),
        sa.Column("quorum", sa.Integer(), nullable=False),
        _when("due_by"),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("evidence_level", sa.Integer(), nullable=True),
        sa.Column("median_scores", sa.JSON(), nullable=True),
        sa.Column("decided_by", sa.String(length=16), nullable=True),
        _when("decided_at"),
        sa.Column("withdrawn_reason", sa.JSON(), nullable=True),
        _when("withdrawn_at"),
        _when("requested_at", nullable=False),
    )
    for column in ("requester", "coordinator", "project_id", "status"):
        op.create_index(f"ix_validations_{column}", "validations", [column])
    op.create_table(
        "validation_reviewers",
        sa.Column("validation_id", sa.String(length=128), primary_key=True),
        sa.Column("reviewer", sa.String(length=63), primary_key=True),
        _when("due_by"),
        _when("assigned_at", nullable=False),
    )
    op.create_table(
        "validation_reviews",
        sa.Column("validation_id", sa.String(length=128), primary_key=True),
        sa.Column("reviewer", sa.String(length=63), primary_key=True),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("evidence_level", sa.Integer(), nullable=False),
        sa.Column("recommendation", sa.String(length=16), nullable=False),
        sa.Column("comments", sa.JSON(), nullable=True),
        _when("submitted_at", nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
    )
    op.create_table(
        "validation_info_requests",
        sa.Column("id", sa.String(length=128), primary_key=True),
        sa.Column("validation_id", sa.String(length=128), nullable=False),
        sa.Column("asked_by", sa.String(length=63), nullable=False),
        sa.Column("questions", sa.JSON(), nullable=False),
        _when("asked_at", nullable=False),
        sa.Column("answers", sa.JSON(), nullable=False),
        _when("answered_at"),
    )
    op.create_index("ix_validation_info_requests_validation_id", "validation_info_requests", ["validation_id"])


def downgrade() -> None:
    op.drop_index("ix_validation_info_requests_validation_id", table_name="validation_info_requests")
    op.drop_table("validation_info_requests")
    op.drop_table("validation_reviews")
    op.drop_table("validation_reviewers")
    for column in ("requester", "coordinator", "project_id", "status"):
        op.drop_index(f"ix_validations_{column}", table_name="validations")
    op.drop_table("validations")
