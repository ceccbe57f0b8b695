"""A MONAI bundle's own pipeline (``inference.pipeline: bundle``): its preprocessing, inferer and postprocessing.

The bundle's ``configs/inference.json`` (or ``.yaml``) says how its evaluator reads an image: ``preprocessing``
(a ``Compose`` whose first transform is ``LoadImage``/``LoadImaged``), ``inferer`` (e.g. a
``SlidingWindowInferer``) and ``postprocessing`` (activation, ``Invertd`` back to the source grid, discretising,
``SaveImaged``). The gateway runs the same three sections on the assembled volume in memory:

- in the loader's place, :func:`volume_image` gives the volume as the very ``MetaTensor`` ``LoadImaged`` (NIfTI
  reader) would give for the series converted by dcm2niix: voxels ``[column, row from the bottom, slice]``,
  float32, the RAS+ affine as a NIfTI header holds it (:mod:`gateway.assemble.nifti`), and no file read;
- the inferer is the bundle's, with a predictor that sends each group of patches through the model's shared
  :class:`~gateway.infer.batcher.Batcher`, so concurrent studies still share forward passes;
- in postprocessing, every transform that writes files (``SaveImage(d)``, ``SaveClassification(d)``,
  ``WriteFileMapping(d)``) is left out; the rest runs as the bundle says, ``Invertd`` included (the
  ``MetaTensor`` carries the operations preprocessing applied);
- the output, on the source grid, is brought back to the gateway's ``[slice, row, column]`` and read as the
  manifest's outputs say (:func:`decode_output`).

The sections are code in MONAI's syntax. Without ``trust_code`` they are built by the same checked builder as
``network_def`` (:func:`gateway.infer.bundle.check_and_build`): no ``$`` expressions or ``%`` macros, a
``_target_`` in preprocessing or postprocessing must be a class under ``monai.transforms`` (a loader or saver
anywhere else is refused), the inferer's under ``monai.inferers``, and no argument may ask to fetch, read or write
files. The loader and savers left out are not checked, so their ``$`` references (``SaveImaged``'s
``@output_dir``) do not matter. With ``trust_code: true`` MONAI's ``ConfigParser`` builds them, expressions and
all, loader and savers still left out.
"""

from __future__ import annotations

import copy
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.assemble.model import Volume
from gateway.assemble.nifti import to_nifti
from gateway.errors import GatewayError, InferenceError, ModelError
from gateway.infer.bundle import Rule, bundle_config, check_and_build, read_config
from gateway.infer.failures import reason
from gateway.infer.postprocess import Decoded
from gateway.registry.manifest import GENERIC_TYPE, Manifest, Segmentation

__all__ = [
    "INFERERS",
    "TRANSFORMS",
    "BundleSections",
    "build_sections",
    "bundle_notes",
    "decode_output",
    "patch_predictor",
    "run_sections",
    "volume_image",
]

Array = npt.NDArray[np.float32]
Predictor = Callable[[Any], Any]

_SEP = "::"
_WRITING = re.compile(r"url|download|path|file|dir|save|write|pretrain|weights", re.IGNORECASE)
_LOADERS = frozenset({"LoadImage", "LoadImaged", "LoadImageD", "LoadImageDict"})
_SAVERS = frozenset(
    f"{name}{suffix}"
    for name in ("SaveImage", "SaveClassification", "WriteFileMapping")
    for suffix in ("", "d", "D", "Dict")
)
_DEFAULT_CHANGED = r".*Current default value of argument"
_QUIET = threading.Lock()
_PRED = "pred"  # the evaluator's output key (monai.utils.CommonKeys.PRED)
_SOURCE_NAME = "series.nii"  # filename_or_obj: a neutral name, never a path or a patient's data

