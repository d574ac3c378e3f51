"""Every entry point under torchrun and in one process, and what a user can get wrong: the digits preset's report
is the same on 2 ranks as on 1, user errors are one line printed once, one live run per folder, stale temporary
files are cleared, an epoch finished before a resume logs its loss, files follow the umask, MRAR is told from
the checkpoint, a VAE file is never unpickled without consent, main_cache.py takes the pixel tokenizer."""
import argparse
import datetime
import json
import os
import socket
import stat
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import REPO, read_losses, torchrun, write_image_folder, write_vae_checkpoint

import digits_preset as digits
import engine_transdiff as engine
import main
import main_cache
from models import pretrained
from models.pretrained import CheckpointError, check_compatible, infer_config, load_transdiff
from models.transdiff import build_model
from models.vae import AutoencoderKL
from tools.build_mrar_index import main as build_index
from util import runlock
from util.checkpoint import save_checkpoint, save_json
from util.errors import UserError


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("entry")
    data = write_image_folder(root / "imagenet", corrupt=False)
    return SimpleNamespace(root=root, data=data, vae=write_vae_checkpoint(root / "kl16.ckpt"))


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def tiny(env, out, *extra):
    return ["--img_size", "32", "--vae_path", str(env.vae), "--model", "transdiff_tiny", "--class_num", "10",
            "--diffusion_batch_mul", "2", "--epochs", "1", "--warmup_epochs", "1", "--batch_size", "2",
            "--num_workers", "0", "--log_freq", "1", "--data_path", str(env.data), "--output_dir", str(out), *extra]


def python(script, args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def error_lines(text):
    return [line for line in text.splitlines() if ": error: " in line]


# ------------------------------------------------------------------ the preset under torchrun
def test_preset_under_torchrun_reports_as_one_process(tmp_path):
    """2 ranks train 1 step and report (this hung: the report's collectives ran on rank 0 only); the same
    command in one process, its images and report removed, reports the same digits and the same judgement."""
    out = tmp_path / "run"
    argv = ["--preset", "digits", "--data_path", tmp_path / "digits", "--output_dir", out, "--max_train_steps", 1,
            "--report_per_class", 2, "--grid_per_class", 2, "--num_sampling_steps", 2, "--eval_bsz", 3]
    two = torchrun(REPO / "main.py", argv, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    first = digits.read_report(out)
    folder = first["images"]
    pngs = {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if name.endswith(".png")}
    assert len(pngs) == first["num_images"] == 20 and first["images_generated"] == 20
    for name in pngs:
        os.remove(os.path.join(folder, name))
    os.remove(out / digits.REPORT_NAME)
    one = python(REPO / "main.py", argv, timeout=300)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    second = digits.read_report(out)
    assert sorted(first) == sorted(second)
    for key in ("accuracy", "per_class", "num_images", "training", "sampling", "mode", "judge", "images"):
        assert first[key] == second[key], key
    assert {n: open(os.path.join(folder, n), "rb").read() for n in pngs} == pngs  # byte-identical at 1 thread


# ------------------------------------------------------------------ user errors
def test_user_errors_are_one_line_without_traceback(env, tmp_path, capsys):
    three = write_image_folder(tmp_path / "three", classes=("a", "b", "c"), per_class=2, corrupt=False)
    with pytest.raises(SystemExit) as e:  # found while building the data (it was a ValueError traceback)
        main.cli(tiny(env, tmp_path / "o1", "--class_num", "2", "--data_path", str(three)))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.strip().splitlines() == error_lines(err)
    assert "3 class folders but --class_num is 2" in err and "--class_num 3" in err
    with pytest.raises(SystemExit) as e:
        main.cli(tiny(env, tmp_path / "o2", "--no_such_flag"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines() == error_lines(err) and "--no_such_flag" in err


@pytest.mark.slow
def test_user_error_under_torchrun_is_said_once(env, tmp_path):
    """MRAR rows too few for one step, on 2 ranks: one line from rank 0 (a traceback per rank before), naming
    the rows and every flag that helps."""
    build_index(["--data_path", str(env.data), "--output", str(tmp_path / "idx.txt")])  # 2 classes x 1 row
    r = torchrun(REPO / "main.py", tiny(env, tmp_path / "o3", "--mrar", "--mrar_index", tmp_path / "idx.txt"))
    assert r.returncode != 0
    ours = [line for line in error_lines(r.stderr) if line.startswith("main.py: error:")]
    assert len(ours) == 1 and "Traceback" not in r.stdout
    for words in ("2 MRAR rows", "--batch_size", "--gradient_accumulation_steps", "--repeats"):
        assert words in ours[0]


def test_decoder_width_refusal_names_the_flag():
    ours = build_model("transdiff_tiny", img_size=32, class_num=10)
    theirs = build_model("transdiff_tiny", img_size=32, class_num=10, decoder_embed_dim=32)
    with pytest.raises(CheckpointError) as info:
        check_compatible(ours, theirs.state_dict())
    assert isinstance(info.value, UserError)
    for flag in ("--model", "--img_size", "--mrar", "--diffloss_w"):
        assert flag in str(info.value)


# ------------------------------------------------------------------ one live run per folder
def test_output_folder_lock(env, tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    lock = folder / runlock.LOCK_NAME
    host = socket.gethostname()
    lock.write_text(json.dumps({"pid": os.getppid(), "host": host, "what": "training run"}))  # a live process
    with pytest.raises(SystemExit) as e:
        main.cli(tiny(env, folder))
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(error_lines(err)) == 1 and f"live training run (pid {os.getppid()}" in err
    assert not (folder / "metrics.jsonl").exists()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "what": "training run"}))
    with pytest.raises(UserError, match=f"host elsewhere.*delete {lock}"):
        runlock.acquire(folder)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(done.stdout), "host": host, "what": "training run"}))  # gone
    said = []
    held = runlock.acquire(folder, log=said.append)
    assert "stale lock" in said[0] and json.loads(lock.read_text())["pid"] == os.getpid()
    assert runlock.acquire(folder) is None  # this process holds it already
    runlock.release(held)
    assert not lock.exists()


