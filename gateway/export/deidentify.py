"""De-identified research copies (PS3.15 Annex E): a destination with ``deidentify`` set gets each job's inputs
and outputs de-identified at send time, with consistent pseudonyms, each checked for residual PHI.

What is done to each copy (:class:`Deidentifier`):

- the **Basic Application Level Confidentiality Profile** (PS3.15 E.1-1): each attribute of Table E.1-1 gets its
  action (X removed, Z emptied, D given a dummy value, U a new UID, X/Z/U* sequences kept with their UIDs replaced),
  in the data set, in every nested sequence and in the file meta; private attributes are removed. The table is the
  one the ``dicom-anonymizer`` package maintains (Kitware, ``dicomfields_2026c``), not a list kept here;
- **pseudonyms** from ``dicognito``: names, IDs (Patient ID, Accession Number, Study ID, ...), institutions and every
  UID are replaced by values derived from the original and a seed, so the same original always gets the same
  pseudonym. The seed comes from a secret kept in the data folder (:data:`KEY_FILE`, made mode 0600 at first use)
  and the destination's name (:func:`pseudonym_seed`): a study, its SEG, SR, GSPS and KO get the same new UIDs for
  the same originals (their references stay consistent), and so does a patient sent again later;
- the options of Table E.1-1 the settings name that can be honoured (:data:`HONOURED`): Retain Longitudinal
  Temporal Information with Modified Dates (every date and time shifted by one offset of the seed, dicognito's
  way; the Patient's Birth Date is still emptied), with Full Dates (dates and times kept), and Retain UIDs. The
  others are refused when the settings load (:class:`gateway.config.DeidentifySettings` says why for each):
  Retain Patient Characteristics, Device Identity and Institution Identity need their columns of Table E.1-1,
  which the dicom-anonymizer table does not carry (it has the Basic Profile column only) and no other library
  the gateway can install does; Retain Safe Private needs a maintained list of safe private attributes (E.3.10,
  Table E.3.10-1); the clean options need free-text and graphics cleaning;
- Patient Identity Removed ``YES``, De-identification Method and its Code Sequence (113100 and an entry per option).

An image with burned-in annotation (Burned In Annotation ``YES``, such as the gateway's key images) is not
de-identified by the profile (it does not clean pixel data): its delivery is ``refused`` with that reason.

Then the **residual-PHI check** (:func:`residual_phi`) walks the copy (every element, private ones, nested
sequences and the file meta) for the original Patient's Name (and its components), Patient ID, Patient's Birth Date
and Accession Number. A hit fails the delivery (``dead``, not sent) with a reason naming the tag path, never the
value; the check's result is kept in the delivery's history entry (``"phi_check": "passed"`` or ``"failed: ..."``:
:func:`note_phi_check`).

:class:`DeidentifyingSender` wraps a destination's sender: it writes each copy to the store's temporary folder,
hands the copies to the wrapped sender and removes them after the send; the stored original stays as received.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import pydicom
from dicognito.anonymizer import Anonymizer
from dicognito.element_anonymizer import ElementAnonymizer
from dicomanonymizer.dicomfields_selector import (  # type: ignore[import-untyped]
    dicom_anonymization_database_selector,
)
from dicomanonymizer.simpledicomanonymizer import empty_element, replace_element  # type: ignore[import-untyped]
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag, Tag

from gateway.config import DeidentifySettings
from gateway.errors import ExportError, one_line
from gateway.export.destinations import Report, Sender
from gateway.export.outcome import Item, Kind, Outcome
from gateway.store.files import create_secret_file, keep_private
from gateway.store.index import Delivery
from gateway.store.store import StoreIndex

__all__ = [
    "HONOURED",
    "KEY_FILE",
    "TABLE_VERSION",
    "CheckedOutcome",
    "DeidentifiedCopy",
    "Deidentifier",
    "DeidentifyingSender",
    "Identity",
    "note_phi_check",
    "pseudonym_seed",
    "residual_phi",
]

log = logging.getLogger(__name__)

#: The data folder's pseudonym secret (mode 0600): the seed of every research destination derives from it.
KEY_FILE = "deidentify.key"
#: The options of Table E.1-1 this de-identifier honours (:class:`gateway.config.DeidentifySettings` refuses the
#: others when the settings load).
HONOURED: Final = frozenset({"retain_longitudinal_modified_dates", "retain_longitudinal_full_dates", "retain_uids"})
#: The version of PS3.15 Table E.1-1 of the dicom-anonymizer package used.
TABLE_VERSION = "dicomfields_2026c"
_METHOD = "PS3.15 E.1-1 Basic Profile (dicognito, dicom-anonymizer)"  # De-identification Method (LO, 64 chars)

#: PS3.16 CID 7050 De-identification Method: the profile and each option, by settings name.
_CODES: dict[str, tuple[str, str]] = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_graphics": ("113103", "Clean Graphics Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_longitudinal_full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_longitudinal_modified_dates": (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}

#: Table E.1-1 action of each category of the dicom-anonymizer table (compound actions by what they fall back to).
_CATEGORIES = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}
#: Sequences: emptied (Z first: a Type 2 sequence must stay), removed (Type 3 only), else kept and walked.
_SQ_EMPTIED = frozenset({"Z", "X/Z", "X/Z/D"})
_SQ_REMOVED = frozenset({"X", "X/D"})
_EMPTIED = frozenset({"Z", "X/Z"})
_DATES = frozenset({"DA", "DT", "TM"})
_DUMMY_DATES = {"DA": "19000101", "TM": "000000", "DT": "19000101000000"}
#: No option of Table E.1-1 retains it (E.3.6 keeps the study's time line, not the patient's age).
_BIRTH_DATE = Tag(0x0010, 0x0030)
#: Values not searched for PHI (but in private elements): bulk and binary numbers, and coded or numeric strings
#: (a Patient's Name "HFS" is no leak in Patient Position, nor a Patient ID "12" in Instance Number).
_NOT_SEARCHED = frozenset(
    {"OW", "OF", "OD", "OL", "OV", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT", "CS", "IS", "DS", "AS"}
)
_PIXEL_GROUP = 0x7FE0
#: Where a single component of the patient's name is looked for: names, and private or unknown values. Elsewhere
#: a component is no evidence (a family name "Long" in "Long axis", "Phantom" in a model's intended use); the
#: whole name, also as free text writes it ("Jane Doe", "Doe, Jane"), is looked for everywhere.
_NAME_VRS = frozenset({"PN", "UN", "OB"})
_COMPONENT = "PatientName component"
_SHORTEST_TOKEN = 3  # shorter needles match whole values only (an ID "12" inside any number is no evidence)


class DeidentifyError(ExportError):
    """A file could not be de-identified (unreadable, or a value the profile cannot handle)."""


@dataclass(frozen=True)
class Identity:
    """What the residual-PHI check looks for: the original patient's name, ID, birth date and accession number."""

    patient_name: str
    patient_id: str
    birth_date: str
    accession_number: str

    @classmethod
    def of(cls, ds: Dataset) -> Identity:
        """The identity in ``ds`` as received (before de-identification)."""
        return cls(
            str(ds.get("PatientName", "") or ""),
            str(ds.get("PatientID", "") or ""),
            str(ds.get("PatientBirthDate", "") or ""),
            str(ds.get("AccessionNumber", "") or ""),
        )

    def needles(self) -> list[tuple[str, str]]:
        """(what, value) pairs to search for: each value, the name as free text writes it and its components, the
        birth date ISO-written."""
        found: list[tuple[str, str]] = []
        for what, value in (
            ("PatientName", self.patient_name),
            ("PatientID", self.patient_id),
            ("PatientBirthDate", self.birth_date),
            ("AccessionNumber", self.accession_number),
        ):
            if value.strip():
                found.append((what, value.strip()))
        parts = [part.strip() for part in re.split(r"[\^=]", self.patient_name)]
        if len(parts) >= 2 and parts[0] and parts[1]:  # the name as free text writes it: "Jane Doe", "Doe, Jane"
            family, given = parts[0], parts[1]
            found += [("PatientName", f"{given} {family}"), ("PatientName", f"{family} {given}")]
            found.append(("PatientName", f"{family}, {given}"))
        found += [(_COMPONENT, part) for part in parts if len(part) >= 2]
        if re.fullmatch(r"\d{8}", self.birth_date):
            iso = f"{self.birth_date[:4]}-{self.birth_date[4:6]}-{self.birth_date[6:]}"
            found.append(("PatientBirthDate", iso))
        return list(dict.fromkeys(found))


