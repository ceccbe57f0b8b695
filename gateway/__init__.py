"""DICOM AI inference gateway.

Data flows one way, one sub-package per stage: ``ingest -> store -> assemble -> route -> infer -> encode ->
export``; ``jobs`` drives a completed series through them, ``api`` and ``cli`` are the faces. Importing the
package starts nothing.
"""

__version__ = "0.1.0"
