"""The gateway's own DICOM objects in the index (table ``outputs``): recorded, forgotten, searched and retrieved.

The encode stage records a job's objects when their files are durable (:func:`record_job_outputs`, an upsert: a
re-run of the job writes the same UIDs); retention forgets them with the job's output files
(:func:`forget_job_outputs`). QIDO-RS and WADO-RS serve them beside the received instances, so that a DICOMweb
viewer pointed at the gateway finds the SEG, SR, presentation state, KO and Parametric Maps of a study:

- :func:`search_output_series` and :func:`search_output_instances` match with the rules of
  :mod:`gateway.store.query` (C-FIND, PS3.4 C.2.2.2) and return the same :class:`~gateway.store.query.Match`
  values; :func:`count_output_series` and :func:`count_output_instances` count them, for paging;
- :func:`with_outputs` adds the outputs to the study-level attributes of any match (Number of Study Related
  Series and Instances, Modalities in Study, PS3.4 C.3.4);
- :func:`output_files` lists their files for WADO-RS.

Outputs are searched only in studies that still hold a received instance, as studies are
(:func:`gateway.store.query.search_studies`): an AI result without its images is nothing a viewer can show.
They never enter ``instances`` or ``series_revisions``: the completion monitor would make jobs of them.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, Select, delete, exists, false, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from gateway.errors import InvalidQuery
from gateway.store.index import Instance, Output, Series, Study
from gateway.store.query import (
    INSTANCE_COLUMNS,
    SERIES_COLUMNS,
    STUDY_COLUMNS,
    AttributeValue,
    InstanceFile,
    Match,
    paged,
    search_studies,
)
from gateway.store.query import column_condition as condition  # the C-FIND matching of one column (PS3.4 C.2.2.2)

__all__ = [
    "OutputRecord",
    "StudyOutputs",
    "count_output_instances",
    "count_output_series",
    "forget_job_outputs",
    "output_files",
    "record_job_outputs",
    "search_output_instances",
    "search_output_series",
    "studies_with_modalities",
    "study_outputs",
    "with_outputs",
]

_MODALITIES_IN_STUDY = "ModalitiesInStudy"
_SERIES_OUTPUT_COLUMNS: Mapping[str, InstrumentedAttribute[Any] | None] = {
    "SeriesInstanceUID": Output.series_instance_uid,
    "Modality": Output.modality,
    "SeriesNumber": Output.series_number,
    "SeriesDescription": Output.series_description,
    "BodyPartExamined": None,  # not recorded: a condition on it matches no output
}
_INSTANCE_OUTPUT_COLUMNS: Mapping[str, InstrumentedAttribute[Any] | None] = {
    "SOPInstanceUID": Output.sop_instance_uid,
    "SOPClassUID": Output.sop_class_uid,
    "InstanceNumber": Output.instance_number,
    "Rows": Output.rows,
    "Columns": Output.columns,
    "NumberOfFrames": Output.number_of_frames,
}
assert set(_SERIES_OUTPUT_COLUMNS) == set(SERIES_COLUMNS) and set(_INSTANCE_OUTPUT_COLUMNS) == set(INSTANCE_COLUMNS)
_CHUNK = 500  # values per SQL IN list


@dataclass(frozen=True)
class OutputRecord:
    """What the index records of one output object (see :class:`gateway.store.index.Output`)."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    instance_number: int | None
    rows: int | None
    columns: int | None
    number_of_frames: int | None
    path: str
    size: int

    @classmethod
    def of(cls, dataset: Dataset, path: Path, data_dir: Path) -> OutputRecord:
        """The record of ``dataset`` as written to ``path`` (relative to ``data_dir`` when inside it).

        Raises
        ------
        ValueError
            The dataset lacks its UIDs or its file meta's Transfer Syntax UID.
        """
        try:
            uids = (dataset.SOPInstanceUID, dataset.SeriesInstanceUID, dataset.StudyInstanceUID, dataset.SOPClassUID)
            syntax = dataset.file_meta.TransferSyntaxUID
        except AttributeError as exc:
            raise ValueError(f"dataset: an output needs its UIDs and a transfer syntax ({exc})") from exc
        sop, series, study, sop_class = (str(uid) for uid in uids)
        return cls(
            sop_instance_uid=sop,
            series_instance_uid=series,
            study_instance_uid=study,
            sop_class_uid=sop_class,
            transfer_syntax_uid=str(syntax),
            modality=dataset.get("Modality") or None,
            series_number=_int(dataset.get("SeriesNumber")),
            series_description=dataset.get("SeriesDescription") or None,
            instance_number=_int(dataset.get("InstanceNumber")),
            rows=_int(dataset.get("Rows")),
            columns=_int(dataset.get("Columns")),
            number_of_frames=_int(dataset.get("NumberOfFrames")),
            path=_relative(path, data_dir),
            size=path.stat().st_size,
        )


