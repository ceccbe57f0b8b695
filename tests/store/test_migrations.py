"""The index's schema revisions (gateway.store.migrations), run by every writer engine at start.

A data folder made by gateway 0.1.0 (tests/fixtures/data-folder-0.1.0.tar.gz) upgrades in place when a real
gateway starts on it, with its data intact and its pending exports sent; a fresh folder is created at head; a
database made by a newer gateway is refused. The guard: after the revisions, Alembic's comparison of the database
with ``gateway.store.index.Base.metadata`` finds nothing, on SQLite and on PostgreSQL, so a column added to the
models without a revision fails here.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, func, select, text

from gateway.config import DimseDestination, ExportSettings, ModelsSettings, StoreSettings
from gateway.errors import IndexSchemaError
from gateway.registry.registry import Registry
from gateway.runtime import Gateway
from gateway.store.index import (
    Base,
    Delivery,
    Instance,
    Job,
    ModelVersion,
    Output,
    RemovedModel,
    SeriesRevision,
    make_engine,
)
from gateway.store.migrations import BASELINE, alembic_config, head
from gateway.store.outputs import search_output_series
from gateway.store.query import search_studies
from gateway.store.store import InstanceStore
from gateway.synth.ct import write_synthetic_ct

from conftest import make_settings
from peers import MinimalSCP, free_port

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "data-folder-0.1.0.tar.gz"

# What tests/fixtures/make_data_folder.py put in the 0.1.0 folder.
JOB_ID = 1
DELIVERIES = 4
SLICES = 12


def unpack_0_1_0(dest: Path) -> Path:
    """The 0.1.0 data folder, unpacked under ``dest``; its path."""
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(dest, filter="data")
    return dest / "data"


def sqlite_url(data: Path) -> str:
    return f"sqlite:///{data / 'index.sqlite3'}"


def raw_sql(data: Path, *statements: str) -> None:
    """Run statements on the folder's SQLite index as an outside program would (any schema, no gateway code)."""
    conn = sqlite3.connect(data / "index.sqlite3")
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


def schema_statements(path: Path) -> set[str]:
    """The ``CREATE`` statements of an SQLite database, Alembic's own table left out."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name != 'alembic_version'")
        return {row[0] for row in rows}
    finally:
        conn.close()


def differences(url: str) -> list[Any]:
    """What Alembic's autogenerate finds between the database and the models (types and server defaults too)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_server_default": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def recorded_revision(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.1)


def shipped_adc_dwi(tmp_path: Path) -> Path:
    """A shipped-models folder holding the package whose version the 0.1.0 folder's operator removed."""
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copytree(REPO / "models" / "adc-dwi", shipped / "adc-dwi")
    return shipped


def pacs_export(port: int, *, workers: int) -> ExportSettings:
    """The 0.1.0 folder's export settings: every result to ``pacs`` (its deliveries name it)."""
    pacs = DimseDestination(ae_title="PACS", host="127.0.0.1", port=port)
    return ExportSettings(destinations={"pacs": pacs}, default=["pacs"], workers=workers, poll_s=0.1)


@pytest.fixture
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty index: an SQLite file that does not exist yet, or a fresh PostgreSQL database."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return sqlite_url(tmp_path)


both_backends = pytest.mark.parametrize("index_url", ["sqlite", "postgresql"], indirect=True)


# ---------------------------------------------------------------------------------------------- the baseline


def test_baseline_is_the_schema_0_1_0_made(tmp_path: Path) -> None:
    data = unpack_0_1_0(tmp_path / "old")
    fresh = tmp_path / "baseline.sqlite3"
    engine = create_engine(f"sqlite:///{fresh}")
    with engine.begin() as conn:
        command.upgrade(alembic_config(connection=conn), BASELINE)
    engine.dispose()
    assert schema_statements(fresh) == schema_statements(data / "index.sqlite3")


# ------------------------------------------------------------------------------- the 0.1.0 folder at start


