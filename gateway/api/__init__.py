"""HTTP face: DICOMweb (STOW-RS, QIDO-RS, WADO-RS) and the JSON API, over FastAPI."""
