"""Mixed precision: the dtype names that the command lines take, and the one autocast context of the project
(training steps, evaluation, sample.py and the benchmarks all go through it)."""
import contextlib

import torch

# --eval_dtype / --dtype names; fp32 means no autocast
DTYPES = {None: None, "fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def dtype_from_name(name):
    """torch dtype of an autocast name (None for fp32); a ValueError names the choices."""
    key = name.lower() if isinstance(name, str) else name
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of fp32, bf16, fp16 (or None), got {name!r}")
    return DTYPES[key]


def autocast(device, dtype):
    """torch.autocast on `device` in `dtype`; no autocast when dtype is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def training_precision(amp, device):
    """(autocast dtype, GradScaler) for --amp fp16|bf16|fp32. None: the published default, fp16 autocast with
    loss scaling on CUDA, fp32 elsewhere. fp16 scales the loss on any device (on CPU too, so that its
    overflow handling runs where there is no GPU); bf16 and fp32 need no scaling."""
    device = torch.device(device)
    dtype = dtype_from_name(amp if amp is not None else "fp16" if device.type == "cuda" else "fp32")
    return dtype, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
