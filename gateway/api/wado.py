"""WADO-RS: retrieve studies, series and instances, and their metadata (PS3.18 10.4).

The gateway's own outputs (:mod:`gateway.store.outputs`) are retrieved as the received instances are, and a
study's retrieval includes them.

Instances are sent as ``multipart/related; type="application/dicom"``, each part holding a stored file's
bytes exactly as received, streamed from disk in chunks. The gateway does not transcode: it serves the
transfer syntax each instance was stored in, whether the Accept header names no transfer syntax, ``*`` or
that one; an Accept header asking for anything else is answered 406. (PS3.18 8.7.3.4 makes Explicit VR
Little Endian the default when none is named; this gateway serves the stored syntax instead, and names it
in each part's Content-Type.)
Metadata is DICOM JSON of the full headers without bulk data (see :mod:`gateway.api.dicomjson`).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import StreamingResponse

from gateway.api.auth import require_scope
from gateway.api.deps import get_store
from gateway.api.dicomjson import attributes_dataset, merge_json, read_header, to_dicom_json
from gateway.errors import NotFound
from gateway.ingest.instance import is_valid_uid
from gateway.store.outputs import output_files
from gateway.store.query import InstanceFile, instance_files
from gateway.store.store import InstanceStore

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"

_PARAM_RE = re.compile(r';\s*([^=;\s]+)\s*=\s*("[^"]*"|[^;]*)')

Store = Annotated[InstanceStore, Depends(get_store)]

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=[Depends(require_scope("read"))])


class NotAcceptable(ValueError):
    """No media type in the Accept header can be served; the message says what can."""


def negotiate(accept: str | None, transfer_syntaxes: Iterable[str]) -> None:
    """Check that an Accept header admits ``multipart/related; type="application/dicom"`` as stored.

    Parameters
    ----------
    accept
        The request's Accept header (``None`` or empty: anything is acceptable).
    transfer_syntaxes
        The transfer syntaxes of the instances to send.

    Raises
    ------
    NotAcceptable
        No acceptable media range admits the DICOM instances in their stored transfer syntaxes.
    """
    if accept is None or not accept.strip():
        return
    stored = set(transfer_syntaxes)
    if any(_admits(media_range, stored) for media_range in _split_accept(accept)):
        return
    raise NotAcceptable(
        'only multipart/related; type="application/dicom" is served, in the stored transfer syntax '
        f"({', '.join(sorted(stored))}); transcoding is not supported"
    )


def multipart_stream(store: InstanceStore, files: Sequence[InstanceFile], boundary: str) -> Iterator[bytes]:
    """Yield a multipart/related body of the ``files``, read from disk :data:`CHUNK_SIZE` bytes at a time."""
    for item in files:
        yield (f"--{boundary}\r\nContent-Type: {DICOM}; transfer-syntax={item.transfer_syntax_uid}\r\n\r\n").encode(
            "ascii"
        )
        with store.path_of(item.path).open("rb") as fp:
            while chunk := fp.read(CHUNK_SIZE):
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


def metadata_stream(store: InstanceStore, files: Sequence[InstanceFile]) -> Iterator[bytes]:
    """Yield a JSON array of the DICOM JSON headers of ``files``, one instance at a time.

    An unreadable file is left out (and logged by its store path only), so one damaged file does not cut
    the response short.
    """
    yield b"["
    first = True
    for item in files:
        obj = instance_metadata(store.path_of(item.path), item)
        if obj is None:
            continue
        yield (b"" if first else b",") + json.dumps(obj, ensure_ascii=False).encode("utf-8")
        first = False
    yield b"]"


def instance_metadata(path: Path, item: InstanceFile) -> dict[str, object] | None:
    """The DICOM JSON of one stored instance's header, with its Available Transfer Syntax UID (0008,3002)."""
    header = read_header(path)
    if header is None:
        return None
    keyword = "AvailableTransferSyntaxUID"
    available = attributes_dataset({keyword: item.transfer_syntax_uid}, [keyword])
    return merge_json(to_dicom_json(header), to_dicom_json(available))


