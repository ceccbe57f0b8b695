"""A MONAI model-zoo bundle's own pipeline in the gateway, voxel for voxel against the bundle's own evaluator.

The reference is the bundle's ``inference.json`` run as MONAI runs it (``initialize`` then ``run``: its
``SupervisedEvaluator`` with ``LoadImaged``, its inferer, its postprocessing and ``SaveImaged``) on the same series
converted by dcm2niix, with only the dataset, output folder, device (CPU), AMP (off) and loader workers overridden.
The gateway runs the same configs on the assembled volume in memory (``inference.pipeline: bundle``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from tiny_models import CODE, at_once, make_volume, manifest_dict, segment, write_package

from gateway.assemble.assemble import assemble_series
from gateway.assemble.model import Volume
from gateway.assemble.nifti import write_nifti
from gateway.errors import InferenceError, ModelError
from gateway.infer.bundle import build_network
from gateway.infer.bundle_pipeline import build_sections, bundle_notes, decode_output, volume_image
from gateway.infer.runtime import InferenceRuntime
from gateway.registry.dryrun import BUNDLE_VOLUME, dry_run, dry_run_in_child
from gateway.registry.manifest import GENERIC_CATEGORY, GENERIC_TYPE, Manifest
from gateway.synth.ct import write_synthetic_ct

from conftest import SHARED_DATA

SPLEEN = SHARED_DATA / "monai-bundles" / "spleen_ct_segmentation"
WHOLEBODY = Path(__file__).parents[1] / "fixtures" / "monai_bundles" / "wholeBody_ct_segmentation"
with warnings.catch_warnings():  # before MONAI looks for it: pytorch-ignite scripts a function on import
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
    try:
        import ignite  # the bundles' evaluator runs on it
    except ImportError:
        ignite = None

GENERIC = {"category": GENERIC_CATEGORY.model_dump(), "type": GENERIC_TYPE.model_dump()}


@pytest.fixture
def runtime() -> Iterator[InferenceRuntime]:
    rt = InferenceRuntime("cpu")
    yield rt
    rt.close()


def spleen_configs() -> Path:
    if not (SPLEEN / "configs" / "inference.json").is_file():
        pytest.skip(f"the MONAI model-zoo spleen bundle's configs are not at {SPLEEN}")
    return SPLEEN / "configs"


def bundle_package(
    tmp_path: Path, configs: Path, *, trust_code: bool = False, inference: dict[str, Any] | None = None, **outputs: Any
) -> Manifest:
    """A model package whose weights are the bundle folder (configs copied), without models/model.pt yet."""
    package = tmp_path / "package"
    shutil.copytree(configs, package / "bundle" / "configs")
    labels = outputs.pop("labels", [segment(1, "Spleen")])
    return write_package(
        package,
        "monai-bundle",
        "bundle",
        trust_code=trust_code,
        inference={"pipeline": "bundle", **(inference or {})},
        outputs={"segmentation": {"kind": "labelmap", "labels": labels}, **outputs},
    )


def write_weights(bundle: Path, seed: int, volume: Volume | None = None) -> None:
    """``models/model.pt`` from the bundle's own ``network_def``, seeded; for two classes, the last layer's bias
    set so that about half the body is foreground (a segmentation with an edge, not one label everywhere)."""
    torch.manual_seed(seed)
    network = build_network(bundle, trust_code=False).eval()
    if volume is not None:
        sections = build_sections(bundle, trust_code=True)
        image = sections.preprocessing({"image": volume_image(volume)})["image"].as_tensor()[None]
        with torch.inference_mode():  # one window is enough to see where the classes split
            logits = sections.inferer(image[..., :96, :96, :96], network)
        bias = [value for key, value in network.state_dict().items() if key.endswith("bias") and value.shape == (2,)]
        with torch.no_grad():
            bias[-1][1] -= float(torch.median(logits[0, 1] - logits[0, 0]))
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(network.state_dict(), bundle / "models" / "model.pt")


def dcm2niix(series: Path, out: Path) -> Path:
    exe = shutil.which("dcm2niix", path=str(Path(sys.executable).parent)) or shutil.which("dcm2niix")
    if exe is None:
        pytest.skip("dcm2niix not installed (pip install dcm2niix)")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-z", "n", "-f", "ref", "-o", str(out), str(series)], check=True, capture_output=True)
    (nifti,) = out.glob("*.nii")
    return nifti


def bundle_reference(bundle: Path, nifti: Path, out: Path, **overrides: Any) -> np.ndarray:
    """The bundle's own ``initialize`` and ``run`` on ``nifti``; its saved label map in ``[slice, row, column]``."""
    from monai.bundle import ConfigParser

    if ignite is None:
        pytest.skip("pytorch-ignite is not installed (the bundle's evaluator needs it: pip install pytorch-ignite)")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update(
        {
            "bundle_root": str(bundle),
            "datalist": [str(nifti)],
            "output_dir": str(out),
            "device": "$torch.device('cpu')",
            "evaluator#amp": False,
            "dataloader#num_workers": 0,
            **overrides,
        }
    )
    cudnn_benchmark = torch.backends.cudnn.benchmark  # wholeBody's initialize sets it
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*Current default value of argument")
            # LoadImaged sets up every reader MONAI has; this one says nvImageCodec is not installed
            warnings.filterwarnings("ignore", category=UserWarning, message="NvImgCodecPydicomReader")
            # pytorch-ignite (the evaluator's engine) scripts a function with torch.jit on import
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
            parser.get_parsed_content("initialize")
            parser.get_parsed_content("run")
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    (saved,) = out.rglob("*.nii.gz")
    labels = np.asarray(nib.load(saved).dataobj)
    assert labels.ndim == 3, "SaveImaged squeezes the single channel"
    return np.transpose(labels[:, ::-1, :], (2, 1, 0))  # dcm2niix's [column, row from the bottom, slice]