def test_0_1_0_folder_upgrades_in_place_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = unpack_0_1_0(tmp_path)
    assert recorded_revision(sqlite_url(data)) is None
    models = ModelsSettings(register_shipped=True, shipped_dir=shipped_adc_dwi(tmp_path))
    settings = make_settings(data, models=models, export=pacs_export(free_port(), workers=0))  # nothing sent yet
    caplog.set_level(logging.INFO, logger="gateway.store.index")
    gateway = Gateway(settings)
    gateway.start()
    try:
        assert f"index schema upgraded from {BASELINE} to {head()}" in caplog.messages
        with gateway.store.sessions() as session:
            job = session.get(Job, JOB_ID)
            assert job is not None
            assert (job.state, job.attempts, job.lease_owner, job.finished_at) == ("encoded", 0, None, None)
            deliveries = session.scalars(select(Delivery).where(Delivery.job_id == JOB_ID)).all()
            assert [d.state for d in deliveries] == ["pending"] * DELIVERIES
            assert all((data / d.path).is_file() for d in deliveries)
            instances = session.scalars(select(Instance)).all()
            assert len(instances) == SLICES
            assert all(gateway.store.path_of(i.path).is_file() for i in instances)
            revision = session.scalars(select(SeriesRevision)).one()
            assert (revision.state, revision.instance_count, revision.refused_count) == ("complete", SLICES, 0)
            assert session.get(RemovedModel, ("adc-dwi", "1.0.0")) is not None
        (model,) = gateway.registry.list()  # the shipped adc-dwi stayed removed: its tombstone holds
        assert (model.ref, model.enabled, model.active) == ("ct-tissue@1.0.0", True, True)
        assert model.folder.joinpath("model.yaml").is_file()
    finally:
        gateway.stop()
    assert recorded_revision(sqlite_url(data)) == head()
    assert differences(sqlite_url(data)) == []


def test_0_1_0_pending_deliveries_are_sent_after_the_upgrade(tmp_path: Path) -> None:
    data = unpack_0_1_0(tmp_path)
    raw_sql(data, "UPDATE deliveries SET next_attempt_at = 0")  # their backoff has run out
    with MinimalSCP(tmp_path / "pacs", aet="PACS") as pacs:
        gateway = Gateway(make_settings(data, export=pacs_export(pacs.dicom_port, workers=1)))
        gateway.start()
        try:

            def exported() -> bool:
                with gateway.store.sessions() as session:
                    job = session.get(Job, JOB_ID)
                    return job is not None and job.state == "exported"

            wait_for(exported, "job 1 exported")
            with gateway.store.sessions() as session:
                states = session.scalars(select(Delivery.state).where(Delivery.job_id == JOB_ID)).all()
        finally:
            gateway.stop()
        assert states == ["delivered"] * DELIVERIES
        assert len(list(pacs.outdir.glob("*.dcm"))) == DELIVERIES


def test_revision_0002_dates_jobs_already_finished(tmp_path: Path) -> None:
    data = unpack_0_1_0(tmp_path)
    raw_sql(data, "UPDATE jobs SET state = 'failed', updated_at = 1234.5")
    make_engine(sqlite_url(data), writer=True).dispose()
    engine = create_engine(sqlite_url(data))
    with engine.connect() as conn:
        row = conn.execute(text("SELECT state, finished_at, attempts FROM jobs")).one()
    engine.dispose()
    assert tuple(row) == ("failed", 1234.5, 0)


def test_revision_0003_indexes_the_outputs_written_before(tmp_path: Path) -> None:
    data = unpack_0_1_0(tmp_path)
    make_engine(sqlite_url(data), writer=True).dispose()
    store = InstanceStore(StoreSettings(data_dir=data, min_free_bytes=0))
    try:
        with store.sessions() as session:
            rows = session.scalars(select(Output).order_by(Output.path)).all()
            series = search_output_series(session, {})
            (study,) = search_studies(session, {})
    finally:
        store.close()
    assert len(rows) == DELIVERIES and {row.job_id for row in rows} == {JOB_ID}
    for row in rows:  # what the files say
        header = pydicom.dcmread(data / row.path, stop_before_pixels=True)
        assert (row.sop_instance_uid, row.series_instance_uid) == (header.SOPInstanceUID, header.SeriesInstanceUID)
        assert (row.study_instance_uid, row.modality) == (header.StudyInstanceUID, header.Modality)
        assert (row.sop_class_uid, row.instance_number) == (header.SOPClassUID, header.InstanceNumber)
        assert row.transfer_syntax_uid == header.file_meta.TransferSyntaxUID
    assert sorted(str(m.attributes["Modality"]) for m in series) == ["KO", "PR", "SEG", "SR"]
    assert {m.study_instance_uid for m in series} == {study.study_instance_uid}


