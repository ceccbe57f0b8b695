"""The C-STORE sender of the export queue: one association per batch, files sent as stored (PS3.4 Annex B).

The association proposes exactly the presentation contexts the batch needs, one per (SOP class, transfer
syntax) of its files, so each file goes in its own transfer syntax (never transcoded). A file whose context the
destination rejects because it does not support the SOP class (result 0x03, abstract syntax not supported; also
when it rejects every context of the association) or that answers C-STORE status 0x0122 is ``refused``: the
others go on. Any other rejection of its context (transfer syntax not supported, user or provider rejection) is
dead; each reason names the SOP class, the transfer syntax and the rejection. A rejected or failed association,
an abort or a timeout is a network fault and is retried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from gateway.config import DimseDestination
from gateway.export.destinations import Report, client_ssl_context
from gateway.export.outcome import Item, Kind, Outcome, dimse_outcome, sop_class_text
from gateway.export.scu import ClosingAE, close_socket, finish_association

__all__ = ["DimseSender"]

log = logging.getLogger(__name__)

_MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: at most 128 presentation contexts per association
_CONTEXT_RESULTS = {  # PS3.8 9.3.3.2: why an acceptor rejected a presentation context
    0x01: "rejected by the destination (user rejection)",
    0x02: "rejected by the destination (no reason given)",
    0x03: "rejected: SOP class not supported by the destination",
    0x04: "rejected: transfer syntax not supported by the destination",
}
_ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03  # the one result that says the destination does not take the SOP class
_NO_RESPONSE = "no response (association aborted or timed out)"

Context = tuple[str, str]  # (SOP Class UID, Transfer Syntax UID)


class DimseSender:
    """C-STORE SCU for one destination (thread-safe: each batch has its own AE and association).

    Parameters
    ----------
    destination
        AE title, host, port and optional TLS of the destination.
    calling_ae_title
        Our AE title.
    timeout_s
        TCP connect, association (ACSE), response (DIMSE) and network idle timeout.
    """

    def __init__(self, destination: DimseDestination, *, calling_ae_title: str, timeout_s: float) -> None:
        self.destination = destination
        self.calling_ae_title = calling_ae_title
        self.timeout_s = timeout_s
        self._tls = (client_ssl_context(destination.tls), destination.host) if destination.tls else None

    def send(self, items: Sequence[Item], report: Report, stopping: Callable[[], bool]) -> None:
        """Send ``items`` over one association per 128 presentation contexts, reporting each file's outcome."""
        for batch in _by_contexts(items):
            if stopping():
                return
            self._send_batch(batch, report, stopping)

    def close(self) -> None:
        """Nothing is held between batches."""

    def _associate(self, contexts: set[Context]) -> Any:
        ae = ClosingAE(ae_title=self.calling_ae_title)
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        for sop_class, syntax in sorted(contexts):
            ae.add_requested_context(sop_class, syntax)
        d = self.destination
        return ae.associate(d.host, d.port, ae_title=d.ae_title, tls_args=self._tls)

    def _send_batch(self, items: list[Item], report: Report, stopping: Callable[[], bool]) -> None:
        try:
            assoc = self._associate({_context(item) for item in items})
        except OSError as exc:  # the host name does not resolve: a network fault like any other (retried)
            for item in items:
                report(item, Outcome(Kind.RETRY, f"association failed: {type(exc).__name__}: {exc}"))
            return
        if not assoc.is_established:
            close_socket(assoc)
            for item in items:
                report(item, _refusal(assoc, item))
            return
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        rejected = _rejected(assoc)
        broken = False
        try:
            for item in items:
                if stopping():
                    break
                if _context(item) not in accepted:
                    report(item, _context_refused(item, rejected))
                    continue
                outcome = _store(assoc, item)
                report(item, outcome)
                if outcome.kind is Kind.RETRY and outcome.status is None:
                    broken = True  # the association is gone: the rest go back to the queue unattempted
                    break
        finally:
            finish_association(assoc, broken=broken)


def _context(item: Item) -> Context:
    return (item.sop_class_uid, item.transfer_syntax_uid)


def _by_contexts(items: Sequence[Item]) -> Iterator[list[Item]]:
    """Split ``items`` so that each batch needs at most 128 presentation contexts."""
    batch: list[Item] = []
    contexts: set[Context] = set()
    for item in items:
        if _context(item) not in contexts and len(contexts) == _MAX_CONTEXTS:
            yield batch
            batch, contexts = [], set()
        contexts.add(_context(item))
        batch.append(item)
    if batch:
        yield batch


def _rejected(assoc: Any) -> dict[Context, int | None]:
    """The result of each rejected context, keyed by what we proposed (we propose one transfer syntax a context).

    The context is found by its ID: the transfer syntax an acceptor puts in the answer to a rejected context is
    not significant (PS3.8 9.3.3.2; DCMTK answers implicit VR little endian whatever was proposed).
    """
    proposed = {
        cx.context_id: (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        for cx in assoc.requestor.requested_contexts
        if cx.transfer_syntax
    }
    return {proposed.get(cx.context_id, (str(cx.abstract_syntax), "")): cx.result for cx in assoc.rejected_contexts}


def _refusal(assoc: Any, item: Item) -> Outcome:
    """Why no association was established: every context rejected (as each says), else a network fault (retried)."""
    if assoc.rejected_contexts and not assoc.accepted_contexts and not assoc.is_rejected:
        return _context_refused(item, _rejected(assoc))
    if assoc.is_rejected:
        rsp = getattr(assoc.acceptor, "primitive", None)
        detail = (
            f"{rsp.result_str}, source: {rsp.source_str}, reason: {rsp.reason_str}" if rsp is not None else "no details"
        )
        return Outcome(Kind.RETRY, f"association rejected ({detail})")
    return Outcome(Kind.RETRY, "association failed: destination unreachable, or it aborted or timed out")


def _context_refused(item: Item, rejected: dict[Context, int | None]) -> Outcome:
    """A rejected presentation context: ``refused`` for an unsupported SOP class, else dead."""
    result = rejected.get(_context(item)) or 0x02
    why = _CONTEXT_RESULTS.get(result, _CONTEXT_RESULTS[0x02])
    text = (
        f"presentation context for SOP class {sop_class_text(item.sop_class_uid)} "
        f"in transfer syntax {item.transfer_syntax_uid} {why}"
    )
    return Outcome(Kind.REFUSED if result == _ABSTRACT_SYNTAX_NOT_SUPPORTED else Kind.DEAD, text)


def _store(assoc: Any, item: Item) -> Outcome:
    """One C-STORE; an exception with the association still up is a problem of the file (dead)."""
    try:
        status = assoc.send_c_store(item.path)
    except Exception as exc:  # a vanished or unreadable file, or an association lost while sending
        if not assoc.is_established:
            return Outcome(Kind.RETRY, f"association lost while sending: {type(exc).__name__}")
        return Outcome(Kind.DEAD, f"the output file cannot be sent: {type(exc).__name__}: {exc}")
    if "Status" not in status:
        return Outcome(Kind.RETRY, _NO_RESPONSE)
    return dimse_outcome(int(status.Status), str(status.get("ErrorComment", "")), sop_class_uid=item.sop_class_uid)
