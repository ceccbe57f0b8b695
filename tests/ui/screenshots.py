"""Screenshots of the UI's pages over a data folder: ``python tests/ui/screenshots.py DATA_DIR OUT_DIR``.

The data folder is copied first (the original is not touched), given a few example jobs beside its own (one that
failed to deliver, one whose results had no destination, one skipped, one waiting: :func:`add_examples`), and
served by a live gateway configured as the tests configure one (:data:`peers.ADMIN_TOKEN` as its admin token) with
two DIMSE destinations, one that answers (DCMTK ``storescp``, when installed) and one that does not. Chromium signs
in with the form and saves each page.
"""

from __future__ import annotations

import copy
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from sqlalchemy import select  # noqa: E402

from gateway.config import DimseDestination, ExportSettings, JobsSettings  # noqa: E402
from gateway.store.index import Delivery, Job  # noqa: E402
from gateway.store.store import InstanceStore  # noqa: E402

from browser import new_page, open_browser, shoot, sign_in  # noqa: E402
from conftest import LiveServer, make_settings  # noqa: E402
from peers import ADMIN_TOKEN, StoreSCP, dcmtk_tool, free_port  # noqa: E402
from ui_data import add_delivery, add_job  # noqa: E402

PAGES = {
    "overview": "/ui",
    "jobs": "/ui/jobs",
    "job": "/ui/jobs/1",
    "job-failed": "/ui/jobs/2",
    "results": "/ui/jobs/1/results",
    "studies": "/ui/studies",
    "models": "/ui/models",
    "destinations": "/ui/destinations",
    "login": "/ui/login",
    "docs": "/docs",
}


def add_examples(store: InstanceStore, now: float) -> None:
    """Example jobs beside the folder's first one, with its detail as their model: failed to deliver, delivered
    nowhere, skipped, waiting."""
    with store.sessions() as session:
        model = session.scalar(select(Job.detail).where(Job.id == 1)) or {}
    failed = copy.deepcopy(model)
    failed["timings"] = {**failed.get("timings", {}), "export_s": 86400.0}
    failed["failure"] = {"stage": "export", "reason": "4 deliveries to archive given up after 24 h: connection refused"}
    job = add_job(
        store, state="failed", detail=failed, description="Thorax 1.0 B70f", created_at=now - 90000, finished_at=now
    )
    for _ in range(4):
        row = add_delivery(store, job, state="dead", destination="archive")
        with store.write_sessions.begin() as session:
            delivery = session.get(Delivery, row)
            assert delivery is not None
            delivery.attempts, delivery.last_error = 17, "connection refused (127.0.0.1)"
            delivery.history = [
                {"at": now - 90000 + 600 * i, "outcome": "failed", "status": None, "reason": "connection refused"}
                for i in range(3)
            ]
    nowhere = copy.deepcopy(model)
    nowhere["export"] = {"undelivered": True, "reason": "calling AE CT_SCANNER_2 has no destination (unmapped: drop)"}
    add_job(
        store, state="exported", detail=nowhere, description="Chest low dose", created_at=now - 3000, finished_at=now
    )
    skipped: dict[str, Any] = {
        "timings": {"assemble_s": 0.4},
        "inference": {
            "routing": [
                {
                    "model": "ct-nodule-unet@1.1.0",
                    "run": False,
                    "reason": "Modality MR is not one of CT",
                    "checks": [{"rule": "modality", "passed": False, "detail": "Modality MR is not one of CT"}],
                }
            ],
            "results": [],
            "failures": [],
        },
    }
    add_job(store, state="skipped", detail=skipped, modality="MR", description="t2_tse_tra", created_at=now - 600)
    waiting = {"created_at": now - 20, "last_received_at": now - 25, "completed_at": now - 20}
    add_job(store, state="received", description="Abdomen venous", **waiting)


def take(data_dir: Path, out: Path, pages: dict[str, str] = PAGES) -> list[Path]:
    """Serve a copy of ``data_dir`` with the examples, and save a screenshot of each page in ``out``."""
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        folder = Path(tmp) / "data"
        shutil.copytree(data_dir, folder)
        destinations = {"archive": DimseDestination(ae_title="ARCHIVE", host="127.0.0.1", port=free_port())}
        if dcmtk_tool("storescp") is not None:
            scp = stack.enter_context(StoreSCP(Path(tmp) / "scp", aet="PACS"))
            destinations["pacs"] = DimseDestination(ae_title="PACS", host="127.0.0.1", port=scp.port)
        export = ExportSettings(destinations=destinations, default=["pacs"] if "pacs" in destinations else [])
        settings = make_settings(folder, export=export, jobs=JobsSettings(workers=0))
        server = stack.enter_context(LiveServer(settings))
        add_examples(server.app.state.store, time.time())
        for name in destinations:
            server.app.state.gateway.export.check_now(name)
        browser = stack.enter_context(open_browser())
        page = stack.enter_context(new_page(browser, server.url))
        sign_in(page, ADMIN_TOKEN)
        saved = []
        for name, path in pages.items():
            png = out / f"{name}.png"
            shoot(page, path, png)
            saved.append(png)
        return saved


if __name__ == "__main__":
    for png in take(Path(sys.argv[1]), Path(sys.argv[2])):
        print(png)
