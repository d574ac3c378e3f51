"""Worker for tests/test_evaluation.py: runs `run_evaluation` in one process or under torchrun (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/eval_worker.py CONFIG.json

CONFIG.json holds `model_name`, `model_kwargs`, `state_dict` (a file written by torch.save), `args` (the
Namespace fields) and optionally `epoch`. Rank 0 prints the result as one JSON line prefixed with RESULT.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_eval import run_evaluation  # noqa: E402
from models.transdiff import build_model  # noqa: E402


class TinyTokenizer(torch.nn.Module):
    """Stand-in for the VAE: a fixed channel mix to RGB, nearest upsampling by the stride, tanh into (-1, 1)."""

    scale_factor = 0.2325

    def __init__(self, channels=16, stride=16):
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.register_buffer("mix", torch.randn(3, channels, generator=g) / channels ** 0.5)
        self.stride = stride

    def decode(self, z):
        x = torch.einsum("oc,bchw->bohw", self.mix.to(z.dtype), z)
        return torch.tanh(F.interpolate(x, scale_factor=self.stride, mode="nearest"))


def main(config_path, feature_extractor=None):
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    cfg = json.loads(Path(config_path).read_text())
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    model = build_model(cfg["model_name"], **cfg["model_kwargs"])
    model.load_state_dict(torch.load(cfg["state_dict"], weights_only=True))
    result = run_evaluation(model, TinyTokenizer(), argparse.Namespace(**cfg["args"]), epoch=cfg.get("epoch"),
                            feature_extractor=feature_extractor)
    if result is not None:
        print("RESULT " + json.dumps(result), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