#: The rule for an untrusted bundle's ``preprocessing`` and ``postprocessing``.
TRANSFORMS = Rule(
    ("monai.transforms",),
    None,
    _WRITING,
    "only classes under monai.transforms are built in preprocessing and postprocessing",
    _LOADERS | _SAVERS,
)
#: The rule for an untrusted bundle's ``inferer``.
INFERERS = Rule(("monai.inferers",), None, _WRITING, "only classes under monai.inferers are built as the inferer")


@dataclass(frozen=True, eq=False)
class BundleSections:
    """A bundle's sections, built: loader and savers left out.

    ``image_key`` is the loader's key (where the volume goes); ``ensure_channel_first`` and ``image_only`` are the
    loader's options, applied to the volume in its place.
    """

    preprocessing: Callable[[Any], Any]
    inferer: Callable[..., Any]
    postprocessing: Callable[[Any], Any] | None
    image_key: str
    ensure_channel_first: bool = False
    image_only: bool = True


# -- building --------------------------------------------------------------------------------------------------


def _name(item: Any) -> str:
    """The class name a config item's ``_target_`` ends with ('' when it has none)."""
    target = item.get("_target_") if isinstance(item, dict) else None
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else ""


def _transforms(config: dict[str, Any], section: str, problem: str) -> list[Any]:
    """The literal ``transforms`` list of a ``Compose`` section."""
    value = config.get(section)
    transforms = value.get("transforms") if isinstance(value, dict) else None
    if not isinstance(transforms, list):
        raise ModelError(f"{problem}: {section} must be a Compose with a list of transforms (a literal list)")
    return transforms


def _follow(config: dict[str, Any], value: Any, item: str, problem: str) -> Any:
    """``value``, with ``@id`` references followed through the config's plain data."""
    for _ in range(16):
        if not (isinstance(value, str) and value.startswith("@")):
            return value
        node: Any = config
        for part in value[1:].replace("#", _SEP).split(_SEP):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise ModelError(f"{problem}: {item} = {value!r} refers to an item the config does not have")
        value = node
    raise ModelError(f"{problem}: {item}: references nested too deep")


def _loader(config: dict[str, Any], problem: str) -> tuple[str, bool, bool]:
    """The loader's image key, ``ensure_channel_first`` and ``image_only``."""
    transforms = _transforms(config, "preprocessing", problem)
    item = "preprocessing::transforms::0"
    if not transforms or _name(transforms[0]) not in _LOADERS:
        raise ModelError(
            f"{problem}: preprocessing must begin with LoadImage or LoadImaged (the gateway gives the volume in the "
            "loader's place); its first transform is "
            f"{_name(transforms[0]) or 'not a component' if transforms else 'missing'}"
        )
    loader = transforms[0]
    keys = _follow(config, loader.get("keys"), f"{item}::keys", problem)
    if isinstance(keys, list) and len(keys) == 1:
        keys = keys[0]
    if not isinstance(keys, str) or not keys:
        raise ModelError(f"{problem}: {item}::keys must name one image key, got {keys!r}")
    options = []
    for name, default in (("ensure_channel_first", False), ("image_only", True)):
        value = _follow(config, loader.get(name, default), f"{item}::{name}", problem)
        if not isinstance(value, bool):
            raise ModelError(f"{problem}: {item}::{name} must be true or false, got {value!r}")
        options.append(value)
    return keys, options[0], options[1]


def _skipped(config: dict[str, Any], problem: str) -> frozenset[str]:
    """The ids of the loader and of every saver in postprocessing: left out, unchecked and unbuilt."""
    skip = {"preprocessing::transforms::0"}
    if "postprocessing" in config:
        post = _transforms(config, "postprocessing", problem)
        skip |= {f"postprocessing::transforms::{i}" for i, item in enumerate(post) if _name(item) in _SAVERS}
    return frozenset(skip)


def _without(config: dict[str, Any], skip: frozenset[str]) -> dict[str, Any]:
    """A copy of the config without the skipped list entries (for MONAI's parser)."""
    stripped = copy.deepcopy(config)
    for section in ("preprocessing", "postprocessing"):
        if section in stripped:
            transforms = stripped[section]["transforms"]
            keep = [t for i, t in enumerate(transforms) if f"{section}::transforms::{i}" not in skip]
            stripped[section]["transforms"] = keep
    return stripped


