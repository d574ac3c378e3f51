"""The project's one TF32 policy: fp32 means fp32.

Training, sampling, evaluation and the benchmarks all set it through `set_tf32` (main.py and sample.py at start,
the benchmarks and the GPU check around what they measure). Speed comes from bf16/fp16 autocast (`--bf16`,
`--dtype`), whose matrix products never use TF32 anyway; what stays in fp32 under autocast (norms, the loss, the
sampler's state) and every fp32 run keep full precision, so an fp32 run on a GPU matches the CPU to fp32 rounding
and the parity fixtures hold at 1e-4. `tf32(True)` is there for a measurement that wants to compare.
"""
import contextlib

import torch

TF32 = False  # the policy: no TF32 in matrix products or convolutions


def tf32_enabled():
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


def set_tf32(enabled=TF32):
    """Allow (or forbid) TF32 in CUDA matrix products and cuDNN convolutions; returns the previous setting.
    Harmless without a GPU (the flags are only read by CUDA kernels)."""
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(enabled)
    return previous


@contextlib.contextmanager
def tf32(enabled):
    """`set_tf32(enabled)` inside the block, the previous setting restored after it."""
    matmul, cudnn = set_tf32(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
