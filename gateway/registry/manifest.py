"""The model manifest (``model.yaml``): what a model is, which series it applies to, how to feed it, what it says.

A model package is a folder holding ``model.yaml`` and the weights it names: an ONNX file, a TorchScript file, or a
MONAI bundle folder. ``docs/models.md`` is the annotated example; :class:`Manifest` is the schema, and every rule
in it is checked when the manifest is read, so a registered model is always a valid one.

Array conventions are the assembly stage's (:mod:`gateway.assemble.model`): volumes are ``[slice, row, column]``,
and spacings, patch sizes and crop sizes are given in that order. Orientation codes name, for each of those three
axes, the patient direction the index grows towards (``L``/``R``, ``P``/``A``, ``S``/``I``): a head-first supine
axial CT as scanned is ``IPL`` (slices run towards the feet, rows towards the back, columns towards the left).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from gateway.errors import ManifestError

__all__ = [
    "GENERIC_CATEGORY",
    "GENERIC_TYPE",
    "MANIFEST_NAME",
    "NAME_PATTERN",
    "Classification",
    "Code",
    "Inference",
    "Intensity",
    "Manifest",
    "Outputs",
    "ParametricMap",
    "Preprocess",
    "SegmentLabel",
    "Segmentation",
    "Selection",
    "load_manifest",
    "manifest_from_data",
    "read_yaml_mapping",
]

MANIFEST_NAME = "model.yaml"

Backend = Literal["onnx", "torchscript", "monai-bundle"]
Precision = Literal["fp32", "fp16", "bf16"]
Plane = Literal["axial", "sagittal", "coronal", "oblique"]
Measurement = Literal["volume", "mean", "stddev", "min", "max", "voxels"]
Triple = tuple[float, float, float]
OptionalTriple = tuple[float | None, float | None, float | None]
IntTriple = tuple[int, int, int]

#: What a model name may be: lower case letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_VERSION = r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,31}$"
_AXES = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}


class _Strict(BaseModel):
    """A manifest section: unknown (e.g. misspelt) keys are errors, values are immutable once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Strict):
    """A coded concept (PS3.3 Table 8.8-1): ``value`` in ``scheme``, with a human ``meaning``.

    Schemes are the DICOM coding-scheme designators: ``SCT`` (SNOMED CT), ``DCM``, ``UCUM``, ``LN``, ``99...``.
    """

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)


#: The codes a segment gets when its label names nothing the gateway can code (a bundle's ``channel_def`` entry
#: without a SNOMED CT concept): SegmentLabel keeps the label's own name, and the job notes it.
GENERIC_CATEGORY = Code(value="91723000", scheme="SCT", meaning="Anatomical Structure")
GENERIC_TYPE = Code(value="91723000", scheme="SCT", meaning="Anatomical Structure")


class Selection(_Strict):
    """Which series a model applies to. Every rule given must hold; an omitted rule matches everything.

    ``body_part_examined`` lists the BodyPartExamined values accepted (PS3.16 Annex L defined terms, e.g.
    ``CHEST``); ``body_part_from_description`` is its fallback for a series without BodyPartExamined (a type 3
    attribute, PS3.3 C.7.3.1, often absent): a regular expression searched (case-insensitive) in SeriesDescription
    then, and only then (without it such a series fails ``body_part_examined``). ``image_type`` lists values that
    must all appear in ImageType; ``series_description`` is a regular expression searched (case-insensitive) in
    SeriesDescription; ``slice_thickness_mm`` bounds the slice spacing the volume was assembled with;
    ``orientation`` lists the acquisition planes accepted (from the slice normal, ``oblique`` when it is more than
    10 degrees from every axis); ``accept_resampled`` says whether a volume that assembly resampled (gantry tilt,
    uneven spacing) may be used; ``accept_missing_slices`` whether a volume with a gap in its slices may be (its
    outputs then lie only on the slices that exist); ``diffusion`` asks for a 4D diffusion volume with at least
    ``min_b_values`` distinct b-values instead of a 3D one.
    """

    modality: list[str] = Field(default_factory=list)
    body_part_examined: list[str] = Field(default_factory=list)
    body_part_from_description: str | None = None
    image_type: list[str] = Field(default_factory=list)
    series_description: str | None = None
    slice_thickness_mm: tuple[float, float] | None = None
    orientation: list[Plane] = Field(default_factory=list)
    min_slices: int = Field(default=1, ge=1)
    accept_resampled: bool = True
    accept_missing_slices: bool = True
    diffusion: bool = False
    min_b_values: int = Field(default=2, ge=2)

    @field_validator("series_description", "body_part_from_description")
    @classmethod
    def _compiles(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{info.field_name} is not a regular expression: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _fallback_of_body_part(self) -> Selection:
        if self.body_part_from_description is not None and not self.body_part_examined:
            raise ValueError(
                "body_part_from_description is the fallback of body_part_examined for series without "
                "BodyPartExamined: set body_part_examined too"
            )
        return self

    @field_validator("slice_thickness_mm")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] <= value[1]:
            raise ValueError("slice_thickness_mm must be [low, high] with 0 <= low <= high")
        return value