def residual_phi(ds: Dataset, identity: Identity) -> str | None:
    """Where ``ds`` (file meta, data set, private elements and nested sequences) still holds ``identity``.

    A value is found when it is a whole value of an element (any length), or, when it is at least three characters
    long, a token of a text (not preceded or followed by a letter or digit; case-insensitive). Values of coded,
    numeric and bulk data VRs (CS, IS, DS, AS, US, FL, OW, pixel data, ...) are searched only in private elements.
    A single component of the name (family, given, middle name, ...) is looked for in names (PN) and private or
    unknown values only; the whole name (also written "Given Family", "Family Given" and "Family, Given"), the IDs
    and the birth date everywhere else.

    Returns
    -------
    str or None
        ``"PatientID at (0009,1010)"`` or ``"PatientName component at (0040,A730)[0] > (0040,A123)"`` (the tag
        path, never the value); ``None`` when nothing is left.
    """
    patterns = [(what, value, _token(value)) for what, value in identity.needles()]
    if not patterns:
        return None
    meta = getattr(ds, "file_meta", None)
    for path, free, text in [*(_texts(meta, "") if meta is not None else []), *_texts(ds, "")]:
        for what, value, token in patterns:
            if what == _COMPONENT and not free:
                continue
            if text.strip().upper() == value.upper() or (token is not None and token.search(text)):
                return f"{what} at {path}"
    return None


