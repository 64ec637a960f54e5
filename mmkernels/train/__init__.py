"""Trainer (`mmkernels train`), data, checkpoints, memory estimate, distributed training, serving of adapters."""