class Intensity(_Strict):
    """Intensity preprocessing: a window mapped linearly to [0, 1] (clipped), a z-score, or nothing (``none``)."""

    mode: Literal["window", "zscore", "none"] = "none"
    window: tuple[float, float] | None = None
    clip: bool = True
    nonzero: bool = False

    @model_validator(mode="after")
    def _window_given(self) -> Intensity:
        if self.mode == "window" and (self.window is None or self.window[0] >= self.window[1]):
            raise ValueError("intensity mode 'window' needs window: [low, high] with low < high")
        return self


class Preprocess(_Strict):
    """How a volume is prepared for the model; the gateway inverts every spatial step on the outputs.

    ``orientation``: three axis codes (see the module docstring) the array is flipped/transposed to, or ``None`` to
    keep the scanner's order. ``spacing_mm``: the voxel size (slice, row, column) to resample to; ``None`` for an
    axis keeps it. ``spatial_size``: centre crop or pad to this size after resampling (``None`` keeps the axis).
    ``pad_value``: the value used for padding, in input units before the intensity step.
    """

    orientation: str | None = None
    spacing_mm: OptionalTriple | None = None
    intensity: Intensity = Field(default_factory=Intensity)
    spatial_size: tuple[int | None, int | None, int | None] | None = None
    pad_value: float = 0.0

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.upper()
        if len(value) != 3 or any(c not in _AXES for c in value) or len({_AXES[c] for c in value}) != 3:
            raise ValueError(f"orientation must be three codes from L/R, P/A, S/I, one per axis, got {value!r}")
        return value

    @field_validator("spacing_mm")
    @classmethod
    def _positive_spacing(cls, value: OptionalTriple | None) -> OptionalTriple | None:
        if value is not None and any(s is not None and s <= 0 for s in value):
            raise ValueError("spacing_mm entries must be positive (or null to keep an axis)")
        return value

    @field_validator("spatial_size")
    @classmethod
    def _positive_size(
        cls, value: tuple[int | None, int | None, int | None] | None
    ) -> tuple[int | None, int | None, int | None] | None:
        if value is not None and any(s is not None and s < 1 for s in value):
            raise ValueError("spatial_size entries must be at least 1 (or null to keep an axis)")
        return value


class Inference(_Strict):
    """How the model is run.

    ``input_channels``: channels of the input tensor ``[batch, channels, slice, row, column]`` (a diffusion model
    gets one channel per b-value, in increasing order). ``patch_size``: sliding-window patches of this size when the
    volume is larger (``None``: the whole volume in one pass). ``overlap``: fraction of a patch shared with its
    neighbours. ``batch_size``: the most inputs or patches in one forward pass (the batcher fills it across
    concurrent jobs). ``max_wait_ms``: how long the batcher waits for more work before running a partial batch.
    ``input_name``/``output_name``: tensor names for ONNX (default: the model's first input/output).
    ``pipeline`` (``monai-bundle`` only): ``manifest`` (the default) prepares the volume by ``preprocess`` and
    slides ``patch_size`` windows itself; ``bundle`` runs the bundle's own ``preprocessing``, ``inferer`` and
    ``postprocessing`` from its ``configs/inference.json`` (or ``.yaml``) on the volume in memory, inverted back to
    the source grid (:mod:`gateway.infer.bundle_pipeline`); ``preprocess`` must then be left out, and
    ``patch_size``/``batch_size`` only describe the bundle's inferer (the dry run's input).
    For a diffusion model (``select.diffusion``) the channels are the series' distinct b-values, ascending (each the
    mean over its gradient directions), however many there are, and the b-values themselves (``[batch, channels]``,
    s/mm2) go to the second model input, named ``b_values_input`` for ONNX.
    """

    input_channels: int = Field(default=1, ge=1)
    patch_size: IntTriple | None = None
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    batch_size: int = Field(default=4, ge=1)
    max_wait_ms: float = Field(default=10.0, ge=0.0)
    precision: Precision = "fp32"
    input_name: str | None = None
    output_name: str | None = None
    b_values_input: str = "b_values"
    pipeline: Literal["manifest", "bundle"] = "manifest"

    @field_validator("patch_size")
    @classmethod
    def _positive_patch(cls, value: IntTriple | None) -> IntTriple | None:
        if value is not None and any(s < 1 for s in value):
            raise ValueError("patch_size entries must be at least 1")
        return value


