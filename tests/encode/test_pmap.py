"""Parametric Maps: a synthetic map on CT and models/adc-dwi on a real mosaic DWI series, read back and validated."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from encode_cases import (
    GATEWAY_VERSION,
    IRREGULAR,
    MODELS,
    Case,
    affine_positions,
    assert_frames_on_their_sources,
    dciodvfy,
    derivation_sources,
    dwi_case,
    frame_positions,
    geometric_map_result,
    irregular_ct,
    map_result,
    off_grid_mm,
    phantom_map,
    pixel_positions,
    referenced_instances,
    run_model,
    slice_index,
    synthetic_ct,
    tilted_ct,
)

from gateway.encode import EncodedObject, encode_result, write_objects
from gateway.errors import EncodeError
from gateway.infer.results import ModelResult

PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return synthetic_ct(tmp_path_factory.mktemp("ct"), slices=12, size=64)


@pytest.fixture(scope="module")
def ct_map(ct: Case) -> tuple[ModelResult, EncodedObject]:
    result = map_result(ct.volume)
    objects = encode_result(result, ct.sources, series_number=60, gateway_version=GATEWAY_VERSION)
    assert len(objects) == 1
    return result, objects[0]


@pytest.fixture
def dwi(shared_data: Path) -> Case:
    if not (MODELS / "adc-dwi" / "model.pt").is_file():
        pytest.skip("models/adc-dwi has no weights")
    return dwi_case(shared_data)


def _map_values(path: Path, volume_indices: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The written map's float values put back in volume slice order."""
    ds = pydicom.dcmread(path)
    frames = np.frombuffer(ds.FloatPixelData, dtype="<f4").reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    out = np.full(shape, np.nan, dtype=np.float32)
    out[volume_indices] = frames
    return out


def test_map_is_a_float_parametric_map_in_a_new_series(ct_map: tuple[ModelResult, EncodedObject], ct: Case) -> None:
    _, item = ct_map
    ds, source = item.dataset, next(iter(ct.sources.values()))
    assert item.kind == "PM" and item.sop_class_uid == PARAMETRIC_MAP_STORAGE
    assert ds.BitsAllocated == 32 and "FloatPixelData" in ds
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SeriesNumber == 60
    assert ds.SeriesDescription == "AI relative-hu 0.3.0 PM"
    assert list(ds.SoftwareVersions) == ["DICOM AI Gateway 0.1.0", "relative-hu 0.3.0"]
    assert ds.Manufacturer == "DICOM AI Gateway"


def test_real_world_value_mapping_carries_quantity_and_units(ct_map: tuple[ModelResult, EncodedObject]) -> None:
    result, item = ct_map
    mapping = item.dataset.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == "relative HU"
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("[hnsf'U]", "UCUM")
    quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == ("112031", "DCM")
    assert (mapping.RealWorldValueSlope, mapping.RealWorldValueIntercept) == (1.0, 0.0)
    values = result.maps["relative HU"]
    assert mapping.DoubleFloatRealWorldValueFirstValueMapped == pytest.approx(float(values.min()))
    assert mapping.DoubleFloatRealWorldValueLastValueMapped == pytest.approx(float(values.max()))


def test_map_values_and_frames_round_trip(ct_map: tuple[ModelResult, EncodedObject], ct: Case, tmp_path: Path) -> None:
    result, item = ct_map
    path = write_objects([item], tmp_path)[0]
    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(path))
    indices = slice_index(ct.volume, frame_positions(pm))
    assert sorted(indices) == list(range(len(ct.volume.slices)))  # every frame kept, none empty-dropped
    np.testing.assert_array_equal(_map_values(path, indices, ct.volume.array.shape), result.maps["relative HU"])
    for k, cited in zip(indices, derivation_sources(pm), strict=True):
        assert cited == [(ct.volume.slices[k].sop_instance_uid, None, "YES")]


def test_synthetic_map_passes_dciodvfy(ct_map: tuple[ModelResult, EncodedObject], tmp_path: Path) -> None:
    verdict = dciodvfy(write_objects([ct_map[1]], tmp_path)[0])
    assert verdict.errors == [], verdict.errors
    print("dciodvfy warnings (PM):", verdict.warnings)


def test_non_finite_values_are_an_encode_error(ct: Case) -> None:
    result = map_result(ct.volume)
    result.maps["relative HU"][0, 0, 0] = np.nan
    with pytest.raises(EncodeError, match="NaN"):
        encode_result(result, ct.sources, series_number=1, gateway_version=GATEWAY_VERSION)


def test_adc_of_a_mosaic_dwi_series(dwi: Case, tmp_path: Path) -> None:
    volume = dwi.volume
    assert volume.slices[0].tile is not None and volume.array.ndim == 4
    result = run_model("adc-dwi", volume)
    (item,) = encode_result(result, dwi.sources, series_number=70, gateway_version=GATEWAY_VERSION)
    path = write_objects([item], tmp_path)[0]
    ds = pydicom.dcmread(path)
    positions = frame_positions(ds)
    indices = slice_index(volume, positions)  # tiles: positions from the volume's affine
    np.testing.assert_allclose(positions, affine_positions(volume, indices), atol=1e-4)
    np.testing.assert_allclose(_map_values(path, indices, volume.array.shape[1:]), result.maps["ADC"])
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "um2/s"
    assert mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == "113041"
    every_b_value = {ref.sop_instance_uid for refs in volume.slices_4d for ref in refs}
    assert referenced_instances(ds) == every_b_value  # the fit read every b-value's mosaic
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_instance_uid
    verdict = dciodvfy(path)
    assert verdict.errors == [], verdict.errors
    print("dciodvfy warnings (PM, mosaic DWI):", verdict.warnings)


@pytest.mark.parametrize("name", [*sorted(IRREGULAR), "tilt"])
def test_map_frames_of_an_irregular_series_are_its_images(name: str, tmp_path: Path) -> None:
    case = tilted_ct(tmp_path / name) if name == "tilt" else irregular_ct(tmp_path / name, **IRREGULAR[name])
    volume = case.volume
    (item,) = encode_result(
        geometric_map_result(volume, case.sources), case.sources, series_number=61, gateway_version=GATEWAY_VERSION
    )
    path = write_objects([item], tmp_path)[0]
    ds = pydicom.dcmread(path)
    cited = assert_frames_on_their_sources(ds, case.sources)
    assert sorted(str(image.SOPInstanceUID) for image in cited) == sorted(case.sources)  # every image, once
    frames = np.frombuffer(ds.FloatPixelData, dtype="<f4").reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    uniform = any(flag.code == "uneven-spacing" for flag in volume.qc)
    for frame, image in zip(frames, cited, strict=True):
        expected = phantom_map(pixel_positions(image))  # the map drawn on the image's own geometry
        inside = frame != 0  # 0 where the image reaches outside the (shifted) volume
        assert np.count_nonzero(~inside) <= 4 * ds.Columns
        off = off_grid_mm(volume, image) if uniform else 0.0
        difference = frame[inside] - expected[inside]  # linear in-plane: exact; along the normal: nearest slice
        np.testing.assert_allclose(difference, np.median(difference), atol=2e-2)
        assert abs(float(np.median(difference))) == pytest.approx(3 * off, abs=2e-2)
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert float(mapping.DoubleFloatRealWorldValueFirstValueMapped) <= float(frames.min())
    assert float(mapping.DoubleFloatRealWorldValueLastValueMapped) >= float(frames.max())
    verdict = dciodvfy(path)
    assert verdict.errors == [], verdict.errors
