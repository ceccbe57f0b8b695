"""Synthetic data generators for demos, tests, benchmarks and model training.

The :mod:`gateway.synth.ct` module renders an analytic thorax phantom into a
standards-conformant DICOM CT series with known ("truth") lung nodules.
"""
