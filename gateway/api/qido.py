"""QIDO-RS: search for studies, series and instances (PS3.18 10.6), received ones and the gateway's own outputs.

The gateway's outputs (SEG, SR, presentation states, KO, Parametric Maps: :mod:`gateway.store.outputs`) are
listed with the series and instances of their study, before the received ones, and counted in its
NumberOfStudyRelatedSeries/Instances and ModalitiesInStudy (which also matches on them: ``ModalitiesInStudy=SEG``
finds the studies the gateway segmented), so that a viewer pointed at the gateway finds them.

Each route parses its query (:func:`parse_search`) and calls :func:`search`, which the tests call directly.
A search with no matches answers 200 with an empty array: CP-2473 moves PS3.18 8.3.4.4.1 from 204 to 200,
and dicomweb-client reads an empty array and an empty body alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session

from gateway.api.auth import audit_of, caller_name, client_host, require_scope
from gateway.api.deps import get_store
from gateway.api.dicomjson import (
    attributes_dataset,
    header_json,
    keywords_at,
    merge_json,
    read_header,
    resolve_keyword,
    to_dicom_json,
)
from gateway.errors import InvalidQuery
from gateway.ingest.instance import is_valid_uid
from gateway.store.outputs import (
    count_output_instances,
    count_output_series,
    search_output_instances,
    search_output_series,
    studies_with_modalities,
    with_outputs,
)
from gateway.store.query import (
    Level,
    Match,
    matchable_keywords,
    representative_path,
    search_instances,
    search_series,
    search_studies,
)
from gateway.store.store import InstanceStore

#: The most results one response carries; more are announced by a Warning header (PS3.18 8.3.4.4).
MAX_RESULTS = 1000
DICOM_JSON = "application/dicom+json"

Resource = Literal["studies", "study-series", "series", "study-series-instances", "study-instances", "instances"]

#: Return keys of each level (PS3.18 Tables 10.6.3-3, -4, -5), plus the UIDs of the levels above.
STUDY_RETURN_KEYS = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_RETURN_KEYS = (
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesInstanceUID",
    "NumberOfSeriesRelatedInstances",
    "BodyPartExamined",
    "StudyInstanceUID",
)
INSTANCE_RETURN_KEYS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)

_LEVEL: Mapping[Resource, Level] = {
    "studies": "study",
    "study-series": "series",
    "series": "series",
    "study-series-instances": "instance",
    "study-instances": "instance",
    "instances": "instance",
}
_RETURN_KEYS: Mapping[Resource, tuple[str, ...]] = {
    "studies": STUDY_RETURN_KEYS,
    "study-series": SERIES_RETURN_KEYS,
    "series": STUDY_RETURN_KEYS + SERIES_RETURN_KEYS,
    "study-series-instances": INSTANCE_RETURN_KEYS,
    "study-instances": SERIES_RETURN_KEYS + INSTANCE_RETURN_KEYS,
    "instances": STUDY_RETURN_KEYS + SERIES_RETURN_KEYS + INSTANCE_RETURN_KEYS,
}
_CONTROL_KEYS = {
    "includefield",
    "limit",
    "offset",
    "fuzzymatching",
    "emptyvaluematching",
    "multiplevaluematching",
}
_MODALITIES_IN_STUDY = "ModalitiesInStudy"
_MAX_DIGITS = 18  # limit and offset stay within a 64-bit SQL integer
_ACCEPTABLE = {"application/dicom+json", "application/json", "application/*", "*/*"}

Store = Annotated[InstanceStore, Depends(get_store)]
_Page = Callable[[int, int], list[Match]]  # (limit, offset) -> matches

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=[Depends(require_scope("read"))])


@dataclass(frozen=True)
class SearchParams:
    """A parsed QIDO-RS query (PS3.18 8.3.4): match keys, return keys, paging and ignored options."""

    filters: dict[str, str] = field(default_factory=dict)
    includefields: frozenset[str] = frozenset()
    include_all: bool = False
    limit: int | None = None
    offset: int = 0
    unsupported: tuple[str, ...] = ()


@dataclass(frozen=True)
class SearchResult:
    """The DICOM JSON objects of one page of results, and whether more results remain beyond the cap."""

    objects: list[dict[str, Any]]
    truncated: bool


def parse_search(items: Iterable[tuple[str, str]], level: Level) -> SearchParams:
    """Parse the query parameters of a search at ``level``.

    Attributes are named by keyword or by tag (``00100020``); ``includefield`` is repeatable and
    comma-separated; a UID attribute given several times matches any of the values.

    Raises
    ------
    gateway.errors.InvalidQuery
        An unknown key or attribute, an attribute the index cannot match on, or a bad ``limit``/``offset``.
    """
    filters: dict[str, str] = {}
    includes: set[str] = set()
    controls: dict[str, str] = {}
    for key, value in items:
        if key in _CONTROL_KEYS:
            if key == "includefield":
                includes.update(v.strip() for v in value.split(",") if v.strip())
            elif key in controls:
                raise InvalidQuery(f"query parameter {key} is given more than once")
            else:
                controls[key] = value
            continue
        _add_filter(filters, key, value, level)
    include_all = "all" in includes
    return SearchParams(
        filters=filters,
        includefields=frozenset(_resolve(name, "includefield") for name in includes - {"all"}),
        include_all=include_all,
        limit=_non_negative(controls, "limit"),
        offset=_non_negative(controls, "offset") or 0,
        unsupported=tuple(k for k in sorted(controls) if k.endswith("matching") and _flag(controls, k)),
    )


def search(
    session: Session,
    store: InstanceStore,
    resource: Resource,
    params: SearchParams,
    base_url: str,
    *,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> SearchResult:
    """Run a QIDO-RS search of ``resource`` and return its DICOM JSON objects (at most :data:`MAX_RESULTS`).

    Parameters
    ----------
    session, store
        The index session and the instance store (for headers of attributes the index does not hold).
    resource
        Which of the six search resources of PS3.18 Table 10.6.1-2.
    params
        The parsed query.
    base_url
        The DICOMweb base URL (``.../dicomweb``), for the Retrieve URL (0008,1190).
    study_instance_uid, series_instance_uid
        The UIDs of the resource path, if any.

    Raises
    ------
    gateway.errors.InvalidQuery
        A match value is malformed.
    """
    cap = MAX_RESULTS if params.limit is None else min(params.limit, MAX_RESULTS)
    matches = _find(session, resource, params, cap + 1, study_instance_uid, series_instance_uid)
    truncated = len(matches) > cap and (params.limit is None or params.limit > cap)
    objects = [_render(m, session, store, resource, params, base_url) for m in matches[:cap]]
    return SearchResult(objects, truncated)


@router.get("/studies", summary="Search for studies")
def search_for_studies(request: Request, store: Store) -> JSONResponse:
    """QIDO-RS All Studies."""
    return _respond(request, store, "studies")


@router.get("/series", summary="Search for series")
def search_for_all_series(request: Request, store: Store) -> JSONResponse:
    """QIDO-RS All Series."""
    return _respond(request, store, "series")


@router.get("/instances", summary="Search for instances")
def search_for_all_instances(request: Request, store: Store) -> JSONResponse:
    """QIDO-RS All Instances."""
    return _respond(request, store, "instances")


@router.get("/studies/{study}/series", summary="Search for a study's series")
def search_for_study_series(request: Request, study: str, store: Store) -> JSONResponse:
    """QIDO-RS Study's Series."""
    return _respond(request, store, "study-series", study)