def test_revision_0003_gives_a_shared_uid_to_the_last_job_and_leaves_out_purged_outputs(tmp_path: Path) -> None:
    data = unpack_0_1_0(tmp_path)
    conn = sqlite3.connect(data / "index.sqlite3")
    try:
        (detail,) = conn.execute("SELECT detail FROM jobs").fetchone()
        purged = json.dumps({**json.loads(detail), "retention": {"outputs_purged_at": 1.0}})
        for n, job_detail in ((2, detail), (3, purged)):  # the series processed again, listing the same objects
            conn.execute(
                "INSERT INTO series_revisions (id, series_instance_uid, revision, state, first_received_at, "
                "last_received_at, completed_at, instance_count) "
                "SELECT ?, series_instance_uid, ?, 'complete', 2.0, 2.0, 2.0, instance_count FROM series_revisions "
                "WHERE id = 1",
                (n, n),
            )
            conn.execute(
                "INSERT INTO jobs (id, revision_id, study_instance_uid, series_instance_uid, state, created_at, "
                "updated_at, detail) SELECT ?, ?, study_instance_uid, series_instance_uid, 'exported', 2.0, 2.0, ? "
                "FROM jobs WHERE id = 1",
                (n, n, job_detail),
            )
        conn.commit()
    finally:
        conn.close()
    make_engine(sqlite_url(data), writer=True).dispose()
    engine = create_engine(sqlite_url(data))
    with engine.connect() as c:
        owners = c.execute(text("SELECT job_id, count(*) FROM outputs GROUP BY job_id")).all()
    engine.dispose()
    assert [tuple(row) for row in owners] == [(2, DELIVERIES)], "job 3's outputs were purged: not listed"


# --------------------------------------------------------------------------------------- other databases


