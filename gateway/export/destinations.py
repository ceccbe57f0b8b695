"""Export destinations: which ones a series' results go to, which kinds of result each takes, and the sender
that talks to each.

Each destination takes the kinds of result its ``send`` setting lists (:data:`gateway.config.OutputKind`); an
output file's kind comes from its SOP Class UID (:func:`output_kind`), and a file of no known kind goes to every
destination.

The results of a C-STORE caller go to ``return_to_sender[<calling AE title>]`` and to ``default``; those of a
caller that ``return_to_sender`` does not map go where ``export.unmapped`` says (:func:`destinations_for`):

- ``default`` (the default): to ``default`` only;
- ``drop``: nowhere, on purpose;
- ``hold``: nowhere for now. The job ends ``exported``, flagged undelivered with the reason "held: caller X is
  not mapped ...", and its output files are remembered (``detail.export.held``). Once the operator maps the
  caller in ``return_to_sender`` (or sets ``unmapped: default``) and restarts the gateway, the export workers'
  start queues the held results to where they now go (:func:`gateway.export.requeue.release_held`); a re-run
  of the job from assembly routes it afresh too.

Whichever way, a job whose results reach no destination is never silent: it is flagged ``undelivered`` with a
one-line reason, logged at WARNING and counted (:func:`gateway.export.queue.enqueue`).

A sender takes a batch of claimed deliveries for one destination and reports an :class:`Outcome` for each item
it attempted, as soon as that item's answer is in (so that a success is committed before the next item is
sent). Items it never reports were not attempted (the worker is stopping, or the association was lost first):
they go back to the queue without counting an attempt.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

from pydicom.uid import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from gateway.config import ClientTLSSettings, ExportSettings, OutputKind
from gateway.export.outcome import Item, Outcome

#: Why a job's results went nowhere when no destination is configured for them.
NO_DESTINATION = "no destination configured"

#: The callback a sender reports each attempted item's outcome to.
Report = Callable[[Item, Outcome], None]

_DIMSE_SOURCE = "dimse:"

#: Label Map Segmentation Storage (PS3.4 B.5, added in 2024); pydicom 3.0 has no constant for it yet.
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"

#: The kind of result of each SOP class the gateway writes, or a destination may refuse (PS3.4 B.5).
_KINDS: dict[str, OutputKind] = {
    SegmentationStorage: "seg",
    LABEL_MAP_SEGMENTATION_STORAGE: "seg",
    Comprehensive3DSRStorage: "sr",
    ComprehensiveSRStorage: "sr",
    EnhancedSRStorage: "sr",
    BasicTextSRStorage: "sr",
    KeyObjectSelectionDocumentStorage: "ko",
    ParametricMapStorage: "pm",
    GrayscaleSoftcopyPresentationStateStorage: "gsps",
    SecondaryCaptureImageStorage: "sc",
    MultiFrameSingleBitSecondaryCaptureImageStorage: "sc",
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage: "sc",
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage: "sc",
    MultiFrameTrueColorSecondaryCaptureImageStorage: "sc",
}


class Sender(Protocol):
    """Sends batches to one destination (thread-safe: workers may send batches at the same time)."""

    def send(self, items: Sequence[Item], report: Report, stopping: Callable[[], bool]) -> None:
        """Send ``items``, calling ``report`` once per attempted item; stop early when ``stopping()`` is true."""

    def close(self) -> None:
        """Release connections held between batches."""


def output_kind(sop_class_uid: str) -> OutputKind | None:
    """The kind of result an output file of SOP class ``sop_class_uid`` is, or ``None`` for any other class.

    Segmentation and Label Map Segmentation are ``seg``; Comprehensive 3D, Comprehensive, Enhanced and Basic Text
    SR are ``sr``; Key Object Selection Document is ``ko``; Parametric Map is ``pm``; Grayscale Softcopy
    Presentation State is ``gsps``; Secondary Capture and the four multi-frame Secondary Capture classes are ``sc``.
    """
    return _KINDS.get(sop_class_uid.strip("\0 "))


class Routing(dict[str, frozenset[OutputKind]]):
    """Destination name -> the kinds of result it takes, in the order the results go out (what
    :func:`gateway.export.queue.enqueue` takes), and, when it is empty, why.

    Parameters
    ----------
    destinations
        Name -> kinds, in order.
    reason
        Why there is no destination (one line; empty when there is one).
    held_caller
        The calling AE title whose results are held (``export.unmapped: hold``), else ``None``.
    with_inputs
        The research destinations among them (``deidentify`` set): they also get the job's inputs, the instances
        of its series (de-identified at send time: :mod:`gateway.export.deidentify`).
    """

    def __init__(
        self,
        destinations: Mapping[str, frozenset[OutputKind]] | None = None,
        *,
        reason: str = "",
        held_caller: str | None = None,
        with_inputs: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(destinations or {})
        unknown = sorted(with_inputs.difference(self))
        if unknown:
            raise ValueError(f"with_inputs names destinations that are not routed to: {unknown}")
        self.reason = reason
        self.held_caller = held_caller
        self.with_inputs = with_inputs


def destinations_for(settings: ExportSettings, source: str) -> Routing:
    """Where the results of a series received from ``source`` go, in order, each once, with the kinds each takes.

    The results of a C-STORE caller go to ``return_to_sender[<calling AE title>]`` and to ``default``. For a
    caller that ``return_to_sender`` does not map, ``export.unmapped`` decides: ``default`` sends them to
    ``default``; ``drop`` sends them nowhere; ``hold`` sends them nowhere for now and says so (the job ends
    ``exported`` flagged undelivered; once the caller is mapped, or ``unmapped`` is ``default``, the next start
    of the gateway sends them: :func:`gateway.export.requeue.release_held`). STOW-RS input goes to ``default``.
    The research destinations among them (``deidentify`` set) are named in the routing's ``with_inputs``: they get
    the job's inputs too.

    Parameters
    ----------
    settings
        The ``export`` settings.
    source
        :attr:`gateway.store.index.Instance.source` of the series: ``dimse:<calling AE title>`` or ``stow``.

    Returns
    -------
    Routing
        Destination name -> the kinds it takes, in the order the results go out; when empty, its ``reason``
        says why (and ``held_caller`` names a held caller).
    """
    caller = source[len(_DIMSE_SOURCE) :].strip() if source.startswith(_DIMSE_SOURCE) else None
    names: list[str] = []
    if caller is not None and caller in settings.return_to_sender:
        names.append(settings.return_to_sender[caller])
    elif caller is not None and settings.unmapped == "drop":
        return Routing(reason=f"dropped: caller {caller!r} is not mapped in export.return_to_sender (unmapped: drop)")
    elif caller is not None and settings.unmapped == "hold":
        return Routing(reason=held_reason(caller), held_caller=caller)
    names.extend(settings.default)
    routing = {name: frozenset(settings.destinations[name].send) for name in dict.fromkeys(names)}
    if routing:
        research = frozenset(name for name in routing if settings.destinations[name].deidentify is not None)
        return Routing(routing, with_inputs=research)
    if caller is not None and settings.destinations:
        return Routing(reason=f"{NO_DESTINATION}: caller {caller!r} is not mapped and export.default is empty")
    return Routing(reason=NO_DESTINATION)


def for_models(routing: Routing, settings: ExportSettings, models: Collection[str]) -> Routing:
    """``routing`` without the research destinations that take only some models' jobs
    (``deidentify.models``) when none of ``models`` (the names of the models that ran) is among them."""
    ran = set(models)
    kept = {
        name: kinds
        for name, kinds in routing.items()
        if (research := settings.destinations[name].deidentify) is None
        or research.models is None
        or ran.intersection(research.models)
    }
    if len(kept) == len(routing):
        return routing
    if not kept:
        return Routing(reason=f"{NO_DESTINATION}: the research destinations take other models' jobs only")
    return Routing(kept, with_inputs=routing.with_inputs.intersection(kept), held_caller=routing.held_caller)


def held_reason(caller: str) -> str:
    """Why the results of an unmapped ``caller`` are held, and what sends them."""
    return (
        f"held: caller {caller!r} is not mapped in export.return_to_sender; map it (or set export.unmapped: "
        "default) and restart the gateway to send them"
    )


def client_ssl_context(tls: ClientTLSSettings) -> ssl.SSLContext:
    """A client TLS context (TLS 1.2 minimum, server certificate and host name verified).

    Trusts ``tls.ca_bundle`` (the system's authorities when it is not set) and presents ``tls.certificate`` when
    one is configured (mutual TLS).
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_bundle)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certificate is not None and tls.private_key is not None:
        ctx.load_cert_chain(tls.certificate, tls.private_key)
    return ctx