def _token(value: str) -> re.Pattern[str] | None:
    if len(value) < _SHORTEST_TOKEN:
        return None
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(value)}(?![A-Za-z0-9])", re.IGNORECASE)


def _texts(ds: Dataset, prefix: str) -> Iterator[tuple[str, bool, str]]:
    """(tag path, whether a name or private value, text) of every searchable value of ``ds``, nested sequences
    included."""
    for elem in ds:
        path = f"{prefix}{_tag_text(elem.tag)}"
        if elem.VR == "SQ":
            for k, item in enumerate(elem.value or []):
                yield from _texts(item, f"{path}[{k}] > ")
            continue
        if elem.tag.group == _PIXEL_GROUP or (elem.VR in _NOT_SEARCHED and not elem.tag.is_private):
            continue
        free = elem.tag.is_private or elem.VR in _NAME_VRS
        for value in _values(elem.value):
            yield path, free, value


def _values(value: Any) -> Iterator[str]:
    if value is None:
        return
    if isinstance(value, bytes | bytearray):
        yield bytes(value).decode("latin-1").strip("\0 ")
    elif isinstance(value, pydicom.valuerep.PersonName):
        yield str(value)
        yield from (str(part) for part in value.components)
    elif isinstance(value, str | int | float) or not hasattr(value, "__iter__"):
        yield str(value)
    else:
        for one in value:
            yield from _values(one)


def _tag_text(tag: BaseTag) -> str:
    return f"({tag.group:04X},{tag.element:04X})"


class _Table:
    """PS3.15 Table E.1-1 (basic profile column) as dicom-anonymizer maintains it: tag -> action."""

    def __init__(self, version: str = TABLE_VERSION) -> None:
        database = dicom_anonymization_database_selector(version)
        self._single: dict[int, str] = {}
        self._ranges: list[tuple[int, int, int, int, str]] = []
        for category, action in _CATEGORIES.items():
            for tag in database[category]:
                if len(tag) == 2:
                    self._single[int(Tag(tag[0], tag[1]))] = action
                else:
                    self._ranges.append((tag[0], tag[1], tag[2], tag[3], action))

    def action(self, tag: BaseTag) -> str | None:
        """The Basic Profile's action for ``tag`` (``"X"``, ``"Z"``, ``"D"``, ``"U"``, ``"X/Z/U*"``, ...), or
        ``None`` when the table does not list it (the attribute is kept)."""
        found = self._single.get(int(tag))
        if found is not None:
            return found
        for group, element, group_mask, element_mask, action in self._ranges:
            if tag.group & group_mask == group & group_mask and tag.element & element_mask == element & element_mask:
                return action
        return None


@functools.cache
def _table() -> _Table:
    """The table, built once (read-only afterwards)."""
    return _Table()


@dataclass
class _Pending:
    """An attribute the table replaces or empties unless dicognito gave it a pseudonym (checked after its walk)."""

    dataset: Dataset
    tag: BaseTag
    action: str
    original: Any