def test_evaluation_folder_lock(tmp_path):
    from engine_eval import generate_images
    from util.evaluation import SamplingSettings

    model = build_model("transdiff_tiny", img_size=32, class_num=2, vae_stride=16)
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / runlock.LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    args = argparse.Namespace(num_images=2, eval_bsz=2, class_num=2, img_size=32, model="transdiff_tiny", resume=None)
    with pytest.raises(UserError, match="in use by a live"):
        generate_images(model, SimpleNamespace(scale_factor=1.0, decode=None), args, str(folder),
                        SamplingSettings(num_sampling_steps=2, seed=0))
    assert not [n for n in os.listdir(folder) if n.endswith(".png")]


# ------------------------------------------------------------------ resume: temp files, epoch loss
def test_stale_temp_files_removed_and_epoch_loss_after_resume(env, tmp_path):
    """A run stopped at its epoch's last step, resumed: the epoch's loss is that of its steps (it was NaN), and
    the temporary checkpoint a killed save left is removed."""
    out = tmp_path / "run"
    main.cli(tiny(env, out, "--max_train_steps", "6"))  # 12 images, batch 2: the whole epoch 0
    stale = out / ".checkpoint-last.pth.ab12cd34.tmp"
    stale.write_bytes(b"half a checkpoint")
    main.cli(tiny(env, out))
    assert not stale.exists()
    log = (out / "log.txt").read_text().split("resumed from")[-1]
    assert "removed 1 temporary file(s)" in (out / "log.txt").read_text()
    loss = float(log.split("epoch 0 done: loss ")[1].split(",")[0])
    assert loss == pytest.approx(np.mean(list(read_losses(out).values())), abs=1e-4)


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "c.pth", {"x": torch.zeros(1)})
        save_json(tmp_path / "args.json", {"a": 1})
        from util.checkpoint import append_jsonl
        from util.evaluation import save_png
        append_jsonl(tmp_path / "metrics.json", {"a": 1})
        save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "00000.png")
        os.umask(0o002)
        save_json(tmp_path / "group.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "c.pth").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "args.json").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "metrics.json").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "00000.png").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "group.json").st_mode) == 0o664


# ------------------------------------------------------------------ MRAR detection
def test_mrar_read_from_args_then_shapes(tmp_path):
    """MRAR at 32 px with KL-16 has a one-token mask like 1-Step: the mask shape alone called it 1-Step."""
    mrar = build_model("transdiff_tiny", img_size=32, class_num=10, mrar=True)
    sd = mrar.state_dict()
    assert sd["mask_token"].shape[1] == 1
    assert infer_config(sd)["mrar"] and pretrained.mode_from_shapes(sd) is True
    one = build_model("transdiff_tiny", img_size=32, class_num=10).state_dict()
    assert pretrained.mode_from_shapes(one) is False and not infer_config(one)["mrar"]
    odd = {**sd, "z_proj.weight": torch.zeros(64, 32)}  # shapes that fit neither rule
    assert pretrained.mode_from_shapes(odd) is None
    with pytest.raises(CheckpointError, match="pass --mrar"):
        infer_config(odd)
    assert infer_config(odd, mrar=True)["mrar"]
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": sd, "model_ema": sd, "args": argparse.Namespace(mrar=True, vae_embed_dim=16,
                                                                         encoder_num_heads=4, decoder_num_heads=4)},
               path)
    model, _ = load_transdiff(path)
    assert model.mrar and model.mask_token.shape == (1, 1, model.mask_token.shape[2])


# ------------------------------------------------------------------ VAE files
def test_vae_never_unpickled_without_the_flag(tmp_path):
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": AutoencoderKL().state_dict(), "made": datetime.date(2024, 1, 1)}, path)
    with pytest.raises(UserError, match="--vae_unsafe_load.*RUNS CODE FROM THE FILE") as info:
        AutoencoderKL(ckpt_path=path)
    assert "datetime" in str(info.value)
    assert isinstance(AutoencoderKL(ckpt_path=path, unsafe_load=True), AutoencoderKL)


# ------------------------------------------------------------------ main_cache.py
def test_cache_with_the_pixel_tokenizer(env, tmp_path):
    cache = tmp_path / "cache"
    main_cache.cli(["--tokenizer", "pixel", "--pixel_patch", "4", "--img_size", "32", "--data_path", str(env.data),
                    "--cached_path", str(cache), "--num_workers", "0", "--batch_size", "5", "--vae_path", "/none"])
    files = sorted(cache.glob("*/*.npz"))
    assert len(files) == 12
    with np.load(files[0]) as f:
        assert f["moments"].shape == f["moments_flip"].shape == (32, 8, 8)  # 1 channel x 4 x 4 pixels, x2
        assert np.all(f["moments"][16:] == -30.0)
    args = main.check_args(main.get_args_parser(), main.get_args_parser().parse_args(tiny(
        env, tmp_path / "o", "--tokenizer", "pixel", "--pixel_patch", "4", "--use_cached", "--cached_path",
        str(cache), "--class_num", "2")))
    _, _, loader, classes = engine.build_data(args, SimpleNamespace(world_size=1, rank=0, device=torch.device("cpu")))
    assert len(classes) == 2 and next(iter(loader))[0].shape == (2, 32, 8, 8)
