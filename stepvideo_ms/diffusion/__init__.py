"""Sampling: the flow-matching scheduler and the video pipeline."""
