"""The encode stage on a stored series: every output is written and recorded, also for a resampled series."""

from __future__ import annotations

from pathlib import Path

import pydicom
from sqlalchemy import select

from gateway.assemble.assemble import assemble_series
from gateway.config import ExportSettings
from gateway.infer.runtime import InferenceRuntime
from gateway.ingest.completion import complete_quiet_series
from gateway.jobs.encoding import EncodeStage
from gateway.registry.manifest import load_manifest
from gateway.store.index import Job
from gateway.store.store import InstanceStore
from gateway.synth.ct import synth_ct_datasets

from conftest import make_settings

MODELS = Path(__file__).resolve().parents[2] / "models"

DROP = ()
MOVED = {3: -1.9, 4: -3.8}  # three images 0.6 mm apart, then a gap: the middle one is no slice's nearest


def uneven_series(folder: Path) -> list[Path]:
    """A synthetic CT with a gap and uneven spacing: assembly resamples it onto a uniform grid, on which some source
    images are nobody's nearest slice."""
    folder.mkdir(parents=True)
    _, datasets = synth_ct_datasets(16, 48, 48, seed=3, n_nodules=0)
    paths = []
    for k, ds in enumerate(datasets):
        if k in DROP:
            continue
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(z + MOVED.get(k, 0.0), 6)]
        paths.append(folder / f"CT{k:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def test_a_resampled_series_encodes_on_every_source_image(tmp_path: Path) -> None:
    store = InstanceStore(make_settings(tmp_path / "data").store)
    try:
        for path in uneven_series(tmp_path / "ct"):
            store.put(path, source="test", now=0.0)
        complete_quiet_series(store.write_sessions, 0.0, now=10.0)
        with store.sessions() as session:
            job_id = session.scalars(select(Job.id)).one()
        stored = sorted(store.data_dir.rglob("*.dcm"))
        (volume,) = assemble_series(stored).volumes
        assert volume.resampled and volume.source_planes
        nearest = {ref.sop_instance_uid for ref in volume.slices}
        assert len(nearest) < len(stored), "some image is no slice's nearest: the stage must read it all the same"
        runtime = InferenceRuntime("cpu", batching=False)
        try:
            result = runtime.run(load_manifest(MODELS / "ct-tissue"), MODELS / "ct-tissue", "ab" * 32, volume)
        finally:
            runtime.close()
        encoded = EncodeStage(store, ExportSettings(), tmp_path / "outputs")(job_id, [result])
        assert encoded.destinations == {}, "no destination configured: nothing to send"
        (seg,) = [o for o in encoded.outputs if o["kind"] == "SEG"]
        written = pydicom.dcmread(tmp_path / "outputs" / seg["file"])
        cited = {
            str(source.ReferencedSOPInstanceUID)
            for frame in written.PerFrameFunctionalGroupsSequence
            for derivation in frame.DerivationImageSequence
            for source in derivation.SourceImageSequence
        }
        assert nearest < cited, "frames on images between the grid's slices too"
        assert set(encoded.parts) >= {"seg_s", "sr_s", "write_s"}

        research = {"ae_title": "RESEARCH", "host": "127.0.0.1", "port": 104}
        export = ExportSettings.model_validate(
            {
                "destinations": {
                    "nodules": {**research, "deidentify": {"models": ["ct-nodule-unet"]}},
                    "tissue": {**research, "deidentify": {"models": ["ct-tissue"]}},
                },
                "default": ["nodules", "tissue"],
            }
        )
        routed = EncodeStage(store, export, tmp_path / "outputs-2")(job_id, [result]).destinations
        assert list(routed) == ["tissue"] and routed.with_inputs == {"tissue"}, "only the model that ran: ct-tissue"
    finally:
        store.close()
