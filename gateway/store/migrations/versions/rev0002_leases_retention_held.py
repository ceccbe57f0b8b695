"""Issue 10: job leases and attempts, finished and purged times, refused instances, models' change times.

``jobs.finished_at`` is filled from ``updated_at`` for jobs already final (``exported``, ``skipped``, ``failed``),
so that retention counts their age from the last time they moved.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None

#: The final job states of gateway 0.1.0, spelt out: a revision never imports the code it migrates.
_FINAL_STATES = ("exported", "skipped", "failed")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("lease_owner", sa.String(64)))
        jobs.add_column(sa.Column("lease_expires_at", sa.Float()))
        jobs.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        jobs.add_column(sa.Column("finished_at", sa.Float()))
        jobs.add_column(sa.Column("purged_at", sa.Float()))
        jobs.create_index("ix_jobs_lease_owner", ["lease_owner"])
        jobs.create_index("ix_jobs_finished_at", ["finished_at"])
    with op.batch_alter_table("series_revisions") as revisions:
        revisions.add_column(sa.Column("refused_count", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("models") as models:
        models.add_column(sa.Column("changed_at", sa.Float()))
    op.create_table(
        "refused_instances",
        sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
    )
    op.create_index("ix_refused_instances_series_instance_uid", "refused_instances", ["series_instance_uid"])
    job = sa.table("jobs", sa.column("state"), sa.column("updated_at"), sa.column("finished_at"))
    op.execute(
        job.update()
        .where(job.c.state.in_(_FINAL_STATES), job.c.finished_at.is_(None))
        .values(finished_at=job.c.updated_at)
    )


def downgrade() -> None:
    op.drop_table("refused_instances")
    with op.batch_alter_table("models") as models:
        models.drop_column("changed_at")
    with op.batch_alter_table("series_revisions") as revisions:
        revisions.drop_column("refused_count")
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_index("ix_jobs_finished_at")
        jobs.drop_index("ix_jobs_lease_owner")
        for column in ("purged_at", "finished_at", "attempts", "lease_expires_at", "lease_owner"):
            jobs.drop_column(column)