class _ProfileHandler(ElementAnonymizer):
    """Table E.1-1's actions, run first in dicognito's walk: True when it settled the element, False to let
    dicognito's handlers (UIDs, names, IDs, dates) have it."""

    def __init__(self, table: _Table, options: frozenset[str]) -> None:
        self._table = table
        self._keep_uids = "retain_uids" in options
        self._full_dates = "retain_longitudinal_full_dates" in options
        self._shifted_dates = "retain_longitudinal_modified_dates" in options
        self.pending: list[_Pending] = []

    def __call__(self, dataset: Dataset, data_element: DataElement) -> bool:
        tag, vr = data_element.tag, data_element.VR
        if tag.is_private:
            del dataset[tag]
            return True
        action = self._table.action(tag)
        if action == "X" or (vr == "SQ" and action in _SQ_REMOVED):
            del dataset[tag]
            return True
        if vr == "SQ":
            if action in _SQ_EMPTIED:
                data_element.value = []
            return False  # dicognito's walk goes into the items that are left
        if vr == "UI":
            return self._keep_uids  # dicognito replaces it (class and transfer syntax UIDs excepted)
        if tag == _BIRTH_DATE:
            _apply(data_element, action or "Z")
            return True
        if vr in _DATES:
            if self._full_dates:
                return True
            if self._shifted_dates or action is None:
                return False  # dicognito shifts it
            _apply(data_element, action)
            return True
        if action is not None:
            self.pending.append(_Pending(dataset, tag, action, data_element.value))
        return False

    def describe_actions(self) -> Iterator[str]:
        """What this handler does, as dicognito lists its handlers' actions."""
        yield f"Apply PS3.15 Table E.1-1 (basic profile, {TABLE_VERSION}) and remove private attributes"

    def settle(self) -> None:
        """Apply the table's action to the attributes dicognito left as they were."""
        for pending in self.pending:
            elem = pending.dataset.get(pending.tag)
            if elem is not None and elem.value == pending.original:
                _apply(elem, pending.action)


def _apply(elem: DataElement, action: str) -> None:
    """Z (and X/Z) empties, the other actions give a dummy value of the VR (dicom-anonymizer's; for dates and times
    a zero length, or a valid dummy: its ``00010101`` is refused by validators such as dciodvfy)."""
    if elem.VR in _DATES:
        elem.value = "" if action in _EMPTIED else _DUMMY_DATES[elem.VR]
    elif action in _EMPTIED:
        empty_element(elem)
    else:
        replace_element(elem)


@dataclass(frozen=True)
class DeidentifiedCopy:
    """A de-identified copy written to ``path``: its new SOP Instance UID, and the residual-PHI check's result."""

    path: Path
    sop_instance_uid: str
    phi_check: str


class Deidentifier:
    """De-identifies data sets for one research destination (thread-safe).

    Parameters
    ----------
    settings
        The destination's ``deidentify`` settings (profile and options).
    seed
        The pseudonym seed (:func:`pseudonym_seed`): the same seed gives the same pseudonyms.

    Raises
    ------
    ValueError
        If an option is not one this de-identifier honours, or ``seed`` is empty.
    """

    def __init__(self, settings: DeidentifySettings, seed: str) -> None:
        refused = sorted(set(settings.options) - HONOURED)
        if refused:
            raise ValueError(f"settings.options: {refused} cannot be honoured; supported: {sorted(HONOURED)}")
        if not seed:
            raise ValueError("seed must not be empty")
        self.settings = settings
        self._options = frozenset(settings.options)
        self._seed = seed
        self._table = _table()

    def deidentify(self, ds: Dataset) -> None:
        """De-identify ``ds`` (and its file meta) in place.

        Raises
        ------
        DeidentifyError
            If ``ds`` has burned-in annotation (its pixel data is not cleaned by the profile).
        """
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            raise DeidentifyError("burned-in annotation (BurnedInAnnotation YES): the profile does not clean pixels")
        anonymizer = Anonymizer(seed=self._seed)
        profile = _ProfileHandler(self._table, self._options)
        anonymizer.add_element_handler(profile)
        anonymizer.anonymize(ds)
        profile.settle()
        self._record(ds)

    def _record(self, ds: Dataset) -> None:
        """Patient Identity Removed, De-identification Method and its Code Sequence (PS3.3 C.7.1.1)."""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = _METHOD
        items = []
        for name in [self.settings.profile, *dict.fromkeys(self.settings.options)]:
            value, meaning = _CODES[name]
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = items

    def copy(self, src: Path, dest: Path) -> DeidentifiedCopy:
        """Write a de-identified copy of the DICOM file ``src`` to ``dest``, after the residual-PHI check.

        Raises
        ------
        DeidentifyError
            If ``src`` cannot be read or de-identified, or the check found PHI left (the reason names the tag
            path; ``dest`` is not written then).
        """
        try:
            ds = pydicom.dcmread(src)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise DeidentifyError(f"cannot read the stored file: {type(exc).__name__}") from None
        identity = Identity.of(ds)
        try:
            self.deidentify(ds)
        except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError) as exc:
            raise DeidentifyError(f"cannot de-identify: {type(exc).__name__}: {one_line(str(exc), 200)}") from None
        found = residual_phi(ds, identity)
        if found is not None:
            raise ResidualPHI(f"residual PHI check failed: {found}", f"failed: {found}")
        try:
            ds.save_as(dest, enforce_file_format=True)
        except (ValueError, TypeError, OSError) as exc:
            raise DeidentifyError(f"cannot write the copy: {type(exc).__name__}: {one_line(str(exc), 200)}") from None
        return DeidentifiedCopy(dest, str(ds.SOPInstanceUID), "passed")


