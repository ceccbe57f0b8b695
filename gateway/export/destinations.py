"""Export destinations: which ones a series' results go to, and the sender that talks to each.

A sender takes a batch of claimed deliveries for one destination and reports an :class:`Outcome` for each item
it attempted, as soon as that item's answer is in (so that a success is committed before the next item is
sent). Items it never reports were not attempted (the worker is stopping, or the association was lost first):
they go back to the queue without counting an attempt.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.config import ClientTLSSettings, ExportSettings
from gateway.export.outcome import Item, Outcome

#: The callback a sender reports each attempted item's outcome to.
Report = Callable[[Item, Outcome], None]

_DIMSE_SOURCE = "dimse:"


class Sender(Protocol):
    """Sends batches to one destination (thread-safe: workers may send batches at the same time)."""

    def send(self, items: Sequence[Item], report: Report, stopping: Callable[[], bool]) -> None:
        """Send ``items``, calling ``report`` once per attempted item; stop early when ``stopping()`` is true."""

    def close(self) -> None:
        """Release connections held between batches."""


def destinations_for(settings: ExportSettings, source: str) -> list[str]:
    """The destinations of the results of a series received from ``source``, in order, each once.

    Parameters
    ----------
    settings
        The ``export`` settings.
    source
        :attr:`gateway.store.index.Instance.source` of the series: ``dimse:<calling AE title>`` (its results
        also go to ``return_to_sender[<calling AE title>]`` when configured) or ``stow`` (only the defaults).
    """
    names: list[str] = []
    if source.startswith(_DIMSE_SOURCE):
        back = settings.return_to_sender.get(source[len(_DIMSE_SOURCE) :].strip())
        if back is not None:
            names.append(back)
    names.extend(settings.default)
    return list(dict.fromkeys(names))


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