@dataclass(frozen=True)
class StudyOutputs:
    """A study's outputs: how many series and objects, and their modalities."""

    series: int
    instances: int
    modalities: tuple[str, ...]


def record_job_outputs(
    session: Session, job_id: int, records: Sequence[OutputRecord], *, now: float | None = None
) -> None:
    """Make ``records`` the outputs of ``job_id``: insert or update each (by SOP Instance UID), forget the job's
    others (a re-run that wrote fewer objects). A UID another job recorded moves to this one. The caller commits."""
    now = time.time() if now is None else now
    keep = {record.sop_instance_uid for record in records}
    stale = delete(Output).where(Output.job_id == job_id)
    if keep:
        stale = stale.where(Output.sop_instance_uid.not_in(keep))
    session.execute(stale)
    for record in records:
        session.merge(Output(**vars(record), job_id=job_id, created_at=now))


def forget_job_outputs(session: Session, job_id: int) -> int:
    """Forget the outputs recorded for ``job_id`` (retention purges its files); how many rows went."""
    gone = session.execute(delete(Output).where(Output.job_id == job_id))
    return int(getattr(gone, "rowcount", 0) or 0)


def output_files(
    session: Session,
    study_instance_uid: str,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> list[InstanceFile]:
    """The output files of a study, of one of its series, or one output object (empty when none)."""
    stmt = select(Output).where(Output.study_instance_uid == study_instance_uid)
    if series_instance_uid is not None:
        stmt = stmt.where(Output.series_instance_uid == series_instance_uid)
    if sop_instance_uid is not None:
        stmt = stmt.where(Output.sop_instance_uid == sop_instance_uid)
    stmt = stmt.order_by(Output.series_instance_uid, Output.instance_number, Output.sop_instance_uid)
    return [
        InstanceFile(
            row.study_instance_uid,
            row.series_instance_uid,
            row.sop_instance_uid,
            transfer_syntax_uid=row.transfer_syntax_uid,
            path=row.path,
            size=row.size or 0,
        )
        for row in session.scalars(stmt)
    ]


def study_outputs(session: Session, study_uids: Iterable[str]) -> dict[str, StudyOutputs]:
    """The outputs of each of ``study_uids`` that has some."""
    uids = sorted(set(study_uids))
    counts: dict[str, tuple[int, int]] = {}
    modalities: dict[str, set[str]] = {}
    for chunk in (uids[k : k + _CHUNK] for k in range(0, len(uids), _CHUNK)):
        rows = session.execute(
            select(Output.study_instance_uid, func.count(func.distinct(Output.series_instance_uid)), func.count())
            .where(Output.study_instance_uid.in_(chunk))
            .group_by(Output.study_instance_uid)
        ).all()
        counts.update({uid: (int(n_series), int(n)) for uid, n_series, n in rows})
        pairs = session.execute(
            select(Output.study_instance_uid, Output.modality)
            .where(Output.study_instance_uid.in_(chunk), Output.modality.is_not(None))
            .distinct()
        ).all()
        for uid, modality in pairs:
            if modality is not None:
                modalities.setdefault(uid, set()).add(modality)
    return {
        uid: StudyOutputs(n_series, n, tuple(sorted(modalities.get(uid, ())))) for uid, (n_series, n) in counts.items()
    }


def with_outputs(session: Session, matches: Sequence[Match]) -> list[Match]:
    """``matches`` with their study-level counts and modalities counting the studies' outputs too."""
    found = study_outputs(session, {m.study_instance_uid for m in matches})
    return [
        _with_study_outputs(m, found[m.study_instance_uid]) if m.study_instance_uid in found else m for m in matches
    ]


def studies_with_modalities(session: Session, value: str, *, limit: int = 10_000) -> set[str] | None:
    """The studies a ModalitiesInStudy match value selects, received series and outputs alike.

    ``None`` when no output has one of the modalities (matching the received series alone is then right), or when
    more than ``limit`` studies would be listed (they are then matched on their received series alone).

    Raises
    ------
    gateway.errors.InvalidQuery
        The value names no modality.
    """
    modalities = _modalities(value)
    dialect = session.get_bind().dialect.name
    made = or_(*(condition(Output.modality, "Modality", m, dialect) for m in modalities))
    found = set(session.scalars(select(Output.study_instance_uid).where(made).distinct().limit(limit + 1)))
    if not found:
        return None
    received = or_(*(condition(Series.modality, "Modality", m, dialect) for m in modalities))
    found.update(session.scalars(select(Series.study_instance_uid).where(received).distinct().limit(limit + 1)))
    return found if len(found) <= limit else None


def count_output_series(session: Session, filters: Mapping[str, str], *, study_instance_uid: str | None = None) -> int:
    """How many output series :func:`search_output_series` finds (all pages)."""
    stmt = _series_query(session, filters, study_instance_uid).subquery()
    return int(session.scalar(select(func.count()).select_from(stmt)) or 0)


def search_output_series(
    session: Session,
    filters: Mapping[str, str],
    *,
    study_instance_uid: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[Match]:
    """The output series matching ``filters`` (series-level search), oldest first.

    Parameters and exceptions are those of :func:`gateway.store.query.search_series`. The matches' study-level
    counts are the received ones: :func:`with_outputs` adds the outputs.
    """
    rows = session.execute(paged(_series_query(session, filters, study_instance_uid), limit, offset)).all()
    studies = _study_attributes(session, {row.study for row in rows})
    matches = []
    for row in rows:
        attributes = {
            **studies.get(row.study, {}),
            **_series_attributes(row.series, row.modality, row.number, row.description),
            "NumberOfSeriesRelatedInstances": int(row.instances),
        }
        matches.append(Match("series", row.study, row.series, None, attributes, path=row.path))
    return matches


def count_output_instances(
    session: Session,
    filters: Mapping[str, str],
    *,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> int:
    """How many output objects :func:`search_output_instances` finds (all pages)."""
    stmt = _instance_query(session, filters, study_instance_uid, series_instance_uid).subquery()
    return int(session.scalar(select(func.count()).select_from(stmt)) or 0)


def search_output_instances(
    session: Session,
    filters: Mapping[str, str],
    *,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[Match]:
    """The output objects matching ``filters`` (instance-level search), oldest first.

    Parameters and exceptions are those of :func:`gateway.store.query.search_instances`.
    """
    stmt = _instance_query(session, filters, study_instance_uid, series_instance_uid)
    outputs = list(session.scalars(paged(stmt, limit, offset)))
    studies = _study_attributes(session, {o.study_instance_uid for o in outputs})
    per_series = _series_counts(session, {o.series_instance_uid for o in outputs})
    matches = []
    for o in outputs:
        attributes = {
            **studies.get(o.study_instance_uid, {}),
            **_series_attributes(o.series_instance_uid, o.modality, o.series_number, o.series_description),
            "NumberOfSeriesRelatedInstances": per_series.get(o.series_instance_uid, 0),
            **{keyword: getattr(o, column.key) for keyword, column in _INSTANCE_OUTPUT_COLUMNS.items() if column},
        }
        uids = (o.study_instance_uid, o.series_instance_uid, o.sop_instance_uid)
        matches.append(Match("instance", *uids, attributes, path=o.path))
    return matches


# --- queries ------------------------------------------------------------------------------------------------


_SeriesRow = Select[str, str, str | None, int | None, str | None, int, str, float]


def _series_query(session: Session, filters: Mapping[str, str], study: str | None) -> _SeriesRow:
    stmt = (
        select(
            Output.series_instance_uid.label("series"),
            Output.study_instance_uid.label("study"),
            func.max(Output.modality).label("modality"),
            func.max(Output.series_number).label("number"),
            func.max(Output.series_description).label("description"),
            func.count().label("instances"),
            func.min(Output.path).label("path"),
            func.min(Output.created_at).label("created_at"),
        )
        .join(Study, Output.study_instance_uid == Study.study_instance_uid)
        .where(*_conditions(session, filters, _SERIES_OUTPUT_COLUMNS), _study_held())
        .group_by(Output.series_instance_uid, Output.study_instance_uid)
        .order_by(func.min(Output.created_at), Output.series_instance_uid)
    )
    if study is not None:
        stmt = stmt.where(Output.study_instance_uid == study)
    return stmt


def _instance_query(
    session: Session, filters: Mapping[str, str], study: str | None, series: str | None
) -> Select[Output]:
    columns = {**_SERIES_OUTPUT_COLUMNS, **_INSTANCE_OUTPUT_COLUMNS}
    stmt = (
        select(Output)
        .join(Study, Output.study_instance_uid == Study.study_instance_uid)
        .where(*_conditions(session, filters, columns), _study_held())
        .order_by(Output.created_at, Output.series_instance_uid, Output.instance_number, Output.sop_instance_uid)
    )
    if study is not None:
        stmt = stmt.where(Output.study_instance_uid == study)
    if series is not None:
        stmt = stmt.where(Output.series_instance_uid == series)
    return stmt


def _study_held() -> ColumnElement[bool]:
    """The output's study still holds a received instance (as :func:`~gateway.store.query.search_studies` asks)."""
    return exists().where(Instance.study_instance_uid == Output.study_instance_uid)


def _conditions(
    session: Session, filters: Mapping[str, str], columns: Mapping[str, InstrumentedAttribute[Any] | None]
) -> list[ColumnElement[bool]]:
    dialect = session.get_bind().dialect.name
    conditions: list[ColumnElement[bool]] = []
    for keyword, value in filters.items():
        if value in ("", "*"):
            continue  # universal matching
        if keyword == _MODALITIES_IN_STUDY:
            conditions.append(_modalities_condition(value, dialect))
        elif keyword in STUDY_COLUMNS:
            conditions.append(condition(STUDY_COLUMNS[keyword], keyword, value, dialect))
        elif keyword not in columns:
            raise InvalidQuery(f"matching on {keyword} is not supported for the gateway's outputs")
        else:
            column = columns[keyword]
            conditions.append(false() if column is None else condition(column, keyword, value, dialect))
    return conditions


def _modalities_condition(value: str, dialect: str) -> ColumnElement[bool]:
    """A received series or an output of the output's study has one of the modalities."""
    modalities = _modalities(value)
    received = or_(*(condition(Series.modality, "Modality", m, dialect) for m in modalities))
    other = aliased(Output)
    made = or_(*(condition(other.modality, "Modality", m, dialect) for m in modalities))
    return or_(
        exists().where(Series.study_instance_uid == Study.study_instance_uid, received).correlate(Study),
        exists().where(other.study_instance_uid == Study.study_instance_uid, made).correlate(Study),
    )


def _modalities(value: str) -> list[str]:
    modalities = [m.strip() for m in value.replace("\\", ",").split(",") if m.strip()]
    if not modalities:
        raise InvalidQuery("ModalitiesInStudy must name at least one modality")
    return modalities


# --- attributes ---------------------------------------------------------------------------------------------


def _study_attributes(session: Session, study_uids: Collection[str]) -> dict[str, Mapping[str, AttributeValue]]:
    """The study-level attributes of each study, as a study search returns them (received counts)."""
    found: dict[str, Mapping[str, AttributeValue]] = {}
    uids = sorted(study_uids)
    for chunk in (uids[k : k + _CHUNK] for k in range(0, len(uids), _CHUNK)):
        for match in search_studies(session, {"StudyInstanceUID": ",".join(chunk)}):
            found[match.study_instance_uid] = match.attributes
    return found


def _series_attributes(
    uid: str, modality: str | None, number: int | None, description: str | None
) -> dict[str, AttributeValue]:
    values: dict[str, AttributeValue] = {
        "SeriesInstanceUID": uid,
        "Modality": modality,
        "SeriesNumber": number,
        "SeriesDescription": description,
        "BodyPartExamined": None,
    }
    assert set(values) == set(SERIES_COLUMNS)
    return values


def _series_counts(session: Session, series_uids: Collection[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    uids = sorted(series_uids)
    for chunk in (uids[k : k + _CHUNK] for k in range(0, len(uids), _CHUNK)):
        rows = session.execute(
            select(Output.series_instance_uid, func.count())
            .where(Output.series_instance_uid.in_(chunk))
            .group_by(Output.series_instance_uid)
        ).all()
        counts.update({uid: int(n) for uid, n in rows})
    return counts


def _with_study_outputs(match: Match, outputs: StudyOutputs) -> Match:
    attributes = dict(match.attributes)
    attributes["NumberOfStudyRelatedSeries"] = _as_int(attributes.get("NumberOfStudyRelatedSeries")) + outputs.series
    attributes["NumberOfStudyRelatedInstances"] = (
        _as_int(attributes.get("NumberOfStudyRelatedInstances")) + outputs.instances
    )
    received = attributes.get(_MODALITIES_IN_STUDY)
    modalities = set(received) if isinstance(received, list) else set()
    attributes[_MODALITIES_IN_STUDY] = sorted(modalities | set(outputs.modalities)) or None
    return replace(match, attributes=attributes)


def _as_int(value: AttributeValue) -> int:
    return value if isinstance(value, int) else 0


def _int(value: object) -> int | None:
    try:
        return None if value is None or value == "" else int(str(value))
    except ValueError:
        return None


def _relative(path: Path, data_dir: Path) -> str:
    try:
        return path.resolve().relative_to(data_dir.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())
