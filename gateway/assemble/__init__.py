"""Assemble: from the stored instances of a series to volumes with the geometry the scanner measured."""
