"""Worker for tests/test_eval_ddp.py: tests/eval_worker.py's `run_evaluation` with a random-projection feature
extractor that counts the images it sees, in one process or under torchrun (gloo, CPU). Every rank prints
`EXTRACTED <rank> <images>`; rank 0 prints the result as one JSON line prefixed with RESULT."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import eval_worker  # noqa: E402
from test_evaluation import RandomFeatures  # noqa: E402


class CountingFeatures(RandomFeatures):
    seen = 0

    def __call__(self, batch):
        self.seen += len(batch)
        return super().__call__(batch)


if __name__ == "__main__":
    features = CountingFeatures()
    eval_worker.main(sys.argv[1], feature_extractor=features)
    print(f"EXTRACTED {os.environ.get('RANK', 0)} {features.seen}", flush=True)
