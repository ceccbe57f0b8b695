"""Export: sending DICOM objects to other nodes (C-STORE SCU; later STOW-RS and retry policy)."""
