"""Worker for tests/test_eval_ddp.py: `run_evaluation` with a random-projection feature extractor that counts the
images it sees, in one process or under torchrun (gloo, CPU). Config as for tests/eval_worker.py. Every rank
prints `EXTRACTED <rank> <images>`; rank 0 prints the result as one JSON line prefixed with RESULT."""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval_worker import TinyTokenizer  # noqa: E402
from test_evaluation import RandomFeatures  # noqa: E402

from engine_eval import run_evaluation  # noqa: E402
from models.transdiff import build_model  # noqa: E402


class CountingFeatures(RandomFeatures):
    seen = 0

    def __call__(self, batch):
        self.seen += len(batch)
        return super().__call__(batch)


def main(config_path):
    torch.set_num_threads(1)
    cfg = json.loads(Path(config_path).read_text())
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    model = build_model(cfg["model_name"], **cfg["model_kwargs"])
    model.load_state_dict(torch.load(cfg["state_dict"], weights_only=True))
    features = CountingFeatures()
    result = run_evaluation(model, TinyTokenizer(), argparse.Namespace(**cfg["args"]), feature_extractor=features)
    print(f"EXTRACTED {dist.get_rank() if dist.is_initialized() else 0} {features.seen}", flush=True)
    if result is not None:
        print("RESULT " + json.dumps(result), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