@router.get("/studies/{study}/instances", summary="Search for a study's instances")
def search_for_study_instances(request: Request, study: str, store: Store) -> JSONResponse:
    """QIDO-RS Study's Instances."""
    return _respond(request, store, "study-instances", study)


@router.get("/studies/{study}/series/{series}/instances", summary="Search for a series' instances")
def search_for_series_instances(request: Request, study: str, series: str, store: Store) -> JSONResponse:
    """QIDO-RS Study Series' Instances."""
    return _respond(request, store, "study-series-instances", study, series)


def dicomweb_base_url(request: Request) -> str:
    """The DICOMweb base URL of this request (``http://host/.../dicomweb``)."""
    return str(request.base_url).rstrip("/") + router.prefix


def _respond(
    request: Request,
    store: InstanceStore,
    resource: Resource,
    study: str | None = None,
    series: str | None = None,
) -> JSONResponse:
    _check_accept(request.headers.get("accept"))
    for uid in (study, series):
        if uid is not None and not is_valid_uid(uid):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="a UID in the path is not a valid UID")
    try:
        params = parse_search(request.query_params.multi_items(), _LEVEL[resource])
        with store.sessions() as session:
            result = search(
                session,
                store,
                resource,
                params,
                dicomweb_base_url(request),
                study_instance_uid=study,
                series_instance_uid=series,
            )
    except InvalidQuery as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(exc)) from exc
    _audit_query(request)
    return JSONResponse(result.objects, media_type=DICOM_JSON, headers=_warnings(params, result))


def _audit_query(request: Request) -> None:
    """A Query audit message: who searched, from where, with which path and query string (as sent)."""
    query = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    audit_of(request).query(caller_name(request), client_host(request), query)


def _find(
    session: Session,
    resource: Resource,
    params: SearchParams,
    limit: int,
    study: str | None,
    series: str | None,
) -> list[Match]:
    """The matches of one page: at the series and instance levels the gateway's outputs first, then what it
    received; every match's study-level counts and modalities include the outputs."""
    level = _LEVEL[resource]
    filters, offset = params.filters, params.offset
    if level == "study":
        matched = _with_output_modalities(session, filters)
        found = [] if matched is None else search_studies(session, matched, limit=limit, offset=offset)
    elif level == "series":
        found = _outputs_first(
            count_output_series(session, filters, study_instance_uid=study),
            lambda n, skip: search_output_series(session, filters, study_instance_uid=study, limit=n, offset=skip),
            lambda n, skip: search_series(session, filters, study_instance_uid=study, limit=n, offset=skip),
            limit,
            offset,
        )
    else:
        uids = {"study_instance_uid": study, "series_instance_uid": series}
        found = _outputs_first(
            count_output_instances(session, filters, **uids),
            lambda n, skip: search_output_instances(session, filters, **uids, limit=n, offset=skip),
            lambda n, skip: search_instances(session, filters, **uids, limit=n, offset=skip),
            limit,
            offset,
        )
    return with_outputs(session, found)


