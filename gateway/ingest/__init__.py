"""Ingest: DIMSE C-STORE SCP, STOW-RS parsing, validation of received instances, series completion."""