def _parsed_by_monai(config: dict[str, Any], bundle: Path, sections: list[str], problem: str) -> dict[str, Any]:
    """The trusted path: MONAI's parser builds the sections, expressions and all (by the admin's choice)."""
    from monai.bundle.config_parser import ConfigParser

    parser = ConfigParser(config)
    parser["bundle_root"] = str(bundle)
    built = {}
    for section in sections:
        try:
            built[section] = parser.get_parsed_content(section, instantiate=True)
        except Exception as exc:
            raise ModelError(f"{problem}: {section}: {reason(exc)}") from exc
    return built


def build_sections(bundle: Path, *, trust_code: bool) -> BundleSections:
    """Build the bundle's ``preprocessing``, ``inferer`` and ``postprocessing`` (loader and savers left out).

    Parameters
    ----------
    bundle
        The bundle folder.
    trust_code
        The registered manifest's ``trust_code``: ``True`` lets MONAI read the config and run its code.

    Raises
    ------
    ModelError
        If the config is missing or unreadable, has no ``preprocessing`` beginning with a loader or no
        ``inferer``, an untrusted config has anything the module docstring refuses (the message names the item and
        says ``trust_code`` would allow it), or a section cannot be built.
    """
    path = bundle_config(bundle)
    problem = f"MONAI bundle {bundle.name}: cannot build its pipeline from {path.name}"
    config = read_config(path)
    if not isinstance(config, dict) or "inferer" not in config:
        raise ModelError(f"{problem}: the config has no inferer")
    image_key, channel_first, image_only = _loader(config, problem)
    skip = _skipped(config, problem)
    rules = {"preprocessing": TRANSFORMS, "inferer": INFERERS}
    if "postprocessing" in config:
        rules["postprocessing"] = TRANSFORMS
    with _QUIET, warnings.catch_warnings():  # catch_warnings is process-wide: one build at a time
        # MONAI announces changes of its own defaults (Orientationd's labels) on every build: not the bundle's doing
        warnings.filterwarnings("ignore", category=FutureWarning, message=_DEFAULT_CHANGED)
        if trust_code:
            built = _parsed_by_monai(_without(config, skip), bundle, list(rules), problem)
        else:
            built = check_and_build(config, rules, skip, problem)
    for section, value in built.items():
        if not callable(value):
            raise ModelError(f"{problem}: {section} is a {type(value).__name__}, not callable")
    return BundleSections(
        built["preprocessing"], built["inferer"], built.get("postprocessing"), image_key, channel_first, image_only
    )


# -- running ---------------------------------------------------------------------------------------------------