def _with_output_modalities(session: Session, filters: dict[str, str]) -> dict[str, str] | None:
    """Study filters whose ModalitiesInStudy also matches the outputs' modalities (``ModalitiesInStudy=SEG``):
    the studies it selects, as a StudyInstanceUID list; ``None`` when no study can match."""
    value = filters.get(_MODALITIES_IN_STUDY, "")
    if value in ("", "*"):
        return filters
    studies = studies_with_modalities(session, value)
    if studies is None:
        return filters  # no output has the modality: the received series' own matching is the whole answer
    rest = {key: v for key, v in filters.items() if key != _MODALITIES_IN_STUDY}
    asked = rest.get("StudyInstanceUID")
    if asked:
        studies &= {uid.strip() for uid in re.split(r"[,\\]", asked)}
    if not studies:
        return None
    rest["StudyInstanceUID"] = ",".join(sorted(studies))
    return rest


def _outputs_first(outputs: int, output_page: _Page, received_page: _Page, limit: int, offset: int) -> list[Match]:
    """One page of the outputs (``outputs`` of them in all) followed by the received matches."""
    found = output_page(limit, offset) if offset < outputs else []
    if len(found) < limit:
        found += received_page(limit - len(found), max(0, offset - outputs))
    return found


def _render(
    match: Match,
    session: Session,
    store: InstanceStore,
    resource: Resource,
    params: SearchParams,
    base_url: str,
) -> dict[str, Any]:
    allowed = keywords_at(match.level)
    requested = set(params.filters) | params.includefields
    if allowed is not None:
        requested &= allowed
    from_index = set(_RETURN_KEYS[resource]) | {kw for kw in requested if kw in match.attributes}
    ds = attributes_dataset(match.attributes, sorted(from_index))
    ds.RetrieveURL = _retrieve_url(match, base_url)
    ds.InstanceAvailability = "ONLINE"
    from_header = requested - from_index - {"RetrieveURL", "InstanceAvailability"}
    if not (from_header or params.include_all):
        return to_dicom_json(ds)
    header = _header(session, store, match, None if params.include_all else from_header)
    extra = {} if header is None else header_json(header, allowed, None if params.include_all else from_header)
    return merge_json(extra, to_dicom_json(ds))


def _header(session: Session, store: InstanceStore, match: Match, keywords: set[str] | None) -> Dataset | None:
    path = match.path
    if path is None:
        path = representative_path(session, match.study_instance_uid, match.series_instance_uid)
    return None if path is None else read_header(store.path_of(path), keywords)


def _retrieve_url(match: Match, base_url: str) -> str:
    url = f"{base_url}/studies/{match.study_instance_uid}"
    if match.series_instance_uid is not None:
        url += f"/series/{match.series_instance_uid}"
    if match.sop_instance_uid is not None:
        url += f"/instances/{match.sop_instance_uid}"
    return url


def _add_filter(filters: dict[str, str], key: str, value: str, level: Level) -> None:
    keyword = _resolve(key, "query parameter")
    if keyword not in matchable_keywords(level) and value not in ("", "*"):
        raise InvalidQuery(f"matching on {keyword} is not supported at the {level} level")
    if keyword in filters:
        if dictionary_VR(keyword) != "UI":
            raise InvalidQuery(f"{keyword} is given more than once")
        value = f"{filters[keyword]},{value}"
    filters[keyword] = value


def _resolve(name: str, what: str) -> str:
    keyword = resolve_keyword(name)
    if keyword is None:
        raise InvalidQuery(f"unknown {what} {name!r}: not a DICOM keyword or tag")
    return keyword


def _non_negative(controls: Mapping[str, str], key: str) -> int | None:
    value = controls.get(key)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= _MAX_DIGITS):
        raise InvalidQuery(f"{key} must be a non-negative integer (at most {_MAX_DIGITS} digits)")
    return int(value)


def _flag(controls: Mapping[str, str], key: str) -> bool:
    value = controls[key].lower()
    if value not in ("true", "false"):
        raise InvalidQuery(f"{key} must be true or false")
    return value == "true"


def _check_accept(accept: str | None) -> None:
    if accept is None or not accept.strip():
        return
    media_types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if not media_types & _ACCEPTABLE:
        raise HTTPException(status.HTTP_406_NOT_ACCEPTABLE, detail=f"search results are only available as {DICOM_JSON}")


def _warnings(params: SearchParams, result: SearchResult) -> dict[str, str]:
    texts = [f"The {name} parameter is not supported and was ignored." for name in params.unsupported]
    if result.truncated:
        texts.append("There are additional results that can be requested.")
    if not texts:
        return {}
    return {"Warning": ", ".join(f'299 gateway: "{text}"' for text in texts)}
