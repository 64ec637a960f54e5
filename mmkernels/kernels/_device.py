"""What the launch helpers ask of a tensor's device, in one place.

compiled(device): the kernels are compiled for a GPU (GPU tiles, many programs), rather than run by the
Triton interpreter on CPU tensors (small tiles, programs run one after another). sm_count(device): the GPU's
multiprocessor count, for split sizes. tools/compile_check.py overrides both to compile the GPU
configurations for Hopper on a machine without a GPU.
"""

from __future__ import annotations

import torch


def compiled(device: torch.device) -> bool:
    return device.type == "cuda"


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