def synthetic_series(tmp_path: Path, slices: int, size: int, **options: Any) -> tuple[Path, Volume]:
    series = tmp_path / "ct"
    write_synthetic_ct(series, slices, rows=size, columns=size, **options)
    result = assemble_series(sorted(series.glob("*.dcm")))
    assert result.refused == () and len(result.volumes) == 1
    return series, result.volumes[0]


def test_spleen_bundle_matches_its_own_evaluator(tmp_path: Path, runtime: InferenceRuntime) -> None:
    manifest = bundle_package(tmp_path, spleen_configs())
    bundle = tmp_path / "package" / "bundle"
    series, volume = synthetic_series(tmp_path, 48, 128)
    write_weights(bundle, seed=0, volume=volume)

    result = runtime.run(manifest, tmp_path / "package", "sha", volume)
    reference = bundle_reference(bundle, dcm2niix(series, tmp_path / "nifti"), tmp_path / "eval")

    assert result.labelmap is not None and result.labelmap.shape == volume.array.shape == (48, 128, 128)
    assert reference.shape == result.labelmap.shape
    differing = int(np.count_nonzero(result.labelmap != reference))
    assert differing == 0, f"{differing} of {reference.size} voxels differ"
    foreground = float(np.mean(reference == 1))
    assert 0.05 < foreground < 0.95, f"a segmentation with an edge, not one label everywhere ({foreground:.1%})"
    assert np.array_equal(result.masks[1], reference == 1)
    # 16 patches of 96^3 in groups of sw_batch_size 4, all through the model's batcher
    (stats,) = runtime.stats().values()
    assert stats.items == 16 and stats.forward_passes == 4
    assert "ran the bundle's own preprocessing, inferer and postprocessing" in result.notes[0]