def volume_image(volume: Volume, *, ensure_channel_first: bool = False, image_only: bool = True) -> Any:
    """The volume as ``LoadImage`` (NIfTI reader) gives the series converted by dcm2niix: a ``MetaTensor``.

    The image is :func:`gateway.assemble.nifti.to_nifti`'s, dcm2niix's layout (``[column, row from the bottom,
    slice]``, RAS+ affine), with the affine as its header stores it (float32 qform and sform, as read back from
    a file); ``filename_or_obj`` is a neutral name. ``LoadImage`` itself (NIfTI reader) makes the ``MetaTensor``
    and its metadata, reading that in-memory image instead of a file.

    Returns
    -------
    monai.data.MetaTensor
        ``[X, Y, Z]`` (``[1, X, Y, Z]`` with ``ensure_channel_first``), or with ``image_only=False`` the
        ``(image, meta)`` pair ``LoadImage`` returns then.
    """
    import nibabel as nib
    from monai.data.image_reader import NibabelReader
    from monai.data.meta_tensor import MetaTensor
    from monai.transforms.io.array import switch_endianness
    from monai.transforms.utility.array import EnsureChannelFirst

    if volume.array.ndim != 3:
        raise InferenceError("the bundle pipeline takes 3D volumes; this volume has a fourth dimension")
    image = to_nifti(volume)
    stored = image.header.get_best_affine()  # type: ignore[no-untyped-call]  # float32, as a file holds it
    as_stored = nib.Nifti1Image(image.dataobj, stored, header=image.header)  # type: ignore[no-untyped-call]
    # LoadImage.__call__'s steps after reading (LoadImage itself would set up every reader it knows, and one of
    # them registers a pydicom decoder plugin: a process-wide change)
    reader = NibabelReader()
    reader.filenames = (_SOURCE_NAME,)
    array, meta = reader.get_data(as_stored)
    meta = switch_endianness(meta, "<")  # type: ignore[no-untyped-call]
    meta["filename_or_obj"] = _SOURCE_NAME
    loaded = MetaTensor.ensure_torch_and_prune_meta(np.asarray(array, dtype=np.float32), meta)
    if ensure_channel_first:
        loaded = EnsureChannelFirst()(loaded, meta_dict=meta)
    return loaded if image_only else (loaded, loaded.meta)


def _step(section: str, function: Callable[[], Any]) -> Any:
    """Run one section; its failure is an :class:`InferenceError` naming the section."""
    try:
        return function()
    except GatewayError:
        raise
    except Exception as exc:
        raise InferenceError(f"the bundle's {section} failed: {reason(exc)}") from exc


def run_sections(sections: BundleSections, volume: Volume, predictor: Predictor) -> Array:
    """The volume through preprocessing, inferer and postprocessing, as MONAI's evaluator takes an image.

    Parameters
    ----------
    sections
        The built sections.
    volume
        The assembled volume.
    predictor
        The network as the inferer calls it: a batch of patches in, their output out.

    Returns
    -------
    numpy.ndarray
        The postprocessed output ``[channels, slice, row, column]`` on the volume's grid.

    Raises
    ------
    InferenceError
        Naming the section that failed, or when the output is not on the volume's grid (no ``Invertd``).
    """
    import torch
    from monai.data.utils import decollate_batch, list_data_collate

    key = sections.image_key
    loaded = volume_image(volume, ensure_channel_first=sections.ensure_channel_first, image_only=sections.image_only)
    data = {key: loaded} if sections.image_only else {key: loaded[0], f"{key}_meta_dict": loaded[1]}
    with torch.inference_mode():
        item = _step("preprocessing", lambda: sections.preprocessing(data))
        batch = _step("preprocessing", lambda: list_data_collate([item]))  # the evaluator's DataLoader
        batch[_PRED] = _step("inferer", lambda: sections.inferer(batch[key], predictor))
        (item,) = _step("postprocessing", lambda: decollate_batch(batch))
        postprocessing = sections.postprocessing
        if postprocessing is not None:
            item = _step("postprocessing", lambda: postprocessing(item))
    return _on_volume_grid(item[_PRED], volume)


def patch_predictor(forward: Callable[[Array], Array]) -> Predictor:
    """The network as a bundle's inferer calls it: each group of patches goes through ``forward`` (the model's
    shared :meth:`Batcher.run <gateway.infer.batcher.Batcher.run>`, so concurrent studies batch together)."""
    import torch

    def predictor(patches: Any, *args: Any, **kwargs: Any) -> Any:
        tensor = patches.as_tensor() if hasattr(patches, "as_tensor") else patches
        output = forward(tensor.detach().cpu().numpy())
        if output.ndim != tensor.ndim or output.shape[0] != tensor.shape[0]:
            raise InferenceError(f"model returned {output.shape} for patches of {tuple(tensor.shape)}")
        return torch.from_numpy(output).to(tensor.device)

    return predictor