class ResidualPHI(DeidentifyError):
    """The residual-PHI check found an original identifier in the copy (``phi_check`` says where)."""

    def __init__(self, reason: str, phi_check: str) -> None:
        super().__init__(reason)
        self.phi_check = phi_check


def pseudonym_seed(data_dir: Path, destination: str) -> str:
    """The pseudonym seed of ``destination``: an HMAC of its name under the data folder's secret (:data:`KEY_FILE`,
    made with mode 0600 at first use). The seed and the secret are never logged."""
    key = _secret(data_dir / KEY_FILE)
    return hmac.new(key, b"gateway deidentify\0" + destination.encode("utf-8"), hashlib.sha256).hexdigest()


def _secret(path: Path) -> bytes:
    """The secret in ``path``, made first if there is none (never replaced: a second maker's link fails)."""
    if not path.exists() and create_secret_file(path, secrets.token_hex(32) + "\n"):
        log.info("made the pseudonym secret of research destinations: %s", path.name)
    if keep_private(path):
        log.warning("%s was readable by others: made readable by its owner only", path.name)
    text = path.read_text(encoding="ascii").strip()
    if len(text) < 32:
        raise ExportError(f"{path.name} in the data folder is damaged (too short): restore it from a backup")
    return text.encode("ascii")


@dataclass(frozen=True)
class CheckedOutcome(Outcome):
    """An attempt's outcome with the residual-PHI check's result (``"passed"`` or ``"failed: ..."``)."""

    phi_check: str = ""


class DeidentifyingSender:
    """A sender that sends de-identified copies of each item through ``inner`` (thread-safe if ``inner`` is).

    Parameters
    ----------
    inner
        The destination's own sender (C-STORE or STOW-RS).
    deidentifier
        How the copies are made.
    temp_dir
        Where the copies are written (the store's temporary folder); each is removed after its batch.
    """

    def __init__(self, inner: Sender, deidentifier: Deidentifier, temp_dir: Path) -> None:
        self.inner = inner
        self.deidentifier = deidentifier
        self.temp_dir = temp_dir

    def send(self, items: Sequence[Item], report: Report, stopping: Callable[[], bool]) -> None:
        """De-identify each item (one that fails is reported, not sent), then send the copies."""
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        copies: dict[int, tuple[Item, Item]] = {}
        try:
            for item in items:
                if stopping():
                    break
                made = self._copy(item, report)
                if made is not None:
                    copies[item.id] = (item, made)

            def relay(copy: Item, outcome: Outcome) -> None:
                original = copies[copy.id][0]
                report(original, CheckedOutcome(outcome.kind, outcome.reason, outcome.status, "passed"))

            if copies:
                self.inner.send([made for _, made in copies.values()], relay, stopping)
        finally:
            for _, made in copies.values():
                made.path.unlink(missing_ok=True)

    def _copy(self, item: Item, report: Report) -> Item | None:
        """The de-identified copy of ``item`` as an item to send; ``None`` when it failed (reported)."""
        dest = self.temp_dir / f"deid-{secrets.token_hex(8)}.dcm"
        try:
            made = self.deidentifier.copy(item.path, dest)
        except ResidualPHI as exc:
            report(item, CheckedOutcome(Kind.DEAD, exc.reason, None, exc.phi_check))
            return None
        except DeidentifyError as exc:
            dest.unlink(missing_ok=True)
            refused = exc.reason.startswith("burned-in")
            report(item, CheckedOutcome(Kind.REFUSED if refused else Kind.DEAD, exc.reason, None, "not run"))
            return None
        return replace(item, path=made.path, sop_instance_uid=made.sop_instance_uid)

    def close(self) -> None:
        """Close the wrapped sender."""
        self.inner.close()


def note_phi_check(store: StoreIndex, delivery_id: int, at: float, result: str) -> bool:
    """Add ``"phi_check": result`` to the history entry recorded at ``at`` of delivery ``delivery_id`` (the one
    :func:`gateway.export.queue.record` just wrote); whether it was found."""
    with store.write_sessions.begin() as session:
        row = session.get(Delivery, delivery_id, with_for_update=True)
        if row is None or not row.history:
            return False
        history = list(row.history)
        for k in range(len(history) - 1, -1, -1):
            if history[k].get("at") == round(at, 3):
                history[k] = {**history[k], "phi_check": result}
                row.history = history
                return True
    return False
