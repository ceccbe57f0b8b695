"""The schema of gateway 0.1.0 (commit befade0), which made it with ``create_all``.

Databases made by 0.1.0 carry no revision: they are stamped here, not created (:mod:`gateway.store.migrations`).

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None

_UID = sa.String(64)


def upgrade() -> None:
    _studies()
    _models()
    _removed_models()
    _series()
    _series_revisions()
    _instances()
    _jobs()
    _deliveries()


def downgrade() -> None:
    for table in ("deliveries", "jobs", "instances", "series_revisions", "series", "removed_models", "models"):
        op.drop_table(table)
    op.drop_table("studies")


def _indexes(table: str, *columns: str) -> None:
    for column in columns:
        op.create_index(f"ix_{table}_{column}", table, [column])


def _studies() -> None:
    op.create_table(
        "studies",
        sa.Column("study_instance_uid", _UID, primary_key=True),
        sa.Column("patient_id", sa.String(64)),
        sa.Column("patient_name", sa.String(324)),
        sa.Column("patient_birth_date", sa.String(8)),
        sa.Column("patient_sex", sa.String(16)),
        sa.Column("study_date", sa.String(8)),
        sa.Column("study_time", sa.String(16)),
        sa.Column("accession_number", sa.String(64)),
        sa.Column("study_id", sa.String(16)),
        sa.Column("study_description", sa.String(64)),
        sa.Column("referring_physician_name", sa.String(324)),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    _indexes("studies", "patient_name", "study_date", "accession_number")


def _models() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("pinned", sa.Boolean(), nullable=False),
        sa.Column("registered_at", sa.Float(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("dry_run", sa.JSON(), nullable=False),
        sa.UniqueConstraint("name", "version"),
    )
    _indexes("models", "name", "active")


def _removed_models() -> None:
    op.create_table(
        "removed_models",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(32), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("removed_at", sa.Float(), nullable=False),
    )


def _series() -> None:
    op.create_table(
        "series",
        sa.Column("series_instance_uid", _UID, primary_key=True),
        sa.Column("study_instance_uid", _UID, sa.ForeignKey("studies.study_instance_uid"), nullable=False),
        sa.Column("modality", sa.String(16)),
        sa.Column("series_number", sa.Integer()),
        sa.Column("series_description", sa.String(64)),
        sa.Column("body_part_examined", sa.String(16)),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    _indexes("series", "study_instance_uid", "modality")


def _series_revisions() -> None:
    op.create_table(
        "series_revisions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("series_instance_uid", _UID, sa.ForeignKey("series.series_instance_uid"), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("first_received_at", sa.Float(), nullable=False),
        sa.Column("last_received_at", sa.Float(), nullable=False),
        sa.Column("completed_at", sa.Float()),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.UniqueConstraint("series_instance_uid", "revision"),
    )
    _indexes("series_revisions", "series_instance_uid", "state", "last_received_at")


def _instances() -> None:
    op.create_table(
        "instances",
        sa.Column("sop_instance_uid", _UID, primary_key=True),
        sa.Column("series_instance_uid", _UID, sa.ForeignKey("series.series_instance_uid"), nullable=False),
        sa.Column("study_instance_uid", _UID, sa.ForeignKey("studies.study_instance_uid"), nullable=False),
        sa.Column("revision_id", sa.Integer(), sa.ForeignKey("series_revisions.id"), nullable=False),
        sa.Column("sop_class_uid", _UID, nullable=False),
        sa.Column("transfer_syntax_uid", _UID, nullable=False),
        sa.Column("instance_number", sa.Integer()),
        sa.Column("rows", sa.Integer()),
        sa.Column("columns", sa.Integer()),
        sa.Column("number_of_frames", sa.Integer()),
        sa.Column("path", sa.String(255), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
    )
    _indexes("instances", "series_instance_uid", "study_instance_uid", "revision_id")


def _jobs() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("revision_id", sa.Integer(), sa.ForeignKey("series_revisions.id"), nullable=False),
        sa.Column("study_instance_uid", _UID, nullable=False),
        sa.Column("series_instance_uid", _UID, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.UniqueConstraint("revision_id"),
    )
    _indexes("jobs", "study_instance_uid", "series_instance_uid", "state")


def _deliveries() -> None:
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("sop_class_uid", _UID, nullable=False),
        sa.Column("sop_instance_uid", _UID, nullable=False),
        sa.Column("transfer_syntax_uid", _UID, nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.Float(), nullable=False),
        sa.Column("claim", sa.String(32)),
        sa.Column("last_status", sa.Integer()),
        sa.Column("last_error", sa.String(1024)),
        sa.Column("history", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("delivered_at", sa.Float()),
        sa.UniqueConstraint("job_id", "sop_instance_uid", "destination"),
    )
    _indexes("deliveries", "job_id", "destination", "claim")
    op.create_index("ix_deliveries_due", "deliveries", ["state", "next_attempt_at"])
