"""Shared test utilities: tiny ImageFolders, a random-weight VAE checkpoint in the released format, and
launchers for main.py / main_cache.py under torchrun on localhost.

Run as a script it is a torchrun entry for the non-finite-loss test: main.py whose loss turns NaN on rank 1
at the forward call given by NAN_AT_CALL.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("n01440764", "n01443537")


def write_image_folder(root, classes=CLASSES, per_class=6, corrupt=True, seed=0):
    """<root>/train/<class>/img<i>.png of random sizes (not square, to exercise the crop) and, with
    `corrupt`, one unreadable file. Returns `root`."""
    rng = np.random.default_rng(seed)
    for c in classes:
        folder = Path(root) / "train" / c
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(40, 90, 2))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    if corrupt:
        (Path(root) / "train" / classes[0] / "broken.png").write_bytes(b"this is not a png")
    return Path(root)


def write_vae_checkpoint(path, seed=0):
    """The real KL-16 architecture with random weights, saved as the released file ({'model': state_dict})."""
    from models.vae import AutoencoderKL

    path = Path(path)
    if not path.exists():
        torch.manual_seed(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": AutoencoderKL().state_dict()}, path)
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(script, args, nproc=2, timeout=240, env=None):
    """`python -m torch.distributed.run --nproc_per_node N script args` on one node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--node_rank=0", "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env={**_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def torchrun_two_nodes(script, args, timeout=240):
    """Two "nodes" on localhost, one process each (--nnodes 2): returns both CompletedProcess-like results."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--nnodes=2",
               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", str(script),
               *map(str, args)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def read_losses(output_dir):
    """{optimizer step: loss} from the run's metrics.jsonl."""
    with open(Path(output_dir) / "metrics.jsonl") as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    import main as entry
    from models.transdiff import Transdiff

    forward, calls = Transdiff.forward, [0]

    def nan_forward(self, latents, labels):
        loss = forward(self, latents, labels)
        calls[0] += 1
        if os.environ.get("RANK") == "1" and calls[0] == int(os.environ["NAN_AT_CALL"]):
            loss = loss * float("nan")
        return loss

    Transdiff.forward = nan_forward
    entry.cli(sys.argv[1:])
