"""Scoring under torchrun: every rank extracts the features of its share of the generated and reference images,
the features are gathered, every rank scores them; FID, IS and precision/recall equal the one-process values, and
the images are byte-identical to one process's at the same batch size."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_evaluation import MODEL_KW, N, TinyTokenizer, make_args, pngs, tiny_model

import engine_eval

TESTS = Path(__file__).resolve().parent


def run_worker(tmp_path, args, nproc):
    model = tiny_model()
    state = tmp_path / "model.pt"
    torch.save(model.state_dict(), state)
    cfg = tmp_path / f"cfg{nproc}.json"
    cfg.write_text(json.dumps({"model_name": "transdiff_tiny", "model_kwargs": MODEL_KW, "state_dict": str(state),
                               "args": vars(args)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *launcher, str(TESTS / "eval_ddp_worker.py"), str(cfg)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    extracted = dict(tuple(map(int, line.split()[1:])) for line in lines if line.startswith("EXTRACTED "))
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[7:])
    return result, extracted


@pytest.fixture(scope="module")
def reference_images(tmp_path_factory):
    args = make_args(tmp_path_factory.mktemp("ref"), num_images=8, seed=99, eval_bsz=8, skip_metrics=True)
    return engine_eval.run_evaluation(tiny_model(), TinyTokenizer(), args)["folder"]


@pytest.mark.slow
def test_two_ranks_share_the_scoring(tmp_path, reference_images):
    """Rank 0 extracted every feature while the other ranks waited at a barrier: now each extracts half."""
    results, extracted = {}, {}
    for nproc in (1, 2):
        args = make_args(tmp_path / f"run{nproc}", fid_ref_dir=reference_images, eval_bsz=4)
        results[nproc], extracted[nproc] = run_worker(tmp_path, args, nproc)
    assert extracted[1] == {0: N + 8} and extracted[2] == {0: N // 2 + 4, 1: N // 2 + 4}
    one, two = results[1], results[2]
    assert two["speed"]["world_size"] == 2 and two["num_images"] == N
    for key in ("fid", "inception_score_mean", "inception_score_std", "precision", "recall"):
        assert two[key] == pytest.approx(one[key], rel=1e-9, abs=1e-9), key
    # the same planned batches on 1 and 2 ranks: the same bytes
    a, b = one["folder"], two["folder"]
    assert pngs(a) == pngs(b) == [f"{i:05d}.png" for i in range(N)]
    assert all(Path(a, f).read_bytes() == Path(b, f).read_bytes() for f in pngs(a))