def test_wholebody_bundle_under_trust_code_matches_its_own_evaluator(tmp_path: Path, runtime: InferenceRuntime) -> None:
    """Another network (SegResNet, 105 classes) and chain (NormalizeIntensityd, ScaleIntensityd, argmax before a
    nearest-neighbour Invertd, replicate padding): its inferer's ``device`` is an expression, so trust_code."""
    metadata = json.loads((WHOLEBODY / "configs" / "metadata.json").read_text())
    names = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    labels = [{"value": int(value), "name": name, **GENERIC} for value, name in names.items() if value != "0"]
    manifest = bundle_package(tmp_path, WHOLEBODY / "configs", trust_code=True, labels=labels)
    bundle = tmp_path / "package" / "bundle"
    write_weights(bundle, seed=1)
    series, volume = synthetic_series(tmp_path, 24, 64, pixel_spacing=2.0)

    result = runtime.run(manifest, tmp_path / "package", "sha", volume)
    overrides = {"inferer#device": "$torch.device('cpu')"}
    reference = bundle_reference(bundle, dcm2niix(series, tmp_path / "nifti"), tmp_path / "eval", **overrides)

    assert result.labelmap is not None and reference.shape == result.labelmap.shape == (24, 64, 64)
    differing = int(np.count_nonzero(result.labelmap != reference))
    assert differing == 0, f"{differing} of {reference.size} voxels differ"
    assert len(np.unique(reference)) > 2, "random weights still segment into several labels"
    assert "label 'spleen' has no SNOMED CT code the gateway knows: coded as generic Anatomical Structure" in (
        result.notes
    )


def test_invertd_restores_a_series_whose_slices_run_head_to_feet(tmp_path: Path, runtime: InferenceRuntime) -> None:
    """A volume whose slices step towards the feet, rows and columns at other spacings (not RAS, not isotropic):
    the output comes back on its own grid, equal to the bundle's evaluator on the gateway's own NIfTI of it."""
    manifest = bundle_package(tmp_path, spleen_configs())
    bundle = tmp_path / "package" / "bundle"
    volume = head_to_feet_volume()
    write_weights(bundle, seed=2, volume=volume)

    result = runtime.run(manifest, tmp_path / "package", "sha", volume)
    nifti, _ = write_nifti(volume, tmp_path / "volume.nii")
    reference = bundle_reference(bundle, nifti, tmp_path / "eval")

    assert result.labelmap is not None and result.labelmap.shape == (20, 40, 36)
    assert np.array_equal(result.labelmap, reference)


def head_to_feet_volume(offset: int = 0) -> Volume:
    array = np.full((20, 40, 36), -1000.0)
    array[4:16, 8 + offset : 32, 6:30] = 40.0
    affine = np.array([[0, 0, 1.7, -30], [0, 1.3, 0, -25], [-3.0, 0, 0, 40], [0, 0, 0, 1]], dtype=np.float64)
    return make_volume(array, affine)


def test_concurrent_studies_share_forward_passes(tmp_path: Path, runtime: InferenceRuntime) -> None:
    """The bundle's inferer sends its patches through the model's batcher: two studies at once, one forward pass
    (each is one 96^3 window), and each result as when it runs alone."""
    manifest = bundle_package(tmp_path, spleen_configs(), inference={"batch_size": 4, "max_wait_ms": 3000})
    volumes = [head_to_feet_volume(0), head_to_feet_volume(6)]
    write_weights(tmp_path / "package" / "bundle", seed=2, volume=volumes[0])
    results: list[Any] = [None, None]

    def run(index: int) -> None:
        results[index] = runtime.run(manifest, tmp_path / "package", "sha", volumes[index])

    at_once(run, 2, timeout_s=120)
    (stats,) = runtime.stats().values()
    assert (stats.requests, stats.items, stats.forward_passes) == (2, 2, 1)
    for volume, result in zip(volumes, results, strict=True):
        alone = InferenceRuntime("cpu", batching=False)
        try:
            assert np.array_equal(alone.run(manifest, tmp_path / "package", "sha", volume).labelmap, result.labelmap)
        finally:
            alone.close()


