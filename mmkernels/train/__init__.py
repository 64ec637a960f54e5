"""Trainer, data, checkpoints, memory features. Filled by the training-engine issue."""
