"""The encode stage: a model's results as DICOM objects in the source study, built with highdicom.

- :mod:`~gateway.encode.seg`: a segmentation as a SEG (BINARY or LABELMAP),
- :mod:`~gateway.encode.sr`: its measurements and findings as a Comprehensive 3D SR, TID 1500,
- :mod:`~gateway.encode.findings`: what a reader is shown: one finding per lesion or whole segment, outlines,
- :mod:`~gateway.encode.gsps`: the outlines as a Grayscale Softcopy Presentation State,
- :mod:`~gateway.encode.ko`: the key images as a Key Object Selection document,
- :mod:`~gateway.encode.keyimages`: burned-in Secondary Capture key images,
- :mod:`~gateway.encode.pmap`: parametric maps as float32 Parametric Maps,
- :mod:`~gateway.encode.uids`: UIDs that a re-run of the same job repeats,
- :mod:`~gateway.encode.frames`: where the frames lie and which source frames they cite,
- :mod:`~gateway.encode.encode`: :func:`encode_result` (all of it for one result) and :func:`write_objects`.
"""

from __future__ import annotations

from gateway.encode.common import EncodedObject
from gateway.encode.encode import encode_result, object_filename, write_objects

__all__ = ["EncodedObject", "encode_result", "object_filename", "write_objects"]
