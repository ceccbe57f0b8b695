"""Inference: backends behind one Protocol, a batcher per model, pre- and post-processing around them."""
