"""The EMA warm-up: its rates, the warning of a run too short for its EMA, and resumes that keep the setting a
run started with (exact, also for a run older than the warm-up)."""
from types import SimpleNamespace

import pytest
import torch
from helpers import write_image_folder

import main
from util.optim import EMA, WARMUP_OFFSET, short_run_warning, start_share


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    return SimpleNamespace(data=write_image_folder(root / "imagenet"))


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def tiny(env, out, *extra):
    return ["--img_size", "32", "--tokenizer", "pixel", "--pixel_patch", "8", "--pixel_channels", "1",
            "--model", "transdiff_tiny", "--class_num", "10", "--diffloss_w", "64", "--diffloss_d", "1",
            "--diffusion_batch_mul", "1", "--epochs", "1", "--ema_rate", "0.9", "--warmup_epochs", "0", "--lr", "1e-3",
            "--batch_size", "4", "--num_workers", "0", "--log_freq", "1", "--sample_grid_freq", "0", "--threads", "1",
            "--data_path", str(env.data), "--output_dir", str(out), *extra]


def test_warmup_rates_follow_the_schedule():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    warm, plain, low = EMA(model, 0.999, warmup=True), EMA(model, 0.999), EMA(model, 0.05, warmup=True)
    expect_warm, expect_plain, expect_low = 0.0, 0.0, 0.0
    for n, value in enumerate((1.0, 2.0, 3.0)):
        with torch.no_grad():
            model.weight.fill_(value)
        rate = (1 + n) / (WARMUP_OFFSET + n)
        assert warm.current_rate() == pytest.approx(rate) and plain.current_rate() == 0.999
        for ema in (warm, plain, low):
            ema.update(model)
        expect_warm = rate * expect_warm + (1 - rate) * value
        expect_plain = 0.999 * expect_plain + 0.001 * value
        expect_low = 0.05 * expect_low + 0.95 * value  # a rate below the warm-up's is used from the start
        assert warm.shadow[0].item() == pytest.approx(expect_warm)
        assert plain.shadow[0].item() == pytest.approx(expect_plain)
        assert low.shadow[0].item() == pytest.approx(expect_low)
    assert warm.updates == 3
    assert expect_warm > 2.0 > expect_plain  # after three steps the warm EMA is near the weights, the plain one is not


def test_short_runs_are_told():
    # the digits preset for 3 epochs (138 steps at 0.999): without warm-up the EMA is 87% its random start
    assert start_share(0.999, False, 138) == pytest.approx(0.999 ** 138)
    assert "87% of the starting weights" in short_run_warning(0.999, False, 138)
    assert short_run_warning(0.999, True, 138) is None and start_share(0.999, True, 138) < 1e-10
    # an MRAR fine-tune of 40 epochs (~6,250 steps) at 0.9999 still holds about half of its start
    assert 0.5 < start_share(0.9999, False, 6250) < 0.55 and short_run_warning(0.9999, False, 6250)
    assert short_run_warning(0.999, False, 5000) is None  # five horizons


def test_a_run_resumes_with_the_warmup_it_started_with(env, tmp_path):
    main.cli(tiny(env, tmp_path / "plain", "--no-ema_warmup"))
    main.cli(tiny(env, tmp_path / "warm"))
    assert "warning: the run plans 3 optimizer steps" in (tmp_path / "plain" / "log.txt").read_text()
    assert "warning" not in (tmp_path / "warm" / "log.txt").read_text()
    # a run of the released code (no ema_warmup in its args), stopped after 2 steps, resumed with the new defaults
    old = tmp_path / "old"
    main.cli(tiny(env, old, "--no-ema_warmup", "--max_train_steps", "2"))
    ckpt_path = old / "checkpoint-last.pth"
    ckpt = torch.load(ckpt_path, weights_only=False)
    del ckpt["args"].ema_warmup
    torch.save(ckpt, ckpt_path)
    main.cli(tiny(env, old))
    assert "the run started with the EMA warm-up off and goes on so" in (old / "log.txt").read_text()
    plain, warm, resumed = (torch.load(d / "checkpoint-last.pth", weights_only=False)
                            for d in (tmp_path / "plain", tmp_path / "warm", old))
    assert resumed["args"].ema_warmup is False and warm["args"].ema_warmup is True
    for k, v in plain["model_ema"].items():
        torch.testing.assert_close(resumed["model_ema"][k], v, atol=1e-6, rtol=0)
        torch.testing.assert_close(warm["model"][k], plain["model"][k], atol=1e-6, rtol=0)  # raw: EMA-blind
    # the warm EMA sits nearer the trained weights than the released one
    gap = {name: sum((c["model_ema"][k] - c["model"][k]).norm() for k in c["model"] if k.startswith("class_emb"))
           for name, c in (("warm", warm), ("plain", plain))}
    assert gap["warm"] < 0.5 * gap["plain"]


def test_warmup_offset_sets_how_closely_the_ema_follows():
    model = torch.nn.Linear(1, 1, bias=False)
    for k in (10, 50):
        ema = EMA(model, 0.999, warmup=k)
        ema.updates = 138
        assert ema.current_rate() == pytest.approx(139 / (k + 138))
    assert EMA(model, 0.999, warmup=True).current_rate() == EMA(model, 0.999, warmup=WARMUP_OFFSET).current_rate()
    with pytest.raises(ValueError, match="must exceed 1"):
        EMA(model, 0.999, warmup=0.5).current_rate()


def test_a_run_resumes_with_the_warmup_offset_it_started_with(env, tmp_path, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    main.cli(tiny(env, whole, "--ema_warmup_offset", "50", "--epochs", "2"))
    main.cli(tiny(env, split, "--ema_warmup_offset", "50", "--epochs", "2", "--max_train_steps", "4"))
    main.cli(tiny(env, split, "--epochs", "2"))  # the default offset on the command line: the run keeps its 50
    assert "the run started with the EMA warm-up on (offset 50) and goes on so" in (split / "log.txt").read_text()
    a, b = (torch.load(d / "checkpoint-last.pth", weights_only=False) for d in (whole, split))
    assert b["args"].ema_warmup_offset == 50.0
    for k, v in a["model_ema"].items():
        torch.testing.assert_close(b["model_ema"][k], v, atol=1e-6, rtol=0)
    with pytest.raises(SystemExit):
        main.cli(tiny(env, tmp_path / "bad", "--ema_warmup_offset", "1"))
    assert "--ema_warmup_offset 1.0 must exceed 1" in capsys.readouterr().err
