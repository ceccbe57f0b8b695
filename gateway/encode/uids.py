"""UIDs of the objects a job writes: the same for a re-run of the same job, different for anything else.

A PACS that receives an instance again under the same SOP Instance UID replaces it; under a new UID it stores a
second copy. A job that is run again (after a restart, a retry, or by ``gateway run`` on the same files) must
therefore give its outputs the same UIDs, and a new series revision or another model must not. Every UID here is a
name-based UUID (ISO/IEC 9834-8, UUID version 5, SHA-1) in the ``2.25`` arc (PS3.5 B.2), named by:

- the source: its Series Instance UID and every SOP Instance UID (and frame) the volume was built from,
- the model: its name, version and the SHA-256 of its weights,
- what the UID is for: ``series SEG``, ``instance SEG 1``, ``tracking nodule 2``, ...

so it depends on nothing else (not the time, not the job's number, not the gateway's version).
"""

from __future__ import annotations

import hashlib
import uuid

from gateway.assemble.model import Volume

__all__ = ["OutputUIDs", "stable_uid"]

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dicom-ai-gateway:outputs")
_SEPARATOR = "\x1f"  # unit separator: ("ab", "c") and ("a", "bc") name different UIDs


def stable_uid(*parts: str) -> str:
    """``2.25.<int>`` of the name-based UUID of ``parts`` (at most 44 characters, a valid UID)."""
    if not parts:
        raise ValueError("stable_uid needs at least one part")
    return f"2.25.{uuid.uuid5(_NAMESPACE, _SEPARATOR.join(parts)).int}"


def _source_digest(volume: Volume) -> str:
    """SHA-256 over the volume's series and its slices' sources (every 3D volume of a 4D one)."""
    digest = hashlib.sha256(volume.series_instance_uid.encode())
    for refs in volume.slices_4d or (volume.slices,):
        for ref in refs:
            digest.update(f"{_SEPARATOR}{ref.sop_instance_uid}:{ref.frame}:{ref.tile}".encode())
    return digest.hexdigest()


class OutputUIDs:
    """The UIDs of one model result's objects.

    Parameters
    ----------
    volume
        The source volume the model ran on.
    model_name, model_version, sha256
        The model (``sha256`` of its weights).
    """

    def __init__(self, volume: Volume, model_name: str, model_version: str, sha256: str) -> None:
        self._base = (_source_digest(volume), model_name, model_version, sha256)

    def _uid(self, *parts: str) -> str:
        return stable_uid(*self._base, *parts)

    def series(self, kind: str) -> str:
        """Series Instance UID of the object of ``kind`` (``SEG``, ``SR``, ``GSPS``, ...)."""
        return self._uid("series", kind)

    def instance(self, kind: str, number: int = 1) -> str:
        """SOP Instance UID of the ``number``-th object of ``kind``."""
        return self._uid("instance", kind, str(number))

    def tracking(self, label: int, lesion: int = 0) -> str:
        """Tracking UID of a segment (``lesion`` 0) or of one of its lesions (numbered from 1)."""
        return self._uid("tracking", str(label), str(lesion))