# -- what an untrusted bundle may not have -------------------------------------------------------------------


def edited_bundle(tmp_path: Path, edit: Any) -> Path:
    config = json.loads((spleen_configs() / "inference.json").read_text())
    edit(config)
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    return bundle


def _expression(config: dict[str, Any]) -> None:
    config["preprocessing"]["transforms"][3]["pixdim"] = "$[1.5, 1.5, 2.0]"


def _os_system(config: dict[str, Any]) -> None:
    config["preprocessing"]["transforms"][2] = {"_target_": "os.system", "command": "touch marker"}


def _no_loader(config: dict[str, Any]) -> None:
    del config["preprocessing"]["transforms"][0]


def _transform_as_inferer(config: dict[str, Any]) -> None:
    config["inferer"] = {"_target_": "monai.transforms.Compose", "transforms": []}


def _writing_argument(config: dict[str, Any]) -> None:
    config["postprocessing"]["transforms"][1]["output_dir"] = "/tmp/out"


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (_expression, r"preprocessing::transforms::3::pixdim = '\$\[1\.5, 1\.5, 2\.0\]': an expression"),
        (_os_system, r"preprocessing::transforms::2::_target_ = 'os\.system': only classes under monai\.transforms"),
        (
            _transform_as_inferer,
            r"inferer::_target_ = 'monai\.transforms\.Compose': only classes under monai\.inferers",
        ),
        (_writing_argument, r"postprocessing::transforms::1::output_dir = '/tmp/out': a transform or inferer may not"),
    ],
)
def test_untrusted_sections_are_refused_naming_the_item(tmp_path: Path, edit: Any, named: str) -> None:
    bundle = edited_bundle(tmp_path, edit)
    with pytest.raises(ModelError, match=named) as refused:
        build_sections(bundle, trust_code=False)
    assert "trust_code: true" in str(refused.value)
    assert not (tmp_path / "marker").exists()


def test_a_saver_is_refused_wherever_it_is_not_left_out(tmp_path: Path) -> None:
    def saver(config: dict[str, Any]) -> None:
        config["preprocessing"]["transforms"].append({"_target_": "SaveImaged", "keys": "image"})

    with pytest.raises(ModelError, match=r"preprocessing::transforms::6::_target_ = 'SaveImaged': reads or writes"):
        build_sections(edited_bundle(tmp_path, saver), trust_code=False)


def test_a_config_without_a_loader_is_refused_trusted_or_not(tmp_path: Path) -> None:
    bundle = edited_bundle(tmp_path, _no_loader)
    for trust_code in (False, True):
        with pytest.raises(ModelError, match="preprocessing must begin with LoadImage or LoadImaged"):
            build_sections(bundle, trust_code=trust_code)


def test_trust_code_builds_an_expression_and_skips_the_saver(tmp_path: Path) -> None:
    sections = build_sections(edited_bundle(tmp_path, _expression), trust_code=True)
    names = [type(t).__name__ for t in sections.preprocessing.transforms]  # type: ignore[attr-defined]
    assert names == ["EnsureChannelFirstd", "Orientationd", "Spacingd", "ScaleIntensityRanged", "EnsureTyped"]
    post = [type(t).__name__ for t in sections.postprocessing.transforms]  # type: ignore[attr-defined,union-attr]
    assert post == ["Activationsd", "Invertd", "AsDiscreted"]


def test_the_wholebody_config_needs_trust_code() -> None:
    """Its Spacingd's pixdim is an expression (``highres``), and so is its inferer's device."""
    with pytest.raises(ModelError, match=r"pixdim = '\$\[1\.5, 1\.5, 1\.5\] if @displayable_configs#highres"):
        build_sections(WHOLEBODY, trust_code=False)


def test_invertd_inverts_the_very_preprocessing_built(tmp_path: Path) -> None:
    sections = build_sections(edited_bundle(tmp_path, lambda config: None), trust_code=False)
    invert = sections.postprocessing.transforms[1]  # type: ignore[attr-defined,union-attr]
    assert invert.transform is sections.preprocessing


