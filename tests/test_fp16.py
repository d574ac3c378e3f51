"""fp16 autocast with loss scaling on CPU (--amp fp16, torch.amp.GradScaler("cpu")) through the real training
step: an overflow in the forward pass is skipped like one in the gradients, the scale lowered, the count logged;
many in a row stop the run with a message naming --bf16."""
import json
import math

import pytest
import torch
from helpers import write_image_folder, write_vae_checkpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main
from models.transdiff import Transdiff


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    return {"data": write_image_folder(root / "imagenet"), "vae": write_vae_checkpoint(root / "kl16.ckpt")}


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def tiny(env, out, *extra):
    return ["--img_size", "32", "--vae_path", str(env["vae"]), "--model", "transdiff_tiny", "--class_num", "10",
            "--diffusion_batch_mul", "2", "--epochs", "1", "--warmup_epochs", "1", "--batch_size", "2",
            "--num_workers", "0", "--log_freq", "1", "--threads", "1", "--data_path", str(env["data"]),
            "--output_dir", str(out), "--amp", "fp16", *extra]


def overflow_from(monkeypatch, first, last):
    """The loss of forward calls first..last is inf, as an fp16 overflow in the forward pass makes it."""
    forward, calls = Transdiff.forward, [0]

    def overflowing(self, latents, labels):
        loss = forward(self, latents, labels)
        calls[0] += 1
        return loss * math.inf if first <= calls[0] <= last else loss

    monkeypatch.setattr(Transdiff, "forward", overflowing)


def rows(out):
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_forward_overflow_is_skipped_and_training_goes_on(env, tmp_path, monkeypatch):
    out = tmp_path / "run"
    overflow_from(monkeypatch, 3, 3)
    main.cli(tiny(env, out))
    got = rows(out)
    assert sorted(got) == list(range(1, 7))  # 12 images, batch 2: the whole epoch trained
    before, skipped = got[2], got[3]
    assert skipped["loss"] is None and skipped["skipped_steps"] == before["skipped_steps"] + 1
    assert skipped["loss_scale"] == before["loss_scale"] / 2
    assert all(math.isfinite(got[s]["loss"]) for s in (4, 5, 6))
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=False)
    assert ckpt["train_state"]["skipped_steps"] == got[6]["skipped_steps"] >= 1
    assert ckpt["scaler"]["scale"] == got[6]["loss_scale"]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    tags = EventAccumulator(str(out)).Reload().Tags()["scalars"]
    assert {"train/loss_scale", "train/skipped_steps"} <= set(tags)


def test_overflow_in_every_step_stops_with_a_message_naming_bf16(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "stuck"
    overflow_from(monkeypatch, 2, 10**9)
    with pytest.raises(SystemExit) as e:
        main.cli(tiny(env, out, "--max_skipped_steps", "3"))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "3 optimizer steps in a row skipped under fp16 loss scaling" in err and "--bf16" in err
    assert "optimizer step 4" in err and sorted(rows(out)) == [1, 2, 3]  # steps 2, 3 skipped and logged; 4 stops


def test_bf16_is_the_alias_of_amp_bf16(env, tmp_path, capsys):
    parser = main.get_args_parser()
    args = main.check_args(parser, parser.parse_args(tiny(env, tmp_path)[:-2] + ["--bf16"]))
    assert args.amp == "bf16" and args.bf16
    assert not main.check_args(parser, parser.parse_args(tiny(env, tmp_path))).bf16
    with pytest.raises(SystemExit) as e:
        main.check_args(parser, parser.parse_args(tiny(env, tmp_path) + ["--bf16"]))
    assert e.value.code == 2 and "--bf16 is --amp bf16, but --amp fp16 is given too" in capsys.readouterr().err
