"""Shared engine for both trainers: corpus and token shards, the training loop,
checkpoints, metrics and packaging. Model-specific code stays with its model."""
