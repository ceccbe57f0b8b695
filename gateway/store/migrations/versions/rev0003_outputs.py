"""Issue 11: the ``outputs`` table, the gateway's own DICOM objects, so that QIDO-RS and WADO-RS serve them.

Filled from the jobs' ``detail["outputs"]`` for the outputs written before this revision (unless retention purged
them): UIDs, SOP class, file and job as the detail records them, the study the job's, the modality the kind's,
the instance number the object's rank among its model's objects of that kind (as the encoders number them), the
transfer syntax the one a queued delivery of the file names or else Explicit VR Little Endian (what the encoders
wrote). What only the file holds (series number and description, rows, columns, frames, size) stays empty. A SOP
Instance UID that several jobs list (the same series processed again) belongs to the last of them.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None

_UID = sa.String(64)
_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
#: The Modality each kind of output was written with (gateway 0.1.0 to 0.2: spelt out, not imported).
_MODALITIES = {"SEG": "SEG", "SR": "SR", "GSPS": "PR", "KO": "KO", "SC": "OT", "PM": "OT"}


def upgrade() -> None:
    op.create_table(
        "outputs",
        sa.Column("sop_instance_uid", _UID, primary_key=True),
        sa.Column("series_instance_uid", _UID, nullable=False),
        sa.Column("study_instance_uid", _UID, nullable=False),
        sa.Column("sop_class_uid", _UID, nullable=False),
        sa.Column("transfer_syntax_uid", _UID, nullable=False),
        sa.Column("modality", sa.String(16)),
        sa.Column("series_number", sa.Integer()),
        sa.Column("series_description", sa.String(64)),
        sa.Column("instance_number", sa.Integer()),
        sa.Column("rows", sa.Integer()),
        sa.Column("columns", sa.Integer()),
        sa.Column("number_of_frames", sa.Integer()),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("size", sa.Integer()),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_outputs_series_instance_uid", "outputs", ["series_instance_uid"])
    op.create_index("ix_outputs_study_instance_uid", "outputs", ["study_instance_uid"])
    op.create_index("ix_outputs_job_id", "outputs", ["job_id"])
    rows = _backfill(op.get_bind())
    if rows:
        op.bulk_insert(_OUTPUTS, rows)


def downgrade() -> None:
    op.drop_table("outputs")


_JOBS = sa.table(
    "jobs",
    sa.column("id", sa.Integer()),
    sa.column("study_instance_uid", _UID),
    sa.column("updated_at", sa.Float()),
    sa.column("detail", sa.JSON()),
)
_DELIVERIES = sa.table("deliveries", sa.column("sop_instance_uid", _UID), sa.column("transfer_syntax_uid", _UID))
_OUTPUTS = sa.table(
    "outputs",
    *(
        sa.column(name, kind)
        for name, kind in (
            ("sop_instance_uid", _UID),
            ("series_instance_uid", _UID),
            ("study_instance_uid", _UID),
            ("sop_class_uid", _UID),
            ("transfer_syntax_uid", _UID),
            ("modality", sa.String(16)),
            ("instance_number", sa.Integer()),
            ("job_id", sa.Integer()),
            ("path", sa.String(1024)),
            ("created_at", sa.Float()),
        )
    ),
)


def _backfill(conn: sa.Connection) -> list[dict[str, Any]]:
    syntaxes = dict(conn.execute(sa.select(_DELIVERIES.c.sop_instance_uid, _DELIVERIES.c.transfer_syntax_uid)).all())
    rows: dict[str, dict[str, Any]] = {}
    jobs = conn.execute(
        sa.select(_JOBS.c.id, _JOBS.c.study_instance_uid, _JOBS.c.updated_at, _JOBS.c.detail).order_by(_JOBS.c.id)
    )
    for job_id, study, updated_at, detail in jobs:
        for row in _job_rows(job_id, study, updated_at, detail if isinstance(detail, dict) else {}):
            row["transfer_syntax_uid"] = syntaxes.get(row["sop_instance_uid"], _EXPLICIT_VR_LITTLE_ENDIAN)
            rows[row["sop_instance_uid"]] = row  # a later job's file replaces an earlier one's
    return list(rows.values())


def _job_rows(job_id: int, study: str, updated_at: float, detail: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    if (detail.get("retention") or {}).get("outputs_purged_at") is not None:
        return
    ranks: dict[tuple[str, str], int] = {}
    for output in detail.get("outputs") or ():
        if not isinstance(output, dict) or not all(
            isinstance(output.get(key), str) for key in ("SOPInstanceUID", "SeriesInstanceUID", "SOPClassUID", "file")
        ):
            continue
        kind = str(output.get("kind", ""))
        rank = ranks[str(output.get("model")), kind] = ranks.get((str(output.get("model")), kind), 0) + 1
        yield {
            "sop_instance_uid": output["SOPInstanceUID"],
            "series_instance_uid": output["SeriesInstanceUID"],
            "study_instance_uid": study,
            "sop_class_uid": output["SOPClassUID"],
            "modality": _MODALITIES.get(kind),
            "instance_number": rank,
            "job_id": job_id,
            "path": f"outputs/{output['file']}",
            "created_at": updated_at,
        }
