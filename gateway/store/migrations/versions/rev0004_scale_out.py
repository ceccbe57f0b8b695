"""Issue 13: several processes on one index. Delivery claims name their process and expire; every job lease is
recorded (``job_claims``); the processes sharing the index report themselves (``workers``).

Revision ID: 0004
Revises: 0003
Create Date: 2025-01-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as deliveries:
        deliveries.add_column(sa.Column("claim_owner", sa.String(64)))
        deliveries.add_column(sa.Column("claim_expires_at", sa.Float()))
        deliveries.create_index("ix_deliveries_claim_owner", ["claim_owner"])
    op.create_table(
        "job_claims",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("claimed_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float()),
        sa.Column("outcome", sa.String(64)),
    )
    op.create_index("ix_job_claims_job_id", "job_claims", ["job_id"])
    op.create_index("ix_job_claims_owner", "job_claims", ["owner"])
    op.create_table(
        "workers",
        sa.Column("owner", sa.String(64), primary_key=True),
        sa.Column("host", sa.String(64), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("roles", sa.String(64), nullable=False),
        sa.Column("device", sa.String(32)),
        sa.Column("models", sa.JSON()),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.Column("stopped_at", sa.Float()),
    )
    op.create_index("ix_workers_heartbeat_at", "workers", ["heartbeat_at"])


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_table("job_claims")
    with op.batch_alter_table("deliveries") as deliveries:
        deliveries.drop_index("ix_deliveries_claim_owner")
        deliveries.drop_column("claim_expires_at")
        deliveries.drop_column("claim_owner")
