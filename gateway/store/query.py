"""Searches over the index: studies, series and instances by DICOM matching keys, and their files.

The matching rules are those of C-FIND (PS3.4 C.2.2.2), which QIDO-RS reuses (PS3.18 8.3.4.1):

- UI: single value or UID list matching (values separated by ``,`` or ``\\``);
- DA and TM: single value or range matching (``20200101-20201231``, ``-20201231``, ``20200101-``);
- IS and US: single value matching;
- AE, CS, LO, PN, SH: single value or wild card matching (``*`` any run of characters, ``?`` one character),
  case-sensitive except for PN, which matches case-insensitively;
- an empty value or ``*`` is universal matching: no condition.

Every condition is a SQLAlchemy expression (no SQL is built from text), portable across SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVarTuple

from pydicom.datadict import dictionary_VR
from sqlalchemy import ColumnElement, ScalarSelect, Select, and_, exists, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from gateway.errors import InvalidQuery, NotFound
from gateway.ingest.instance import is_valid_uid
from gateway.store.index import Instance, Series, Study

Level = Literal["study", "series", "instance"]
_Ts = TypeVarTuple("_Ts")
AttributeValue = str | int | list[str] | None

#: Index columns by DICOM keyword, one table per query level.
STUDY_COLUMNS: Mapping[str, InstrumentedAttribute[Any]] = {
    "StudyInstanceUID": Study.study_instance_uid,
    "PatientID": Study.patient_id,
    "PatientName": Study.patient_name,
    "PatientBirthDate": Study.patient_birth_date,
    "PatientSex": Study.patient_sex,
    "StudyDate": Study.study_date,
    "StudyTime": Study.study_time,
    "AccessionNumber": Study.accession_number,
    "StudyID": Study.study_id,
    "StudyDescription": Study.study_description,
    "ReferringPhysicianName": Study.referring_physician_name,
}
SERIES_COLUMNS: Mapping[str, InstrumentedAttribute[Any]] = {
    "SeriesInstanceUID": Series.series_instance_uid,
    "Modality": Series.modality,
    "SeriesNumber": Series.series_number,
    "SeriesDescription": Series.series_description,
    "BodyPartExamined": Series.body_part_examined,
}
INSTANCE_COLUMNS: Mapping[str, InstrumentedAttribute[Any]] = {
    "SOPInstanceUID": Instance.sop_instance_uid,
    "SOPClassUID": Instance.sop_class_uid,
    "InstanceNumber": Instance.instance_number,
    "Rows": Instance.rows,
    "Columns": Instance.columns,
    "NumberOfFrames": Instance.number_of_frames,
}
_COLUMNS: Mapping[Level, Mapping[str, InstrumentedAttribute[Any]]] = {
    "study": STUDY_COLUMNS,
    "series": {**STUDY_COLUMNS, **SERIES_COLUMNS},
    "instance": {**STUDY_COLUMNS, **SERIES_COLUMNS, **INSTANCE_COLUMNS},
}
_MODALITIES_IN_STUDY = "ModalitiesInStudy"

_DA_RE = re.compile(r"^[0-9]{8}$")
_TM_RE = re.compile(r"^[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?$")
_INT_RE = re.compile(r"^[+-]?[0-9]{1,10}$")
_TM_FULL_LENGTH = 13  # HHMMSS.FFFFFF
_LIST_SEPARATORS = re.compile(r"[,\\]")

#: Results come in arrival order, so that limit and offset page through a stable list.
_STUDY_ORDER = (Study.created_at, Study.study_instance_uid)
_SERIES_ORDER = (Series.created_at, Series.series_instance_uid)

#: Correlated counts (PS3.4 C.3.4): series and instances of the outer query's study, instances of its series.
_STUDY_SERIES: ScalarSelect[int] = (
    select(func.count(Series.series_instance_uid))
    .where(Series.study_instance_uid == Study.study_instance_uid)
    .correlate(Study)
    .scalar_subquery()
)
_STUDY_INSTANCES: ScalarSelect[int] = (
    select(func.count(Instance.sop_instance_uid))
    .where(Instance.study_instance_uid == Study.study_instance_uid)
    .correlate(Study)
    .scalar_subquery()
)
_SERIES_INSTANCES: ScalarSelect[int] = (
    select(func.count(Instance.sop_instance_uid))
    .where(Instance.series_instance_uid == Series.series_instance_uid)
    .correlate(Series)
    .scalar_subquery()
)


@dataclass(frozen=True)
class Match:
    """One search result: its UIDs and what the index holds of it, by DICOM keyword.

    ``attributes`` holds the study attributes (with ``ModalitiesInStudy``, ``NumberOfStudyRelatedSeries`` and
    ``NumberOfStudyRelatedInstances``), for series and instances also the series attributes (with
    ``NumberOfSeriesRelatedInstances``), for instances also the instance attributes.
    """

    level: Level
    study_instance_uid: str
    series_instance_uid: str | None
    sop_instance_uid: str | None
    attributes: Mapping[str, AttributeValue]
    path: str | None = None


@dataclass(frozen=True)
class InstanceFile:
    """A stored instance file: its UIDs, store-relative path, size and transfer syntax."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    path: str
    size: int


