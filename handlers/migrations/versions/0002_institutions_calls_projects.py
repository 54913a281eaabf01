"""The network: institutions, calls and applications, projects with partners, adoptions, impact.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = ("network",)
depends_on = None


def _when(name: str, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _json(name: str, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.JSON(), nullable=nullable)


def _text(name: str, length: int, nullable: bool = False, primary_key: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.String(length=length), nullable=nullable, primary_key=primary_key)


def upgrade() -> None:
    op.create_table(
        "institutions",
        _text("id", 63, primary_key=True),
        _json("name"),
        _text("kind", 32),
        _text("country", 2),
        _text("region", 300, nullable=True),
        _text("municipality_level", 16, nullable=True),
        _json("themes"),
        _json("identifiers"),
        _text("website", 2048, nullable=True),
        _text("contact_email", 320, nullable=True),
        _when("joined_at"),
        _when("left_at", nullable=True),
    )

    op.create_table(
        "calls",
        _text("call_id", 128, primary_key=True),
        _text("owner", 63),
        _json("title"),
        _json("summary", nullable=True),
        _text("kind", 16),
        _json("themes"),
        _json("eligible_kinds"),
        _json("eligible_countries"),
        _json("budget", nullable=True),
        _when("opens_at"),
        _when("deadline"),
        _text("deadline_model", 16),
        _text("url", 2048, nullable=True),
        _when("published_at"),
        _when("closed_at", nullable=True),
        _text("closed_reason", 16, nullable=True),
    )
    op.create_index("ix_calls_owner", "calls", ["owner"])
    op.create_index("ix_calls_deadline", "calls", ["deadline"])

    op.create_table(
        "call_applications",
        _text("call_id", 128, primary_key=True),
        _text("application_id", 128, primary_key=True),
        _text("applicant", 63),
        _text("project_id", 128, nullable=True),
        _json("partners"),
        _json("requested_amount", nullable=True),
        _text("status", 16),
        _json("reason", nullable=True),
        _when("submitted_at"),
    )
    op.create_index("ix_call_applications_applicant", "call_applications", ["applicant"])

    op.create_table(
        "projects",
        _text("project_id", 128, primary_key=True),
        _text("owner", 63),
        _json("title"),
        _json("summary", nullable=True),
        _json("themes"),
        _text("status", 16),
        sa.Column("started_on", sa.Date(), nullable=True),
        sa.Column("ends_on", sa.Date(), nullable=True),
        _text("country", 2, nullable=True),
        _text("region", 300, nullable=True),
        _text("municipality", 300, nullable=True),
        _text("service_model", 32, nullable=True),
        _json("external_refs"),
        _json("sdgs"),
        _when("registered_at"),
        _when("updated_at"),
        _when("completed_at", nullable=True),
        _json("outcome", nullable=True),
    )
    op.create_index("ix_projects_owner", "projects", ["owner"])

    op.create_table(
        "project_partners",
        _text("project_id", 128, primary_key=True),
        _text("institution", 63, primary_key=True),
        _text("role", 16),
        _text("relation", 16, nullable=True),
    )
    op.create_index("ix_project_partners_institution", "project_partners", ["institution"])

    op.create_table(
        "project_adoptions",
        _text("adoption_id", 128, primary_key=True),
        _text("project_id", 128),
        _text("adopter", 63),
        _json("support"),
        _text("adapted_project_id", 128, nullable=True),
        _when("adopted_at"),
    )
    op.create_index("ix_project_adoptions_project_id", "project_adoptions", ["project_id"])
    op.create_index("ix_project_adoptions_adopter", "project_adoptions", ["adopter"])

    op.create_table(
        "project_impact_reports",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        _text("project_id", 128),
        sa.Column("period_start", sa.Date(), nullable=False),
        sa.Column("period_end", sa.Date(), nullable=False),
        _json("indicators"),
        _when("reported_at"),
    )
    op.create_index("ix_project_impact_reports_project_id", "project_impact_reports", ["project_id"])


def downgrade() -> None:
    for table, indexes in (
        ("project_impact_reports", ["ix_project_impact_reports_project_id"]),
        ("project_adoptions", ["ix_project_adoptions_adopter", "ix_project_adoptions_project_id"]),
        ("project_partners", ["ix_project_partners_institution"]),
        ("projects", ["ix_projects_owner"]),
        ("call_applications", ["ix_call_applications_applicant"]),
        ("calls", ["ix_calls_deadline", "ix_calls_owner"]),
        ("institutions", []),
    ):
        for index in indexes:
            op.drop_index(index, table_name=table)
        op.drop_table(table)
