"""--compile (torch.compile with inductor) on CPU: the training forward compiles without graph breaks, a compiled
training run gives the losses of an eager one, compiled sampling the same samples; compile time is printed
(inductor's CPU compilation takes minutes on a small shared machine: those two are `slow`)."""
import time

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from helpers import read_losses, write_image_folder

import main as entry
from models.transdiff import build_model, compile_model

STEPS = 3


@pytest.fixture
def same_random_numbers(monkeypatch):
    """Compiled code draws its random numbers through torch's own generator, as eager code does."""
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_training_model(**kw):
    torch.manual_seed(0)
    return build_model("transdiff_tiny", img_size=32, class_num=10, diffusion_batch_mul=2, **kw).train()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_forward_has_no_graph_breaks(checkpointing):
    """The label range check was one (a data-dependent branch); it now runs on the host, outside the graph."""
    model = tiny_training_model(grad_checkpointing=checkpointing)
    explained = torch._dynamo.explain(model)(torch.randn(4, 16, 2, 2), torch.randint(0, 10, (4,)))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def _train(tmp_path, name, *extra):
    out = tmp_path / name
    entry.cli(["--preset", "digits", "--data_path", str(tmp_path / "data"), "--output_dir", str(out),
               "--pixel_channels", "3", "--class_num", "2", "--batch_size", "4", "--num_workers", "0",
               "--max_train_steps", str(STEPS), "--log_freq", "1", "--report_per_class", "1", "--grid_per_class",
               "1", *extra])
    return read_losses(out)


@pytest.mark.slow
def test_compiled_training_gives_the_eager_losses(tmp_path, same_random_numbers):
    write_image_folder(tmp_path / "data", per_class=8, corrupt=False)
    eager = _train(tmp_path, "eager")
    t0 = time.time()
    compiled = _train(tmp_path, "compiled", "--compile")
    print(f"compiled run of {STEPS} steps (compilation included): {time.time() - t0:.1f} s")
    assert sorted(eager) == sorted(compiled) == list(range(1, STEPS + 1))
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_compiled_sampling_gives_the_eager_samples(same_random_numbers):
    torch.manual_seed(0)
    model = build_model("transdiff_tiny", img_size=32, class_num=10).eval()
    labels = torch.tensor([1, 2, 3])

    def draw():
        return model.samples(labels, 4, cfg=1.5, generator=torch.Generator().manual_seed(0))

    eager = draw()
    compile_model(model)
    t0 = time.time()
    first = draw()
    compile_s = time.time() - t0
    torch.testing.assert_close(first, eager, atol=1e-4, rtol=0)
    torch.testing.assert_close(draw(), eager, atol=1e-4, rtol=0)
    print(f"first compiled sampling call (compilation included): {compile_s:.1f} s")
