"""Writing files atomically (checkpoints, JSON records, images: the project's one writer), and the random-number
state an exact resume needs.

A checkpoint keeps the released entries (model, model_ema, optimizer, epoch, args, scaler) and adds
`train_state` (where in the epoch the run stopped) and `rng` (one entry per rank, indexed by rank). Files
are written to a temporary name in the same folder and renamed, so a crash never leaves a torn
checkpoint-last.pth; numbered checkpoints are never deleted. A run killed during a write leaves the temporary
file behind: the next run in that folder removes it (`remove_stale_temp_files`).
"""
import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import tempfile

import numpy as np
import torch

from util.errors import UserError

LAST = "checkpoint-last.pth"


def checkpoint_name(epochs_done=None):
    """checkpoint-last.pth, or checkpoint-<epochs completed>.pth."""
    return LAST if epochs_done is None else f"checkpoint-{epochs_done}.pth"


# ".<final name>.<random characters>.tmp": the temporary names atomic_write uses (tempfile's 8 characters; older
# versions wrote image files as ".<name>.<pid>.tmp")
_TEMP_RE = re.compile(r"^\..+\.[a-z0-9_]+\.tmp$")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


class DiskFullError(UserError, OSError):
    """A write that found no space (or quota) left; the file it would have replaced is untouched."""


def _size(nbytes):
    return f"{nbytes / 2**20:.1f} MiB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GiB"


def atomic_write(path, write, size_hint=None):
    """Call write(tmp_path), then rename onto `path`; the temporary file is removed on failure. The file gets
    the permissions of the user's umask, as any other tool's output (mkstemp would leave it 0600). A full disk
    raises DiskFullError naming the folder, the space free and (with `size_hint`, bytes) the space needed."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as e:
        _raise_if_disk_full(e, path, size_hint)
        raise
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        _raise_if_disk_full(e, path, size_hint)
        raise


def _raise_if_disk_full(error, path, size_hint):
    if isinstance(error, DiskFullError) or not isinstance(error, (OSError, RuntimeError)):
        return
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    # torch's zip writer fails with a RuntimeError ("file write failed") that does not say why: the space
    # left tells
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        (size_hint is not None and free < size_hint)
    if not full:
        return
    need = f" (it needs about {_size(size_hint)})" if size_hint else ""
    raise DiskFullError(f"no space left in {folder} to write {os.path.basename(path)}{need}: free some space there "
                        f"or give a folder on another disk (--output_dir); the files already in {folder} are "
                        f"untouched") from None


def payload_bytes(obj):
    """Bytes of the tensors in a (nested) checkpoint payload: about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


def file_sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def remove_stale_temp_files(folder):
    """Delete the temporary files that runs killed during a write left in `folder` (not its subfolders); only
    call it while holding the folder (util.runlock), so no live writer's file is touched. Returns their names."""
    names = sorted(n for n in os.listdir(folder) if _TEMP_RE.match(n)) if os.path.isdir(folder) else []
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
    return names


def save_checkpoint(path, payload):
    atomic_write(path, lambda tmp: torch.save(payload, tmp), size_hint=payload_bytes(payload))


def write_bytes(path, data):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def save_json(path, obj):
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def append_jsonl(path, obj):
    """Append a line by rewriting the file atomically: a crash leaves the old file or the new one, never half a
    line (the records are rare and small, so the rewrite costs nothing)."""
    old = b""
    if os.path.exists(path):
        with open(path, "rb") as f:
            old = f.read()
    if old and not old.endswith(b"\n"):
        old += b"\n"
    write_bytes(path, old + (json.dumps(obj, sort_keys=True, default=str) + "\n").encode())


def capture_rng(device=None):
    """This process's RNG states in types that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state, device=None):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device is not None and torch.device(device).type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
