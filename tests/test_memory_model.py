"""benchmarks/memory_model.py against the CPU allocator: the peak it predicts from fake tensors for a training
step (with and without gradient checkpointing, fp32 and bf16) and for sampling with CFG equals, within 15%, the
peak the allocator reports for a real run of the same small model on CPU."""
import json
import sys

import pytest
import torch
from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import memory_model as mm  # noqa: E402

SMALL = mm.VALIDATION
TOLERANCE = 0.15


@pytest.mark.parametrize("checkpointing,dtype", [(False, None), (True, None), (False, torch.bfloat16)])
def test_training_peak_matches_the_cpu_allocator(checkpointing, dtype):
    torch.manual_seed(0)
    config = dict(SMALL, grad_checkpointing=checkpointing)
    predicted = mm.predict_training("transdiff_tiny", 8, dtype, "cpu", **config)
    measured = mm.measure_training_cpu("transdiff_tiny", 8, dtype, **config)
    assert abs(predicted["peak_bytes"] / measured - 1) < TOLERANCE, (predicted, measured)
    # what the peak is made of: the persistent state is a part, the saved activations the rest
    assert predicted["steady_state_bytes"] < predicted["peak_bytes"]
    assert predicted["saved_activation_bytes"] > 0


def test_checkpointing_saves_activations():
    full = mm.predict_training("transdiff_tiny", 8, None, "cpu", **SMALL)
    ckpt = mm.predict_training("transdiff_tiny", 8, None, "cpu", **dict(SMALL, grad_checkpointing=True))
    assert ckpt["saved_activation_bytes"] < full["saved_activation_bytes"] / 2
    assert ckpt["peak_bytes"] < full["peak_bytes"]


def test_sampling_peak_matches_the_cpu_allocator():
    predicted = mm.predict_sampling("transdiff_tiny", 8, target="cpu", **SMALL)
    measured = mm.measure_sampling_cpu("transdiff_tiny", 8, **SMALL)
    assert abs(predicted["peak_bytes"] / measured - 1) < TOLERANCE, (predicted, measured)


def test_flops_per_image_follow_the_matrix_products():
    """A decoder step at width W, L tokens, N conditions costs about 2 * params-in-blocks * L per sequence (plus
    attention); sampling with CFG doubles it; training (forward + backward) is about 3x the forward."""
    steps = 10
    sample = mm.sampling_flops_per_image("transdiff_tiny", steps, **SMALL)
    train = mm.training_flops_per_image("transdiff_tiny", **SMALL)
    w, depth, tokens = 128, 2, (64 // 16) ** 2
    block_matmul = 2 * tokens * depth * (4 * w * w + 2 * 4 * w * w + w * w * 2)  # self qkv+proj, mlp, q+proj
    assert sample > steps * 2 * block_matmul  # CFG: two sequences per image and step
    assert train > 3 * SMALL["diffusion_batch_mul"] * block_matmul
    assert mm.ideal_seconds(989e12)["H100 SXM"] == pytest.approx(1.0)


def test_command_line_prints_peak_gib_last(capsys):
    mm.main(["--model", "transdiff_tiny", "--img_size", "64", "--class_num", "10", "--batch_size", "2",
             "--batch_mul", "1", "--dtype", "fp32"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < last["peak_gib"] < 1