def matchable_keywords(level: Level) -> frozenset[str]:
    """The keywords a search at ``level`` can match on (that level's and the levels above)."""
    return frozenset(_COLUMNS[level]) | {_MODALITIES_IN_STUDY}


def search_studies(
    session: Session,
    filters: Mapping[str, str],
    *,
    limit: int | None = None,
    offset: int = 0,
) -> list[Match]:
    """Return the studies matching ``filters``, oldest first.

    Parameters
    ----------
    session
        An index session.
    filters
        Match values by DICOM keyword, in C-FIND matching syntax (see the module docstring).
    limit, offset
        Return at most ``limit`` results (all when ``None``), skipping the first ``offset``.

    Raises
    ------
    InvalidQuery
        An attribute the index cannot match on at this level, or a malformed value.
    """
    stmt = (
        select(Study, _STUDY_SERIES, _STUDY_INSTANCES)
        .where(*_conditions(session, "study", filters), _STUDY_INSTANCES > 0)  # not one retention emptied
        .order_by(*_STUDY_ORDER)
    )
    rows = session.execute(paged(stmt, limit, offset)).all()
    modalities = _modalities(session, [row[0].study_instance_uid for row in rows])
    return [_study_match(study, n_series, n_inst, modalities) for study, n_series, n_inst in rows]


