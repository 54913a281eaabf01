"""Innovation days: gatherings, registrations, proposed meetings.

Revision ID: 0004
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0001"
branch_labels = ("innovation_days",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "innovation_days",
        sa.Column("day_id", sa.String(length=128), primary_key=True),
        sa.Column("organizer", sa.String(length=63), nullable=False),
        sa.Column("title", sa.JSON(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.Column("format", sa.String(length=32), nullable=False),
        sa.Column("starts_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ends_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attendance_mode", sa.String(length=16), nullable=False),
        sa.Column("venue", sa.JSON(), nullable=True),
        sa.Column("online_url", sa.String(length=2048), nullable=True),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("registration_deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("themes", sa.JSON(), nullable=False),
        sa.Column("languages", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("cancelled_reason", sa.JSON(), nullable=True),
        sa.Column("held_attendees", sa.Integer(), nullable=True),
        sa.Column("held_summary", sa.JSON(), nullable=True),
        sa.Column("meetings_proposed_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_innovation_days_organizer", "innovation_days", ["organizer"])
    op.create_index("ix_innovation_days_status", "innovation_days", ["status"])

    op.create_table(
        "innovation_day_registrations",
        sa.Column("registration_id", sa.String(length=128), primary_key=True),
        sa.Column("day_id", sa.String(length=128), nullable=False),
        sa.Column("participant", sa.String(length=63), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=True),
        sa.Column("attendees", sa.Integer(), nullable=True),
        sa.Column("project_id", sa.String(length=128), nullable=True),
        sa.Column("interests", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("waitlist_position", sa.Integer(), nullable=True),
        sa.Column("reason", sa.JSON(), nullable=True),
        sa.Column("requested_seq", sa.Integer(), nullable=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_innovation_day_registrations_day_id", "innovation_day_registrations", ["day_id"])
    op.create_index("ix_innovation_day_registrations_requested_seq", "innovation_day_registrations", ["requested_seq"])

    op.create_table(
        "innovation_day_meetings",
        sa.Column("day_id", sa.String(length=128), primary_key=True),
        sa.Column("slot_start", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("funder", sa.String(length=63), primary_key=True),
        sa.Column("innovator", sa.String(length=63), nullable=False),
        sa.Column("project_id", sa.String(length=128), nullable=True),
        sa.Column("shared_themes", sa.JSON(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("innovation_day_meetings")
    op.drop_index("ix_innovation_day_registrations_requested_seq", table_name="innovation_day_registrations")
    op.drop_index("ix_innovation_day_registrations_day_id", table_name="innovation_day_registrations")
    op.drop_table("innovation_day_registrations")
    op.drop_index("ix_innovation_days_status", table_name="innovation_days")
    op.drop_index("ix_innovation_days_organizer", table_name="innovation_days")
    op.drop_table("innovation_days")