def test_fresh_folder_is_created_at_head(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    caplog.set_level(logging.INFO, logger="gateway.store.index")
    gateway = Gateway(make_settings(data))
    gateway.start()
    gateway.stop()
    assert f"index schema created at revision {head()}" in caplog.messages
    caplog.clear()
    gateway = Gateway(make_settings(data))  # at head already: nothing to do, nothing logged
    gateway.start()
    gateway.stop()
    assert not [m for m in caplog.messages if m.startswith("index schema")]
    assert recorded_revision(sqlite_url(data)) == head()


def test_a_newer_gateways_index_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    make_engine(sqlite_url(data), writer=True).dispose()
    raw_sql(data, "UPDATE alembic_version SET version_num = '9999'")
    before = schema_statements(data / "index.sqlite3")
    with pytest.raises(IndexSchemaError, match=rf"revision 9999\b.*revision {head()}\b"):
        Gateway(make_settings(data))
    assert schema_statements(data / "index.sqlite3") == before
    assert recorded_revision(sqlite_url(data)) == "9999"


def test_a_failed_upgrade_changes_nothing(tmp_path: Path) -> None:
    data = unpack_0_1_0(tmp_path)
    raw_sql(data, "ALTER TABLE models ADD COLUMN changed_at FLOAT")  # revision 0002 adds it: it fails midway
    before = schema_statements(data / "index.sqlite3")
    with pytest.raises(IndexSchemaError, match=f"upgrade from {BASELINE} to {head()}.*duplicate column"):
        make_engine(sqlite_url(data), writer=True)
    assert schema_statements(data / "index.sqlite3") == before  # the stamp and the columns added before: gone
    assert recorded_revision(sqlite_url(data)) is None


def test_some_of_the_0_1_0_tables_without_a_revision_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    raw_sql(data, "CREATE TABLE studies (study_instance_uid VARCHAR(64) PRIMARY KEY)")
    with pytest.raises(IndexSchemaError, match="lacks deliveries, instances, jobs"):
        make_engine(sqlite_url(data), writer=True)


# ------------------------------------------------------------------------------------------------- the guard


@both_backends
def test_revisions_make_exactly_the_models_schema(index_url: str) -> None:
    make_engine(index_url, writer=True).dispose()
    assert recorded_revision(index_url) == head()
    assert differences(index_url) == []


@both_backends
def test_revisions_downgrade_and_upgrade_again(index_url: str) -> None:
    make_engine(index_url, writer=True).dispose()
    engine = create_engine(index_url)
    with engine.begin() as conn:
        command.downgrade(alembic_config(connection=conn), "base")
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() is None
    engine.dispose()
    make_engine(index_url, writer=True).dispose()
    assert differences(index_url) == []


_START = """
import logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
from gateway.store.index import make_engine
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
make_engine(sys.argv[1], writer=True).dispose()
"""


@both_backends
def test_processes_starting_at_once_migrate_once(index_url: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", _START, index_url, str(go)], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    time.sleep(1.0)  # let them import; they wait for the go file
    go.touch()
    logs = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], logs
    created = [log for log in logs if f"index schema created at revision {head()}" in log]
    assert len(created) == 1, logs
    assert differences(index_url) == []


# -------------------------------------------------------------------------------------- PostgreSQL as index


@pytest.fixture
def pg_gateway(tmp_path: Path, postgres_url: str) -> Iterator[Gateway]:
    store = StoreSettings(data_dir=tmp_path / "data", min_free_bytes=0, database_url=postgres_url)
    gateway = Gateway(make_settings(tmp_path / "data", store=store))
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def test_a_gateway_runs_on_postgresql(pg_gateway: Gateway, tmp_path: Path) -> None:
    store: InstanceStore = pg_gateway.store
    assert store.engine.dialect.name == "postgresql"
    series = tmp_path / "ct"
    write_synthetic_ct(series, 8, rows=32, columns=32, seed=1)
    files = sorted(series.glob("*.dcm"))
    again = tmp_path / "again.dcm"
    shutil.copyfile(files[0], again)
    for path in files:
        assert not store.put(path, source="dimse:" + "A" * 70).duplicate  # cut to its column: VARCHAR(64)
    assert store.put(again, source="test").duplicate

    def job_made() -> bool:
        with store.sessions() as session:
            return session.scalar(select(func.count()).select_from(Job)) == 1

    wait_for(job_made, "the completed series' job")
    with store.sessions() as session:
        job = session.scalars(select(Job)).one()
        assert (job.state, job.attempts) == ("received", 0)
        assert session.scalars(select(SeriesRevision.instance_count)).one() == len(files)
        for filters in ({"PatientName": "synth^*"}, {"ModalitiesInStudy": "C?"}, {"StudyDate": "19000101-"}):
            assert len(search_studies(session, filters)) == 1, filters  # ILIKE, LIKE and ranges on PostgreSQL
        assert search_studies(session, {"ModalitiesInStudy": "c?"}) == []


def test_the_registry_on_postgresql(pg_gateway: Gateway, tmp_path: Path) -> None:
    registry = Registry(pg_gateway.store, dry_run=None)
    model = registry.register(REPO / "models" / "ct-tissue")
    assert (model.enabled, model.active) == (True, True)
    with pg_gateway.store.sessions() as session:
        row = session.scalars(select(ModelVersion)).one()
        assert row.manifest["name"] == "ct-tissue"  # JSON round trip
        assert (row.enabled, row.active, row.pinned) == (True, True, False)
    registry.remove("ct-tissue@1.0.0")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copytree(REPO / "models" / "ct-tissue", shipped / "ct-tissue")
    assert registry.register_shipped(shipped) == []  # the tombstone holds on PostgreSQL too