# -- the dry run at registration -----------------------------------------------------------------------------


def test_dry_run_runs_the_pipeline_on_a_synthetic_ct_in_a_child(tmp_path: Path) -> None:
    manifest = bundle_package(tmp_path, spleen_configs())
    write_weights(tmp_path / "package" / "bundle", seed=0)
    report = dry_run_in_child(manifest, tmp_path / "package")
    assert report.input_shape == (1, 1, *BUNDLE_VOLUME)
    assert report.output_shape == (1, 1, *BUNDLE_VOLUME), "the argmax label map, inverted to the volume's grid"


def test_dry_run_refuses_an_untrusted_expression_naming_it(tmp_path: Path) -> None:
    manifest = bundle_package(tmp_path, spleen_configs())
    bundle = tmp_path / "package" / "bundle"
    write_weights(bundle, seed=0)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    _expression(config)
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"dry run: .*preprocessing::transforms::3::pixdim = "):
        dry_run(manifest, tmp_path / "package")


def test_dry_run_refuses_a_pipeline_that_does_not_invert(tmp_path: Path) -> None:
    manifest = bundle_package(tmp_path, spleen_configs())
    bundle = tmp_path / "package" / "bundle"
    write_weights(bundle, seed=0)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    del config["postprocessing"]["transforms"][1]  # Invertd
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"not \[channels, .*on the source grid \(does it end with Invertd\?\)"):
        dry_run(manifest, tmp_path / "package")


# -- reading the postprocessed output ------------------------------------------------------------------------


def bundle_manifest(**outputs: Any) -> Manifest:
    data = manifest_dict("monai-bundle", "bundle", inference={"pipeline": "bundle"}, outputs=outputs)
    return Manifest.model_validate(data)


def test_one_hot_channels_and_label_values_are_read_as_declared() -> None:
    labels = [segment(1, "Liver"), {**segment(2, "Lesion"), **GENERIC}]
    one_hot = np.zeros((3, 2, 3, 4), dtype=np.float32)
    one_hot[0] = 1.0
    one_hot[:, 0, 0, 0] = [0.0, 1.0, 0.0]
    one_hot[:, 1, 2, 3] = [0.0, 0.0, 1.0]
    labelmap = bundle_manifest(segmentation={"kind": "labelmap", "labels": labels})
    decoded = decode_output(one_hot, labelmap)
    assert decoded.labelmap is not None and decoded.labelmap.dtype == np.uint8
    assert np.array_equal(decode_output(np.argmax(one_hot, axis=0)[None].astype(np.float32), labelmap).labelmap,
                          decoded.labelmap)  # fmt: skip
    assert decoded.labelmap[0, 0, 0] == 1 and decoded.labelmap[1, 2, 3] == 2 and decoded.labelmap.sum() == 3
    channels = decode_output(one_hot, bundle_manifest(segmentation={"kind": "channels", "labels": labels}))
    assert channels.labelmap is None and int(channels.masks[2].sum()) == 1
    with pytest.raises(InferenceError, match="too few for the declared labels"):
        decode_output(one_hot[:2], bundle_manifest(segmentation={"kind": "channels", "labels": labels}))


def test_notes_name_generic_labels_and_discretised_classifications() -> None:
    finding = {"name": "Lesion", "finding": CODE, "label": 2}
    labels = [segment(1, "Liver"), {**segment(2, "Lesion"), **GENERIC}]
    manifest = bundle_manifest(segmentation={"kind": "labelmap", "labels": labels}, classifications=[finding])
    notes = bundle_notes(manifest)
    assert "label 'Lesion' has no SNOMED CT code the gateway knows: coded as generic Anatomical Structure" in notes
    assert not any("'Liver'" in note for note in notes)
    assert any(note.startswith("classifications need probabilities") for note in notes)
