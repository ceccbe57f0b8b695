"""The manifest of a MONAI model-zoo bundle as it comes: synthesised from its own ``configs``, no ``model.yaml`` needed.

A bare bundle folder (``configs/metadata.json``, ``configs/inference.json`` or ``.yaml``, ``models/model.pt`` or
``model.ts``, ``docs/`` optional) registers as a ``monai-bundle`` package whose weights are the folder itself
(``weights: "."``) and whose ``inference.pipeline`` is ``bundle`` (the bundle's own preprocessing, inferer and
postprocessing run). What the manifest needs is read from the bundle, as plain data (``json``,
``yaml.safe_load``): nothing of the bundle runs, and an expression (``$...``) or macro (``%...``) in a field read
is refused with the field's name.

- ``name``: the bundle folder's name in lower case (``wholeBody_ct_segmentation`` -> ``wholebody_ct_segmentation``);
  ``version``: ``metadata.json``'s;
- ``description``, ``authors``, ``intended_use`` from ``metadata.json``; ``licence`` from the ``LICENSE`` file's
  first line, else ``metadata.json``'s ``license`` or ``copyright`` (a missing one says where it was looked for);
- ``select.modality`` from the input's ``modality`` (``MRI`` -> ``MR``); ``inference.input_channels`` from its
  ``num_channels``; ``inference.patch_size``/``batch_size``/``overlap`` from the config's ``inferer``
  (``roi_size``, ``sw_batch_size``, ``overlap``) when they are literal, else the input's ``spatial_shape``;
- ``outputs.segmentation``: a ``labelmap`` with one label per output ``channel_def`` entry but the background,
  coded from pydicom's SNOMED CT dictionary by its name (:func:`label_codes`); a name it does not know gets
  :data:`~gateway.registry.manifest.GENERIC_CATEGORY`/``GENERIC_TYPE`` and keeps its own name as SegmentLabel.

A ``model.yaml`` beside the bundle (in its folder) with neither ``backend`` nor ``weights`` is an *override*: it is
merged over the synthesised manifest (mappings merged key by key, ``outputs.segmentation.labels`` per label
``value``, else ``name``; other lists replaced), and a field it gives is not read from the bundle at all. One that
wraps a bundle (``weights:`` naming the bundle's subfolder) without ``backend`` is an override of that bundle. A
``model.yaml`` with both ``backend`` and ``weights`` is a full manifest, read as it is (:func:`load_manifest`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from gateway.errors import ManifestError
from gateway.registry.manifest import (
    GENERIC_CATEGORY,
    GENERIC_TYPE,
    MANIFEST_NAME,
    NAME_PATTERN,
    Manifest,
    load_manifest,
    manifest_from_data,
    read_yaml_mapping,
)

__all__ = [
    "BUNDLE_CONFIGS",
    "BUNDLE_METADATA",
    "PALETTE",
    "is_bundle",
    "label_codes",
    "merge_override",
    "package_manifest",
]

#: The file that makes a folder a MONAI bundle.
BUNDLE_METADATA = "configs/metadata.json"

#: Segment colours, in channel order (cycled): distinct hues that read on a grey image.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)

#: A bundle's inference config under ``configs/``, in the order MONAI looks for it.
BUNDLE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")
_NAME = re.compile(NAME_PATTERN)
_SIDES = re.compile(r"\b(left|right)\b")
_ABNORMAL = {"Tumor", "Neoplasm", "Lesion", "Nodule", "Mass", "Cyst", "Metastasis"}
_CODE = dict[str, str]
_BACKGROUND = {"background", "bg", "other", "everything else"}
_MAX_REFS = 8
#: The manifest's ``inference`` fields read from the config's ``inferer`` (MONAI's sliding-window arguments).
_INFERER = {"patch_size": "roi_size", "batch_size": "sw_batch_size", "overlap": "overlap"}


def is_bundle(folder: Path) -> bool:
    """Whether ``folder`` is a MONAI bundle (it has ``configs/metadata.json``)."""
    return (folder / BUNDLE_METADATA).is_file()


def package_manifest(folder: Path, name: str | None = None) -> Manifest:
    """The manifest of the package in ``folder``: its ``model.yaml``, or one synthesised from the bundle in it.

    Parameters
    ----------
    folder
        The package folder: a folder with a full ``model.yaml``, a bare bundle (perhaps with an override
        ``model.yaml``), or a folder whose override ``model.yaml`` names a bundle subfolder in ``weights``.
    name
        The name of the bundle folder when ``folder`` is the bundle (an archive's top folder); default
        ``folder``'s own name. ``""``: the name is unknown (a bundle at the top of an archive), so the override
        must give one.

    Raises
    ------
    ManifestError
        If there is neither a ``model.yaml`` nor a bundle, a file is unreadable, a field read has an expression,
        or the resulting manifest breaks the schema (the message names each key and where it came from).
    """
    path = folder / MANIFEST_NAME
    override = read_yaml_mapping(path) if path.is_file() else None
    if override is None:
        if not is_bundle(folder):
            return load_manifest(folder)  # its "no model.yaml" error
        return _synthesised(folder, {}, folder.name if name is None else name, ".")
    has_backend, weights = "backend" in override, override.get("weights")
    if has_backend and weights is not None:
        return load_manifest(folder)
    if has_backend:
        raise ManifestError(
            f"{path}: names backend but not weights: a full manifest gives both; an override of a bundle's own "
            "description gives neither (or weights alone, naming the bundle's subfolder)"
        )
    if weights is None:
        if not is_bundle(folder):
            raise ManifestError(
                f"{path}: has neither backend nor weights, so it overrides a MONAI bundle's own description, but "
                f"{folder.name} has no {BUNDLE_METADATA}: give backend and weights for a full manifest"
            )
        return _synthesised(folder, override, folder.name if name is None else name, ".")
    bundle = _bundle_subfolder(folder, weights, path)
    return _synthesised(bundle, override, bundle.name, str(weights))


def _bundle_subfolder(folder: Path, weights: Any, path: Path) -> Path:
    if not isinstance(weights, str) or Path(weights).is_absolute() or ".." in Path(weights).parts:
        raise ManifestError(f"{path}: weights: must be a path inside the model folder")
    bundle = folder / weights
    if not is_bundle(bundle):
        raise ManifestError(
            f"{path}: weights: {weights!r} is not a MONAI bundle (no {BUNDLE_METADATA}); a model.yaml without "
            "backend overrides a bundle's own description"
        )
    return bundle


# --- synthesis ------------------------------------------------------------------------------------------------


def _synthesised(bundle: Path, override: dict[str, Any], folder_name: str, weights: str) -> Manifest:
    metadata = _read_json(bundle / BUNDLE_METADATA)
    reader = _Reader(bundle, metadata, override)
    data: dict[str, Any] = {
        "name": reader.get(("name",), lambda: _model_name(folder_name)),
        "version": reader.get(("version",), lambda: _version(metadata)),
        "description": reader.get(("description",), lambda: _description(metadata, bundle.name)),
        "authors": reader.get(("authors",), lambda: _authors(metadata)),
        "licence": reader.get(("licence",), lambda: _licence(bundle, metadata)),
        "intended_use": reader.get(("intended_use",), lambda: _intended_use(metadata)),
        "backend": "monai-bundle",
        "weights": weights,
        "select": {},
        "inference": {"pipeline": "bundle"},
        "outputs": {},
    }
    modality = reader.get(("select", "modality"), lambda: _modality(reader))
    if modality:
        data["select"]["modality"] = modality
    data["inference"].update(reader.inference())
    labels = _labels_or_overridden(reader)
    data["outputs"]["segmentation"] = {"kind": "labelmap", "activation": "softmax", "labels": labels}
    merged = merge_override(data, override)
    source = f"MONAI bundle {bundle.name} ({BUNDLE_METADATA}{' + ' + MANIFEST_NAME if override else ''})"
    return manifest_from_data(merged, source)


class _Reader:
    """Reads the bundle's fields as plain data, skipping those the override gives and refusing expressions."""

    def __init__(self, bundle: Path, metadata: dict[str, Any], override: dict[str, Any]) -> None:
        self.bundle = bundle
        self.metadata = metadata
        self.override = override
        self._config: dict[str, Any] | None = None

    def get(self, key: tuple[str, ...], read: Callable[[], Any]) -> Any:
        """``read()``, unless the override gives ``key`` (then the override's value, and the bundle's is not read)."""
        node: Any = self.override
        for part in key:
            if not isinstance(node, dict) or part not in node:
                return read()
            node = node[part]
        return node

    def field(self, where: str, value: Any) -> Any:
        """``value`` of the field ``where``; refused if it holds an expression or macro."""
        _no_code(where, value)
        return value

    def input(self) -> tuple[str, dict[str, Any]]:
        """The network input's key and description (``image`` when there are several)."""
        return _one(self.metadata, "inputs", "image")

    def output(self) -> tuple[str, dict[str, Any]]:
        """The network output's key and description (``pred`` when there are several)."""
        return _one(self.metadata, "outputs", "pred")

    def config(self) -> dict[str, Any]:
        """The inference config, read once as plain data."""
        if self._config is None:
            self._config = _read_config(self.bundle)
        return self._config

    def inference(self) -> dict[str, Any]:
        """``input_channels``, ``patch_size``, ``batch_size``, ``overlap``: those the bundle states literally."""
        key, spec = self.input()
        where = f"{BUNDLE_METADATA}: network_data_format.inputs.{key}"
        section = self.override.get("inference")
        given: dict[str, Any] = section if isinstance(section, dict) else {}
        found: dict[str, Any] = {}
        if "input_channels" not in given and "num_channels" in spec:
            found["input_channels"] = self.field(f"{where}.num_channels", spec["num_channels"])
        wanted = {theirs: ours for ours, theirs in _INFERER.items() if ours not in given}
        for theirs, value in (self._inferer(set(wanted)) if wanted else {}).items():
            found[wanted[theirs]] = value
        if "patch_size" not in given and "patch_size" not in found:
            shape = self.field(f"{where}.spatial_shape", spec.get("spatial_shape"))
            if _int_triple(shape):
                found["patch_size"] = shape
        return found

    def _inferer(self, wanted: set[str]) -> dict[str, Any]:
        """The ``wanted`` of the inferer's ``roi_size``/``sw_batch_size``/``overlap`` that are literal (``@id``
        followed)."""
        config = self.config()
        inferer = self._resolved("inferer", config.get("inferer"))
        if not isinstance(inferer, dict):
            return {}
        found = {}
        for key, valid in (("roi_size", _int_triple), ("sw_batch_size", _positive_int), ("overlap", _fraction)):
            if key not in wanted:
                continue
            value = self._resolved(f"inferer::{key}", inferer.get(key))
            if valid(value):
                found[key] = value
        return found

    def _resolved(self, where: str, value: Any) -> Any:
        """``value`` with a whole-string ``@id`` reference to a top-level item followed; code refused."""
        config = self.config()
        for _ in range(_MAX_REFS):
            if not isinstance(value, dict):  # a mapping's own items are not read (only those asked for)
                self.field(f"{self.bundle.name}/{_config_name(self.bundle)}: {where}", value)
            if not (isinstance(value, str) and value.startswith("@") and value[1:] in config):
                return value
            where, value = value[1:], config[value[1:]]
        return None


def _no_code(where: str, value: Any) -> None:
    if isinstance(value, str) and value.startswith(("$", "%")):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise ManifestError(
            f"{where} = {shown!r} is an expression or macro: the gateway reads a bundle's description as plain data "
            f"and runs none of it; give the value in a {MANIFEST_NAME} beside the bundle"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            _no_code(f"{where}.{key}", item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _no_code(f"{where}[{index}]", item)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManifestError(f"{path.parent.parent.name}/{BUNDLE_METADATA}: not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path.parent.parent.name}/{BUNDLE_METADATA}: expected a JSON object at the top level")
    return data


def _config_name(bundle: Path) -> str:
    for name in BUNDLE_CONFIGS:
        if (bundle / "configs" / name).is_file():
            return f"configs/{name}"
    raise ManifestError(f"MONAI bundle {bundle.name} has no configs/inference.json or .yaml")


def _read_config(bundle: Path) -> dict[str, Any]:
    name = _config_name(bundle)
    try:
        text = (bundle / name).read_text(encoding="utf-8")
        data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, RecursionError) as exc:
        raise ManifestError(f"{bundle.name}/{name}: not readable: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{bundle.name}/{name}: expected a mapping at the top level")
    return data


def _one(metadata: dict[str, Any], side: str, preferred: str) -> tuple[str, dict[str, Any]]:
    """The ``network_data_format.<side>`` entry: ``preferred`` if present, else the only one."""
    where = f"{BUNDLE_METADATA}: network_data_format.{side}"
    fmt = metadata.get("network_data_format")
    entries = fmt.get(side) if isinstance(fmt, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ManifestError(f"{where} is missing: the gateway cannot tell the model's {side}")
    key = preferred if preferred in entries else next(iter(entries)) if len(entries) == 1 else None
    if key is None or not isinstance(entries[key], dict):
        raise ManifestError(f"{where} has no {preferred!r} entry (found {sorted(entries)}); say which in a model.yaml")
    return key, entries[key]


def _int_triple(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_positive_int(v) for v in value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _fraction(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1


# --- the fields -------------------------------------------------------------------------------------------------


def _model_name(folder_name: str) -> str:
    name = folder_name.lower()
    if not folder_name:
        raise ManifestError(
            f"the bundle is at the top of the archive, so its folder name is unknown: put the bundle's folder in "
            f"the archive, or give name: in a {MANIFEST_NAME} beside the bundle"
        )
    if not _NAME.match(name):
        raise ManifestError(
            f"bundle folder {folder_name!r} lower-cased ({name!r}) is not a model name (a-z, 0-9, '.', '_', '-', "
            f"starting with a letter or digit, at most 64): give name: in a {MANIFEST_NAME} beside the bundle"
        )
    return name


def _version(metadata: dict[str, Any]) -> Any:
    version = metadata.get("version")
    _no_code(f"{BUNDLE_METADATA}: version", version)
    if version is None:
        raise ManifestError(f"{BUNDLE_METADATA} has no version: give version: in a {MANIFEST_NAME} beside the bundle")
    return str(version)


def _text(metadata: dict[str, Any], key: str) -> str | None:
    value = metadata.get(key)
    _no_code(f"{BUNDLE_METADATA}: {key}", value)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _description(metadata: dict[str, Any], bundle: str) -> str:
    found = _text(metadata, "description") or _text(metadata, "name") or _text(metadata, "task")
    return found or f"MONAI bundle {bundle} ({BUNDLE_METADATA} has no description, name or task)"


def _authors(metadata: dict[str, Any]) -> list[str]:
    value = metadata.get("authors")
    _no_code(f"{BUNDLE_METADATA}: authors", value)
    if isinstance(value, str) and value.strip():
        return [value.strip()]
    if isinstance(value, list) and value and all(isinstance(a, str) and a.strip() for a in value):
        return [a.strip() for a in value]
    return [f"unknown ({BUNDLE_METADATA} names no authors)"]


def _licence(bundle: Path, metadata: dict[str, Any]) -> str:
    licence = bundle / "LICENSE"
    if licence.is_file():
        try:
            lines = [line.strip() for line in licence.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{bundle.name}/LICENSE: not readable text: {exc}") from exc
        if lines:
            version = f", {lines[1]}" if len(lines) > 1 and lines[1].lower().startswith("version") else ""
            return f"{lines[0]}{version} (from the bundle's LICENSE file)"
    found = _text(metadata, "license") or _text(metadata, "copyright")
    return found or f"not stated (no LICENSE file, and no license or copyright in {BUNDLE_METADATA})"


def _intended_use(metadata: dict[str, Any]) -> str:
    return _text(metadata, "intended_use") or f"not stated ({BUNDLE_METADATA} has no intended_use)"


def _modality(reader: _Reader) -> list[str]:
    key, spec = reader.input()
    value = reader.field(f"{BUNDLE_METADATA}: network_data_format.inputs.{key}.modality", spec.get("modality"))
    if not isinstance(value, str) or not value.strip():
        return []
    modality = value.strip().upper()
    return ["MR" if modality in ("MR", "MRI") else modality]


def _labels_or_overridden(reader: _Reader) -> list[dict[str, Any]]:
    """The labels of the output's ``channel_def``; none when it is missing or unclear and the override gives labels
    (they must then be whole labels)."""
    outputs = reader.override.get("outputs")
    segmentation = outputs.get("segmentation") if isinstance(outputs, dict) else None
    given = isinstance(segmentation, dict) and isinstance(segmentation.get("labels"), list)
    try:
        return _labels(reader)
    except ManifestError:
        if given:
            return []
        raise


def _labels(reader: _Reader) -> list[dict[str, Any]]:
    key, spec = reader.output()
    where = f"{BUNDLE_METADATA}: network_data_format.outputs.{key}"
    channels = reader.field(f"{where}.channel_def", spec.get("channel_def"))
    if channels is None:
        channels = _from_classes(reader.metadata)
    if not isinstance(channels, dict) or not channels:
        raise ManifestError(
            f"{where}.channel_def is missing and pred_classes/label_classes do not name the channels plainly: give "
            f"outputs.segmentation.labels in a {MANIFEST_NAME} beside the bundle"
        )
    labels = []
    for index, label in sorted(_channels(channels, where).items()):
        if index == 0 and label.lower() in _BACKGROUND:
            continue
        category, kind = label_codes(label)
        colour = PALETTE[(index - 1) % len(PALETTE)]
        labels.append({"value": index, "name": label, "category": category, "type": kind, "color": list(colour)})
    return labels


def _channels(channels: dict[Any, Any], where: str) -> dict[int, str]:
    found = {}
    for key, label in channels.items():
        if not str(key).isdigit() or not isinstance(label, str) or not label.strip():
            raise ManifestError(f"{where}.channel_def: {key!r}: {label!r} is not a channel index and a label name")
        found[int(key)] = label.strip()
    return found


_CLASS = re.compile(r"(?:channel\s+)?(\d+)\s+is\s+([A-Za-z][\w\s-]*)")


def _from_classes(metadata: dict[str, Any]) -> dict[str, str] | None:
    """``channel_def`` told by ``pred_classes`` (else ``label_classes``) when it is unambiguous: every clause that
    says what something "is" reads ``[channel] N is NAME`` (``2 channels OneHot data, channel 1 is spleen, channel
    0 is background``), no index twice, no name with "and"/"or", channel 0 among them; else ``None``."""
    for key in ("pred_classes", "label_classes"):
        text = metadata.get(key)
        if not isinstance(text, str):
            continue
        found: dict[str, str] | None = {}
        for clause in (c.strip().rstrip(".") for c in re.split(r"[,;]", text)):
            match = _CLASS.fullmatch(clause)
            if match is None:
                if " is " in f" {clause} ":
                    found = None
                    break
                continue
            if found is None or match.group(1) in found or re.search(r"\b(and|or)\b", match.group(2)):
                found = None
                break
            found[match.group(1)] = match.group(2).strip()
        if found and "0" in found:
            return found
    return None


def label_codes(label: str) -> tuple[_CODE, _CODE]:
    """The Segmented Property Category and Type codes (SCT) of a label name, as manifest data.

    The name is looked up in pydicom's SNOMED CT dictionary as written, CamelCased (``inferior vena cava`` ->
    ``InferiorVenaCava``), and without ``left``/``right`` (``kidney_left`` -> ``Kidney``; the segment's name keeps
    the side). A found organ is an ``Anatomical Structure`` (SCT 91723000), a found tumour, lesion or nodule a
    ``Morphologically Abnormal Structure`` (SCT 49755003); a name not found gets
    :data:`~gateway.registry.manifest.GENERIC_CATEGORY` and ``GENERIC_TYPE``.
    """
    from pydicom.sr.codedict import codes

    for keyword in _keywords(label):
        try:
            code = getattr(codes.SCT, keyword)
        except AttributeError:
            continue
        if len(code.meaning) > 64:
            continue
        found = {"value": str(code.value), "scheme": code.scheme_designator, "meaning": code.meaning}
        abnormal = keyword in _ABNORMAL
        category = codes.SCT.MorphologicallyAbnormalStructure if abnormal else codes.SCT.AnatomicalStructure
        return {"value": str(category.value), "scheme": "SCT", "meaning": category.meaning}, found
    return GENERIC_CATEGORY.model_dump(), GENERIC_TYPE.model_dump()


def _keywords(label: str) -> list[str]:
    """The dictionary keywords tried for ``label``, in order."""
    spaced = re.sub(r"[_\-\s]+", " ", re.sub(r"(?<=[a-z])(?=[A-Z])", " ", label)).strip().lower()
    unsided = re.sub(r"\s+", " ", _SIDES.sub(" ", spaced)).strip()
    tried = [label.strip()]
    for words in (spaced, unsided):
        if words:
            tried.append("".join(w[:1].upper() + w[1:] for w in words.split(" ")))
    return [k for k in dict.fromkeys(tried) if k.isidentifier()]


# --- overrides --------------------------------------------------------------------------------------------------


def merge_override(base: Mapping[str, Any], override: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """``override`` merged over ``base``: mappings key by key, ``outputs.segmentation.labels`` per label
    ``value`` (else ``name``), any other value (lists included) replaced.

    Raises
    ------
    ManifestError
        If an override label names neither a value nor a name of ``base``'s labels and is not a whole label.
    """
    merged = dict(base)
    for key, value in override.items():
        path = f"{where}.{key}" if where else str(key)
        if path == "outputs.segmentation.labels" and isinstance(value, list):
            merged[key] = _merge_labels(list(base.get(key) or []), value)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = merge_override(base[key], value, path)
        else:
            merged[key] = value
    return merged


def _merge_labels(base: list[Any], override: list[Any]) -> list[Any]:
    labels = list(base)
    for index, item in enumerate(override):
        if not isinstance(item, dict):
            raise ManifestError(f"outputs.segmentation.labels[{index}]: expected a mapping")
        match = _label_index(labels, item)
        if match is None:
            if "value" not in item:
                names = ", ".join(repr(lab.get("name")) for lab in labels) or "none"
                raise ManifestError(
                    f"outputs.segmentation.labels[{index}]: no label named {item.get('name')!r} in the bundle's "
                    f"channel_def (its labels: {names}); give value: to add a label"
                )
            labels.append(item)
        else:
            labels[match] = merge_override(labels[match], item, "outputs.segmentation.labels")
    return labels


def _label_index(labels: list[Any], item: dict[str, Any]) -> int | None:
    key = "value" if "value" in item else "name"
    return next((i for i, label in enumerate(labels) if label.get(key) == item.get(key)), None)