@router.get("/studies/{study}", summary="Retrieve a study")
def retrieve_study(request: Request, study: str, store: Store) -> StreamingResponse:
    """WADO-RS Retrieve Study."""
    return _retrieve(request, store, study)


@router.get("/studies/{study}/series/{series}", summary="Retrieve a series")
def retrieve_series(request: Request, study: str, series: str, store: Store) -> StreamingResponse:
    """WADO-RS Retrieve Series."""
    return _retrieve(request, store, study, series)


@router.get("/studies/{study}/series/{series}/instances/{instance}", summary="Retrieve an instance")
def retrieve_instance(request: Request, study: str, series: str, instance: str, store: Store) -> StreamingResponse:
    """WADO-RS Retrieve Instance."""
    return _retrieve(request, store, study, series, instance)


@router.get("/studies/{study}/metadata", summary="Retrieve a study's metadata")
def retrieve_study_metadata(study: str, store: Store) -> StreamingResponse:
    """WADO-RS Retrieve Study Metadata."""
    return _metadata(store, study)


@router.get("/studies/{study}/series/{series}/metadata", summary="Retrieve a series' metadata")
def retrieve_series_metadata(study: str, series: str, store: Store) -> StreamingResponse:
    """WADO-RS Retrieve Series Metadata."""
    return _metadata(store, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/metadata",
    summary="Retrieve an instance's metadata",
)
def retrieve_instance_metadata(study: str, series: str, instance: str, store: Store) -> StreamingResponse:
    """WADO-RS Retrieve Instance Metadata."""
    return _metadata(store, study, series, instance)


def _retrieve(
    request: Request, store: InstanceStore, study: str, series: str | None = None, instance: str | None = None
) -> StreamingResponse:
    files = _files(store, study, series, instance)
    try:
        negotiate(request.headers.get("accept"), (f.transfer_syntax_uid for f in files))
    except NotAcceptable as exc:
        raise HTTPException(status.HTTP_406_NOT_ACCEPTABLE, detail=str(exc)) from exc
    boundary = uuid.uuid4().hex
    return StreamingResponse(
        multipart_stream(store, files, boundary),
        media_type=f'multipart/related; type="{DICOM}"; boundary={boundary}',
    )


def _metadata(
    store: InstanceStore, study: str, series: str | None = None, instance: str | None = None
) -> StreamingResponse:
    files = _files(store, study, series, instance)
    return StreamingResponse(metadata_stream(store, files), media_type=DICOM_JSON)


def _files(store: InstanceStore, study: str, series: str | None, instance: str | None) -> list[InstanceFile]:
    """The received files, then the gateway's outputs, under the UIDs; 404 when neither holds any."""
    if not all(is_valid_uid(uid) for uid in (study, series, instance) if uid is not None):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="a UID in the path is not a valid UID")
    with store.sessions() as session:
        try:
            received = instance_files(session, study, series, instance)
        except NotFound:
            received = []
        outputs = output_files(session, study, series, instance)
    if not (received or outputs):
        what = "instance" if instance else "series" if series else "study"
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no {what} with the requested UIDs is held")
    return received + outputs


def _split_accept(accept: str) -> list[tuple[str, dict[str, str]]]:
    ranges = []
    for part in re.split(r",(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", accept):
        media_type = part.split(";", 1)[0].strip().lower()
        params = {k.lower(): v.strip().strip('"') for k, v in _PARAM_RE.findall(part)}
        if media_type and params.get("q", "1").strip() not in ("0", "0.0", "0.00", "0.000"):
            ranges.append((media_type, params))
    return ranges


def _admits(media_range: tuple[str, dict[str, str]], stored: set[str]) -> bool:
    media_type, params = media_range
    if media_type == "*/*" or media_type == "multipart/*":
        return "transfer-syntax" not in params or _syntax_ok(params["transfer-syntax"], stored)
    if media_type != "multipart/related":
        return False
    if params.get("type", DICOM).lower() not in (DICOM, "application/*", "*/*"):
        return False
    return _syntax_ok(params.get("transfer-syntax", "*"), stored)


def _syntax_ok(requested: str, stored: set[str]) -> bool:
    return requested == "*" or stored == {requested}
