"""Whether an export destination answers now: a C-ECHO for a DICOM node, an HTTP request for a DICOMweb server.

The check talks to the destination the way its deliveries do (the same calling AE title, TLS settings, bearer
token and timeouts, the latter capped at :data:`CHECK_TIMEOUT_S`), and says in one line what it found. It never
raises for a network failure: that is ``ok=False`` with the reason.

What "answers" means:

- **DICOM (C-STORE) destination**: an association is accepted. A C-ECHO (Verification, PS3.4 A.4) answered with
  status 0x0000 is the usual proof; a node that accepts the association but not the Verification SOP class
  answers too (it would take our C-STOREs). A rejected association (our AE title or its called AE title is not
  known there) does not answer, nor does a refused or timed-out connection, a failed TLS handshake, an abort, or
  a C-ECHO status other than success.
- **STOW-RS destination**: where ``stow_url`` ends in ``/studies`` (the usual STOW-RS URL), a QIDO-RS search
  ``GET .../studies?limit=1`` (PS3.18 10.6) with the destination's token: 2xx answers (the server is up and takes
  the token); 401 or 403 does not (the token is refused: deliveries would be rejected too). Any other answer, or
  another URL, is settled by an ``OPTIONS`` request to ``stow_url``: 2xx answers, and so does 405 (the resource
  is there and takes POST only, as a STOW-only endpoint may); any other status does not (404: a wrong URL; 5xx:
  a server in trouble), nor does a network or TLS error.

The export workers (:class:`gateway.export.workers.ExportWorkers`) check every destination at start and, every
``export.check_interval_s``, the destinations that have deliveries given up after retrying; one that answers
gets those deliveries back in the queue (:func:`gateway.export.requeue.revive_destination`).
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass
from typing import Any

import httpx
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway.config import DimseDestination, ExportSettings, StowDestination
from gateway.errors import NotFound, one_line
from gateway.export.destinations import client_ssl_context
from gateway.export.scu import ClosingAE, close_socket, finish_association

__all__ = ["CHECK_TIMEOUT_S", "DestinationCheck", "check_destination"]

#: The longest a check waits for a connection or an answer (less when ``export.timeout_s`` is shorter).
CHECK_TIMEOUT_S = 10.0
_ANSWERS_OPTIONS = 405  # Method Not Allowed: the resource is there, and takes POST only
_REFUSED = frozenset({401, 403})  # the credentials are refused: deliveries would be rejected too
_DETAIL_MAX = 300


@dataclass(frozen=True)
class DestinationCheck:
    """What a check of one destination found.

    Attributes
    ----------
    name
        The destination's name (a key of ``export.destinations``).
    ok
        Whether it answers (see the module docstring for what that means for each kind of destination).
    detail
        What was found, in one line (e.g. ``"C-ECHO answered, status 0x0000"``, ``"unreachable: [Errno 111]
        Connection refused"``).
    at
        When the check began (seconds since the epoch).
    seconds
        How long it took.
    """

    name: str
    ok: bool
    detail: str
    at: float
    seconds: float


def check_destination(settings: ExportSettings, name: str) -> DestinationCheck:
    """Check whether destination ``name`` of ``settings`` answers now (a C-ECHO, or an HTTP OPTIONS/QIDO-RS GET).

    Parameters
    ----------
    settings
        The ``export`` settings: the destination, our calling AE title, the timeout.
    name
        The destination to check.

    Returns
    -------
    DestinationCheck
        ``ok`` and a one-line ``detail``; a network failure is ``ok=False`` with the reason, never an exception.

    Raises
    ------
    gateway.errors.NotFound
        If ``name`` is not a configured destination.
    """
    destination = settings.destinations.get(name)
    if destination is None:
        raise NotFound(f"no export destination {name!r}")
    timeout = min(settings.timeout_s, CHECK_TIMEOUT_S)
    at, started = time.time(), time.monotonic()
    try:
        if isinstance(destination, DimseDestination):
            ok, detail = _echo(destination, settings.calling_ae_title, timeout)
        else:
            ok, detail = _http(destination, timeout)
    except (OSError, ValueError, RuntimeError) as exc:  # TLS files unreadable, a malformed address, ...
        ok, detail = False, f"check failed: {type(exc).__name__}: {exc}"
    return DestinationCheck(name, ok, one_line(detail, _DETAIL_MAX), at, time.monotonic() - started)


def _echo(destination: DimseDestination, calling_ae_title: str, timeout: float) -> tuple[bool, str]:
    """A C-ECHO over an association proposing Verification only."""
    ae = ClosingAE(ae_title=calling_ae_title)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    tls = (client_ssl_context(destination.tls), destination.host) if destination.tls else None
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls)
    except OSError as exc:  # the host name does not resolve
        return False, f"unreachable: {type(exc).__name__}: {exc}"
    if not assoc.is_established:
        close_socket(assoc)
        return _not_established(assoc, destination, timeout)
    if not any(str(cx.abstract_syntax) == Verification for cx in assoc.accepted_contexts):
        finish_association(assoc)
        return True, "association accepted (Verification not supported, so no C-ECHO)"
    status: Any = None
    try:
        status = assoc.send_c_echo()
    finally:
        finish_association(assoc, broken=status is None or "Status" not in status)
    if status is None or "Status" not in status:
        return False, "no answer to the C-ECHO (association aborted or timed out)"
    code = int(status.Status)
    return code == 0x0000, f"C-ECHO answered, status 0x{code:04X}"


def _not_established(assoc: Any, destination: DimseDestination, timeout: float) -> tuple[bool, str]:
    """Why no association was established: rejected (with the reason), or unreachable; a node that accepted it
    but not the Verification context (pynetdicom then aborts it) answers."""
    if assoc.is_rejected:
        rsp = getattr(assoc.acceptor, "primitive", None)
        if rsp is None:
            return False, "association rejected (no details)"
        return False, f"association rejected ({rsp.result_str}, source: {rsp.source_str}, reason: {rsp.reason_str})"
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        return True, "association accepted (Verification not supported, so no C-ECHO)"
    return False, f"unreachable: {_tcp_probe(destination.host, destination.port, timeout)}"


def _tcp_probe(host: str, port: int, timeout: float) -> str:
    """What a plain TCP connection to the node says (the operating system's reason), for the check's detail."""
    try:
        with contextlib.closing(socket.create_connection((host, port), timeout=timeout)):
            return "the connection was accepted, but the association was aborted or timed out"
    except OSError as exc:
        return str(exc) or type(exc).__name__


def _http(destination: StowDestination, timeout: float) -> tuple[bool, str]:
    """A QIDO-RS search of ``.../studies?limit=1`` where ``stow_url`` ends in ``/studies``, then an ``OPTIONS``
    request to ``stow_url`` unless the search settled it."""
    headers = {"Accept": "application/dicom+json"}
    if destination.token is not None:
        headers["Authorization"] = f"Bearer {destination.token.get_secret_value()}"
    verify: Any = client_ssl_context(destination.tls) if destination.tls else True
    url = destination.stow_url.rstrip("/")
    searched = ""
    try:
        with httpx.Client(timeout=timeout, headers=headers, verify=verify, follow_redirects=False) as client:
            if url.endswith("/studies"):
                qido = _status(client, "GET", url, params={"limit": "1"})
                if 200 <= qido < 300:
                    return True, f"HTTP {qido} to a QIDO-RS search"
                if qido in _REFUSED:
                    return False, f"HTTP {qido} to a QIDO-RS search: the token is refused"
                searched = f", HTTP {qido} to a QIDO-RS search"
            options = _status(client, "OPTIONS", destination.stow_url)
    except httpx.HTTPError as exc:
        return False, f"unreachable: {type(exc).__name__}: {exc}"
    ok = 200 <= options < 300 or options == _ANSWERS_OPTIONS
    return ok, f"HTTP {options} to OPTIONS{searched}"


def _status(client: httpx.Client, method: str, url: str, **kwargs: Any) -> int:
    """The status of a request whose body is never read (a misbehaving server cannot send us much)."""
    with client.stream(method, url, **kwargs) as response:
        return response.status_code