class SegmentLabel(_Strict):
    """One segment: its label value (``labelmap``) or output channel (``channels``), codes, colour, measurements.

    ``category`` and ``type`` are the Segmented Property Category and Type codes (SNOMED CT, PS3.16 CID 7150/7151);
    ``color`` is RGB 0-255; ``measurements`` are computed on the source grid over the segment's voxels, from the
    volume's modality values (``volume`` in ml).

    ``lesions: true`` makes each connected component of the segment (26-connectivity, on the source grid) a finding
    of its own, with its volume, long and short axis on its largest slice, statistics and centre
    (:mod:`gateway.infer.lesions`); components below ``min_volume_ml`` are left out and counted. Without it the
    segment is one whole-organ finding.
    """

    value: int = Field(ge=0)
    name: str = Field(min_length=1, max_length=64)
    category: Code
    type: Code
    color: tuple[int, int, int] = (255, 0, 0)
    measurements: list[Measurement] = Field(default_factory=lambda: list[Measurement](["volume"]))
    lesions: bool = False
    min_volume_ml: float = Field(default=0.0, ge=0.0)

    @field_validator("color")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError("color components must be 0-255")
        return value

    @model_validator(mode="after")
    def _lesion_threshold(self) -> SegmentLabel:
        if self.min_volume_ml and not self.lesions:
            raise ValueError("min_volume_ml applies to lesions: set lesions: true, or leave min_volume_ml out")
        return self


class Segmentation(_Strict):
    """A segmentation output.

    ``kind``: ``labelmap`` (softmax/argmax over channels, or one integer channel: each voxel one label; label 0 is
    background) or ``channels`` (one channel per label, each thresholded on its own: labels may overlap, like
    *body* and *bone*). ``activation`` is applied to the model's raw output first.
    """

    kind: Literal["labelmap", "channels"] = "labelmap"
    activation: Literal["softmax", "sigmoid", "none"] = "softmax"
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    labels: list[SegmentLabel] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> Segmentation:
        values = [label.value for label in self.labels]
        if len(set(values)) != len(values):
            raise ValueError("segmentation label values must be distinct")
        if self.kind == "labelmap" and 0 in values:
            raise ValueError("label 0 is the background of a labelmap; start segments at 1")
        return self


class Classification(_Strict):
    """A finding with a probability, derived from a segment: the highest voxel probability of ``label``.

    Reported (as a TID 1500 qualitative evaluation) when the segment's volume is at least ``min_volume_ml``.
    """

    name: str = Field(min_length=1, max_length=64)
    finding: Code
    label: int = Field(ge=0)
    min_volume_ml: float = Field(default=0.0, ge=0.0)


class ParametricMap(_Strict):
    """A parametric-map output: one output channel, with its quantity code and UCUM unit (``scheme: UCUM``)."""

    name: str = Field(min_length=1, max_length=64)
    channel: int = Field(default=0, ge=0)
    quantity: Code
    units: Code

    @field_validator("units")
    @classmethod
    def _ucum(cls, value: Code) -> Code:
        if value.scheme != "UCUM":
            raise ValueError("parametric map units must be UCUM (scheme: UCUM)")
        return value


