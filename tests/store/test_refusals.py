"""The index's memory of instances refused for want of resources: recorded once, counted by the series' open or
held revision, cleared by the instance's arrival in the same transaction as its row."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from gateway.config import StoreSettings
from gateway.ingest.completion import complete_quiet_series
from gateway.store.index import RefusedInstance, SeriesRevision
from gateway.store.store import InstanceStore

from dicom_files import minimal_ct

SERIES = "1.2.826.0.1.3680043.8.498.9.1"


def state(store: InstanceStore) -> tuple[str, int, int, set[str]]:
    with store.sessions() as session:
        (rev,) = session.scalars(select(SeriesRevision))
        refused = set(session.scalars(select(RefusedInstance.sop_instance_uid)))
        return rev.state, rev.instance_count, rev.refused_count, refused


def test_refusals_are_counted_once_by_the_open_or_held_revision_and_cleared_on_arrival(tmp_path: Path) -> None:
    files = [minimal_ct(tmp_path / f"{i}.dcm", SeriesInstanceUID=SERIES) for i in range(3)]
    uids = [str(dcmread(f).SOPInstanceUID) for f in files]
    store = InstanceStore(StoreSettings(data_dir=tmp_path / "data", min_free_bytes=0))
    try:
        store.put(Path(shutil.copy(files[0], tmp_path / "a.part")), source="test", now=0.0)
        assert store.record_refusal(SERIES, uids[1], "free disk space is below the watermark", now=1.0)
        assert not store.record_refusal(SERIES, uids[1], "refused again", now=2.0), "a retry refused again"
        assert not store.record_refusal(SERIES, uids[0], "already stored", now=2.0), "the series lacks nothing"
        assert state(store) == ("open", 1, 1, {uids[1]})
        complete_quiet_series(store.write_sessions, 10, now=100.0)
        assert state(store)[0] == "held"
        assert store.record_refusal(SERIES, uids[2], "disk full while storing", now=101.0)
        assert state(store) == ("held", 1, 2, {uids[1], uids[2]}), "a held revision counts refusals too"
        store.put(Path(shutil.copy(files[1], tmp_path / "b.part")), source="test", now=102.0)
        assert state(store) == ("open", 2, 2, {uids[2]}), "the arrival reopens it and clears its own refusal"
    finally:
        store.close()
