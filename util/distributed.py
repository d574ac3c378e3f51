"""One code path for a plain process and for torchrun (env:// rendezvous), on one node or many.

The device comes from LOCAL_RANK (never from the global rank, which is wrong beyond one node); the backend
is NCCL on GPU and gloo on CPU. Without torchrun's variables everything degrades to world size 1 and the
collectives below become no-ops.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def resolve_device(name, local_rank=0):
    """torch.device for --device ('auto', 'cpu', 'cuda'), bound to this process's local GPU."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but no CUDA device is visible")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible on "
                           f"this node: --nproc_per_node must not exceed the GPU count")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device="auto", timeout_minutes=30):
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev)


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_initialized() else 0


def world_size():
    return dist.get_world_size() if is_initialized() else 1


def barrier():
    if is_initialized():
        dist.barrier()


def comm_device(device):
    """Where a tensor must live for a collective: NCCL only moves CUDA tensors, the other backends CPU ones."""
    if is_initialized() and "nccl" in str(dist.get_backend()):
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor, op):
    if is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_sum(tensor):
    """In-place sum over ranks (returns the tensor for chaining)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor):
    """In-place maximum over ranks (returns the tensor for chaining)."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def broadcast(tensor, src=0):
    """In place from rank `src` (returns the tensor for chaining)."""
    if is_initialized():
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_object(obj):
    if not is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def run_on_every_rank(fn, device, why="another rank stopped; see its error"):
    """Run `fn` on every rank; if one raises, every rank raises (that one with the real error, the others `why`),
    so that none is left waiting in a later collective."""
    error = None
    try:
        fn()
    except Exception as e:
        error = e
    failed = all_reduce_max(torch.tensor([error is not None], dtype=torch.int64, device=comm_device(device)))
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(why)


ERROR_KEY = "transdiff/error_reported"


def _store():
    try:  # the rendezvous store of the process group: reachable even while rank 0 waits in a collective
        return dist.distributed_c10d._get_default_store() if is_initialized() else None
    except (AttributeError, RuntimeError, ValueError):
        return None


def announce_error():
    """Tell the other ranks that this one has reported an error (see `error_announced`)."""
    store = _store()
    if store is not None:
        store.set(ERROR_KEY, str(rank()))


def error_announced(timeout_s=0):
    """Whether a rank reports an error within `timeout_s` (0: has reported one); False outside a process group."""
    store = _store()
    if store is None:
        return False
    try:
        if not timeout_s:
            return store.check([ERROR_KEY])
        store.wait([ERROR_KEY], datetime.timedelta(seconds=timeout_s))
        return True
    except RuntimeError:  # DistStoreError on a timeout, or the store is gone
        return False


def cleanup():
    if is_initialized():
        dist.destroy_process_group()