def search_series(
    session: Session,
    filters: Mapping[str, str],
    *,
    study_instance_uid: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[Match]:
    """Return the series matching ``filters`` (within one study when ``study_instance_uid`` is given).

    Parameters and exceptions are those of :func:`search_studies`; study attributes can be matched too.
    """
    stmt = (
        select(Series, Study, _STUDY_SERIES, _STUDY_INSTANCES, _SERIES_INSTANCES)
        .join(Study, Series.study_instance_uid == Study.study_instance_uid)
        .where(*_conditions(session, "series", filters), _SERIES_INSTANCES > 0)
        .order_by(*_STUDY_ORDER, *_SERIES_ORDER)
    )
    if study_instance_uid is not None:
        stmt = stmt.where(Series.study_instance_uid == study_instance_uid)
    rows = session.execute(paged(stmt, limit, offset)).all()
    modalities = _modalities(session, {row[1].study_instance_uid for row in rows})
    return [_series_match(*row, modalities) for row in rows]


def search_instances(
    session: Session,
    filters: Mapping[str, str],
    *,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[Match]:
    """Return the instances matching ``filters``, within a study and/or series when given.

    Parameters and exceptions are those of :func:`search_studies`; study and series attributes can be
    matched too.
    """
    stmt = (
        select(Instance, Series, Study, _STUDY_SERIES, _STUDY_INSTANCES, _SERIES_INSTANCES)
        .join(Series, Instance.series_instance_uid == Series.series_instance_uid)
        .join(Study, Instance.study_instance_uid == Study.study_instance_uid)
        .where(*_conditions(session, "instance", filters))
        .order_by(*_STUDY_ORDER, *_SERIES_ORDER, Instance.received_at, Instance.sop_instance_uid)
    )
    if study_instance_uid is not None:
        stmt = stmt.where(Instance.study_instance_uid == study_instance_uid)
    if series_instance_uid is not None:
        stmt = stmt.where(Instance.series_instance_uid == series_instance_uid)
    rows = session.execute(paged(stmt, limit, offset)).all()
    modalities = _modalities(session, {row[2].study_instance_uid for row in rows})
    return [_instance_match(*row, modalities) for row in rows]


def instance_files(
    session: Session,
    study_instance_uid: str,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> list[InstanceFile]:
    """The stored files of a study, of one of its series, or of one instance of that series.

    Raises
    ------
    gateway.errors.NotFound
        The index holds no instance under those UIDs.
    """
    stmt = select(Instance).where(Instance.study_instance_uid == study_instance_uid)
    if series_instance_uid is not None:
        stmt = stmt.where(Instance.series_instance_uid == series_instance_uid)
    if sop_instance_uid is not None:
        stmt = stmt.where(Instance.sop_instance_uid == sop_instance_uid)
    stmt = stmt.order_by(Instance.series_instance_uid, Instance.received_at, Instance.sop_instance_uid)
    files = [_instance_file(row) for row in session.scalars(stmt)]
    if not files:
        what = "instance" if sop_instance_uid else "series" if series_instance_uid else "study"
        raise NotFound(f"no {what} with the requested UIDs is held")
    return files


def representative_path(
    session: Session, study_instance_uid: str, series_instance_uid: str | None = None
) -> str | None:
    """The store-relative path of one instance of a study or series (the first received), if any."""
    stmt = select(Instance.path).where(Instance.study_instance_uid == study_instance_uid)
    if series_instance_uid is not None:
        stmt = stmt.where(Instance.series_instance_uid == series_instance_uid)
    stmt = stmt.order_by(Instance.received_at, Instance.sop_instance_uid).limit(1)
    return session.scalars(stmt).first()


# --- matching ---------------------------------------------------------------------------------------------


def _conditions(session: Session, level: Level, filters: Mapping[str, str]) -> list[ColumnElement[bool]]:
    columns = _COLUMNS[level]
    dialect = session.get_bind().dialect.name
    conditions: list[ColumnElement[bool]] = []
    for keyword, value in filters.items():
        if value in ("", "*"):
            continue  # universal matching
        if keyword == _MODALITIES_IN_STUDY:
            conditions.append(_modalities_condition(value, dialect))
        elif keyword in columns:
            conditions.append(column_condition(columns[keyword], keyword, value, dialect))
        else:
            raise InvalidQuery(f"matching on {keyword} is not supported at the {level} level")
    return conditions


def column_condition(column: InstrumentedAttribute[Any], keyword: str, value: str, dialect: str) -> ColumnElement[bool]:
    vr = dictionary_VR(keyword)
    if vr == "UI":
        return column.in_(_uid_list(keyword, value))
    if vr == "DA":
        return _range(column, keyword, value, _DA_RE, pad_upper="")
    if vr == "TM":
        return _range(column, keyword, value, _TM_RE, pad_upper="9" * _TM_FULL_LENGTH)
    if vr in ("IS", "US", "UL", "SL", "SS"):
        if not _INT_RE.match(value):
            raise InvalidQuery(f"{keyword} must be an integer for matching")
        return column == int(value)
    return _wildcard(column, value, case_sensitive=vr != "PN", dialect=dialect)


def _uid_list(keyword: str, value: str) -> list[str]:
    uids = [uid.strip() for uid in _LIST_SEPARATORS.split(value) if uid.strip()]
    if not uids or not all(is_valid_uid(uid) for uid in uids):
        raise InvalidQuery(f"{keyword} must be a UID or a list of UIDs separated by commas")
    return uids


def _range(
    column: InstrumentedAttribute[Any], keyword: str, value: str, pattern: re.Pattern[str], pad_upper: str
) -> ColumnElement[bool]:
    lower, dash, upper = value.partition("-")
    if not dash:
        upper = lower
    if not (lower or upper) or any(bound and not pattern.match(bound) for bound in (lower, upper)):
        raise InvalidQuery(f"{keyword} must be a {dictionary_VR(keyword)} value or range (PS3.4 C.2.2.2.5)")
    conditions: list[ColumnElement[bool]] = []
    if lower:
        conditions.append(column >= lower)
    if upper:
        # A TM upper bound given to the minute includes every second of that minute: pad it with nines.
        conditions.append(column <= upper + pad_upper)
    return and_(*conditions)


def _wildcard(
    column: InstrumentedAttribute[Any], value: str, *, case_sensitive: bool, dialect: str
) -> ColumnElement[bool]:
    """Single value or wild card matching (PS3.4 C.2.2.2.4) as an equality, LIKE, ILIKE or GLOB."""
    has_wildcard = "*" in value or "?" in value
    if case_sensitive and not has_wildcard:
        return column == value
    if case_sensitive and dialect == "sqlite":  # SQLite's LIKE ignores case; GLOB does not
        return column.op("GLOB")(value.replace("[", "[[]"))
    pattern = _like_pattern(value)
    if case_sensitive:
        return column.like(pattern, escape="\\")
    return column.ilike(pattern, escape="\\")


def _like_pattern(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _modalities_condition(value: str, dialect: str) -> ColumnElement[bool]:
    modalities = [m.strip() for m in _LIST_SEPARATORS.split(value) if m.strip()]
    if not modalities:
        raise InvalidQuery("ModalitiesInStudy must name at least one modality")
    matches = [_wildcard(Series.modality, m, case_sensitive=True, dialect=dialect) for m in modalities]
    return exists().where(Series.study_instance_uid == Study.study_instance_uid, or_(*matches)).correlate(Study)


# --- result rows --------------------------------------------------------------------------------------------


def paged(stmt: Select[*_Ts], limit: int | None, offset: int) -> Select[*_Ts]:
    """``stmt`` limited to a page (QIDO-RS ``limit`` and ``offset``); :class:`InvalidQuery` for a negative one."""
    if limit is not None and limit < 0:
        raise InvalidQuery("limit must not be negative")
    if offset < 0:
        raise InvalidQuery("offset must not be negative")
    return stmt.limit(limit).offset(offset or None)


def _modalities(session: Session, study_uids: Iterable[str]) -> dict[str, list[str]]:
    uids = list(study_uids)
    found: dict[str, list[str]] = {uid: [] for uid in uids}
    if not uids:
        return found
    stmt = (
        select(Series.study_instance_uid, Series.modality)
        .where(Series.study_instance_uid.in_(uids), Series.modality.is_not(None))
        .distinct()
        .order_by(Series.study_instance_uid, Series.modality)
    )
    for study_uid, modality in session.execute(stmt):
        if modality is not None:
            found[study_uid].append(modality)
    return found


def _row_attributes(row: object, columns: Mapping[str, InstrumentedAttribute[Any]]) -> dict[str, AttributeValue]:
    return {keyword: getattr(row, column.key) for keyword, column in columns.items()}


def _study_attributes(study: Study, n_series: int, n_instances: int, modalities: list[str]) -> dict[str, Any]:
    return {
        **_row_attributes(study, STUDY_COLUMNS),
        _MODALITIES_IN_STUDY: modalities or None,
        "NumberOfStudyRelatedSeries": n_series,
        "NumberOfStudyRelatedInstances": n_instances,
    }


def _study_match(study: Study, n_series: int, n_inst: int, modalities: Mapping[str, list[str]]) -> Match:
    attributes = _study_attributes(study, n_series, n_inst, modalities.get(study.study_instance_uid, []))
    return Match("study", study.study_instance_uid, None, None, attributes)


def _series_match(
    series: Series,
    study: Study,
    n_series: int,
    n_study_instances: int,
    n_instances: int,
    modalities: Mapping[str, list[str]],
) -> Match:
    attributes = {
        **_study_attributes(study, n_series, n_study_instances, modalities.get(study.study_instance_uid, [])),
        **_row_attributes(series, SERIES_COLUMNS),
        "NumberOfSeriesRelatedInstances": n_instances,
    }
    return Match("series", study.study_instance_uid, series.series_instance_uid, None, attributes)


def _instance_match(
    instance: Instance,
    series: Series,
    study: Study,
    n_series: int,
    n_study_instances: int,
    n_series_instances: int,
    modalities: Mapping[str, list[str]],
) -> Match:
    series_match = _series_match(series, study, n_series, n_study_instances, n_series_instances, modalities)
    attributes = {**series_match.attributes, **_row_attributes(instance, INSTANCE_COLUMNS)}
    uids = (instance.study_instance_uid, instance.series_instance_uid, instance.sop_instance_uid)
    return Match("instance", *uids, attributes, path=instance.path)


def _instance_file(row: Instance) -> InstanceFile:
    uids = (row.study_instance_uid, row.series_instance_uid, row.sop_instance_uid)
    return InstanceFile(*uids, transfer_syntax_uid=row.transfer_syntax_uid, path=row.path, size=row.size)
