"""``GET /metrics``: the gateway's Prometheus metrics in the text exposition format (:mod:`gateway.metrics`).

It needs the ``read`` scope, like the rest of the API: give Prometheus a token with that scope
(``authorization: {credentials: ...}`` in its scrape config), or scrape from loopback where ``http.anonymous_read``
allows it.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from gateway.api.auth import require_scope
from gateway.metrics import CONTENT_TYPE, GatewayMetrics

router = APIRouter(tags=["health"], dependencies=[Depends(require_scope("read"))])


def metrics_of(request: Request) -> GatewayMetrics | None:
    """The running gateway's metrics; ``None`` in an app without a gateway (e.g. one built for a test)."""
    metrics = getattr(getattr(request.app.state, "gateway", None), "metrics", None)
    return metrics if isinstance(metrics, GatewayMetrics) else None


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text exposition format."}},
)
async def metrics(request: Request) -> Response:
    """Counters and histograms since the gateway started, and gauges read from the index now."""
    found = metrics_of(request)
    if found is None:
        return Response("no running gateway\n", status_code=503, media_type="text/plain")
    body = await run_in_threadpool(found.render)  # reads the index: off the event loop
    return Response(body, media_type=CONTENT_TYPE)