def _on_volume_grid(prediction: Any, volume: Volume) -> Array:
    """``[C, X, Y, Z]`` in NIfTI order -> ``[C, slice, row, column]``."""
    array = np.asarray(prediction.detach().cpu().float() if hasattr(prediction, "detach") else prediction)
    if array.ndim == 3:
        array = array[None]
    expected = tuple(reversed(volume.array.shape))
    if array.ndim != 4 or tuple(array.shape[1:]) != expected:
        raise InferenceError(
            f"the bundle's postprocessing gave {tuple(array.shape)}, not [channels, {expected}] on the source grid "
            "(does it end with Invertd?)"
        )
    if not np.isfinite(array).all():
        raise InferenceError("the bundle's output contains NaN or infinite values")
    restored: Array = np.ascontiguousarray(np.transpose(array[:, :, ::-1, :], (0, 3, 2, 1)), dtype=np.float32)
    return restored


# -- reading -----------------------------------------------------------------------------------------------------


def _label_dtype(segmentation: Segmentation) -> type[np.unsignedinteger[Any]]:
    return np.uint8 if max(label.value for label in segmentation.labels) <= 255 else np.uint16


def _labelmap(output: Array, segmentation: Segmentation) -> Decoded:
    """One channel of label values, or one channel per label value (one-hot or probabilities): argmax."""
    values = np.rint(output[0]) if output.shape[0] == 1 else np.argmax(output, axis=0)
    declared = sorted(label.value for label in segmentation.labels)
    labelmap = np.where(np.isin(values, declared), values, 0).astype(_label_dtype(segmentation))
    present = {int(v) for v in np.unique(labelmap) if v}
    masks = {value: labelmap == value for value in declared}
    return Decoded(labelmap, masks, probabilities={value: float(value in present) for value in declared})


def _channels(output: Array, segmentation: Segmentation) -> Decoded:
    """One channel per label, each read against the threshold (segments may overlap)."""
    if output.shape[0] <= max(label.value for label in segmentation.labels):
        raise InferenceError(f"the bundle's output has {output.shape[0]} channel(s), too few for the declared labels")
    masks = {label.value: output[label.value] >= segmentation.threshold for label in segmentation.labels}
    return Decoded(masks=masks, probabilities={value: float(mask.any()) for value, mask in masks.items()})


def decode_output(output: Array, manifest: Manifest) -> Decoded:
    """Read the bundle's postprocessed output ``[C, slice, row, column]`` as the manifest's outputs say.

    A ``labelmap`` comes from one channel of label values (rounded) or from the argmax over channels (one-hot or
    probabilities); ``channels`` masks from each label's channel against ``threshold``; parametric maps from their
    channel. No voxel probabilities are kept: the postprocessing has discretised them.

    Raises
    ------
    InferenceError
        If the output has too few channels for the declared labels or maps.
    """
    segmentation = manifest.outputs.segmentation
    if segmentation is not None:
        if segmentation.kind == "channels":
            return _channels(output, segmentation)
        return _labelmap(output, segmentation)
    maps = manifest.outputs.parametric_maps
    if maps and output.shape[0] <= max(item.channel for item in maps):
        raise InferenceError(f"the bundle's output has {output.shape[0]} channel(s), too few for the declared maps")
    return Decoded(maps={item.name: output[item.channel] for item in maps})


def bundle_notes(manifest: Manifest) -> tuple[str, ...]:
    """What the job should say about a bundle pipeline's outputs: uncoded labels, discretised probabilities."""
    notes = ["ran the bundle's own preprocessing, inferer and postprocessing (inverted to the source grid)"]
    segmentation = manifest.outputs.segmentation
    for label in segmentation.labels if segmentation is not None else ():
        if label.type == GENERIC_TYPE:
            notes.append(
                f"label {label.name!r} has no SNOMED CT code the gateway knows: coded as generic Anatomical Structure"
            )
    if manifest.outputs.classifications:
        notes.append(
            "classifications need probabilities, which the bundle's postprocessing discretised: "
            "each is 1 where its segment is present"
        )
    return tuple(notes)
