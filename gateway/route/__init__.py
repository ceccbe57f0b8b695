"""Routing: pure functions from a series' metadata and the enabled models' rules to the models to run, with reasons."""