class Outputs(_Strict):
    """What the model's output means: a segmentation, classifications drawn from it, or parametric maps.

    ``display_window`` (centre, width, in modality units) is the window a reader sees the findings in: the
    presentation state's and the key images' (e.g. a lung window ``[-600, 1500]`` for lung nodules); without it,
    the source images' own window.
    """

    segmentation: Segmentation | None = None
    classifications: list[Classification] = Field(default_factory=list)
    parametric_maps: list[ParametricMap] = Field(default_factory=list)
    display_window: tuple[float, float] | None = None

    @field_validator("display_window")
    @classmethod
    def _positive_width(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[1] <= 0:
            raise ValueError("display_window is [centre, width] with a positive width")
        return value

    @model_validator(mode="after")
    def _something(self) -> Outputs:
        if self.segmentation is None and not self.parametric_maps:
            raise ValueError("outputs must declare a segmentation or at least one parametric map")
        if self.segmentation is not None and self.parametric_maps:
            raise ValueError("a model's output is either a segmentation or parametric maps, not both")
        known = {label.value for label in self.segmentation.labels} if self.segmentation else set()
        for item in self.classifications:
            if item.label not in known:
                raise ValueError(f"classification {item.name!r} refers to label {item.label}, not a declared segment")
        return self


class Manifest(_Strict):
    """A model package's ``model.yaml``. See ``docs/models.md`` for an annotated example.

    ``trust_code`` (``monai-bundle`` only, default ``false``): let the bundle's config run code (MONAI's ``$``
    expressions, ``%`` macros, any ``_target_``). Without it the gateway builds only the network classes that
    :mod:`gateway.infer.bundle` allows, and refuses a config with code. A package that sets it is registered only
    by an admin (an admin token over HTTP, ``gateway models register --trust-code``), and its code then runs in the
    gateway's inference workers (at registration, in the dry run's child process).
    """

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    version: Annotated[str, Field(pattern=_VERSION)]
    description: str = Field(min_length=1)
    authors: list[str] = Field(min_length=1)
    licence: str = Field(min_length=1)
    intended_use: str = Field(min_length=1)
    backend: Backend
    weights: str = Field(min_length=1)
    select: Selection = Field(default_factory=Selection)
    preprocess: Preprocess = Field(default_factory=Preprocess)
    inference: Inference = Field(default_factory=Inference)
    outputs: Outputs
    trust_code: bool = False

    @field_validator("weights")
    @classmethod
    def _inside(cls, value: str) -> str:
        path = Path(value)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError("weights must be a path inside the model folder")
        return value

    @model_validator(mode="after")
    def _code_only_in_bundles(self) -> Manifest:
        if self.trust_code and self.backend != "monai-bundle":
            raise ValueError("trust_code applies to monai-bundle packages only (ONNX and TorchScript run no Python)")
        return self

    @model_validator(mode="after")
    def _one_pipeline(self) -> Manifest:
        if self.inference.pipeline == "bundle":
            if self.backend != "monai-bundle":
                raise ValueError("inference.pipeline: bundle applies to monai-bundle packages only")
            if self.preprocess != Preprocess():
                raise ValueError(
                    "inference.pipeline: bundle runs the bundle's own preprocessing: leave preprocess out "
                    "(a second declaration is where spacing, orientation and intensity go wrong)"
                )
        return self

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The mapping a ``model.yaml`` (a manifest or a bundle's override) holds, read as plain data.

    Raises
    ------
    ManifestError
        If the file is not valid YAML or does not hold a mapping at the top level.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a mapping at the top level")
    return data


def load_manifest(folder: Path) -> Manifest:
    """Read and validate ``folder/model.yaml``.

    Raises
    ------
    ManifestError
        With every problem found, each naming the key (``inference.patch_size: ...``).
    """
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder}: no {MANIFEST_NAME}")
    data = read_yaml_mapping(path)
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors())
        raise ManifestError(f"{path}: {problems}") from exc


def manifest_from_data(data: dict[str, object], source: str) -> Manifest:
    """Validate manifest ``data`` that did not come from one ``model.yaml`` (a bundle's synthesised manifest).

    Raises
    ------
    ManifestError
        With every problem found, each naming the key, after ``source`` (where the data came from).
    """
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors())
        raise ManifestError(f"{source}: {problems}") from exc
