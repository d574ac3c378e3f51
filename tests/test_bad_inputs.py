"""What a user can get wrong, in one process: each refusal is one line naming the problem and the fix, without a
traceback, also written to the run's log.txt; nothing already written is lost. Inputs that are legitimate (a
fewer class folders than --class_num, --warmup_epochs 0, --cfg 0) are kept and said (docs/errors.md)."""
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO, write_image_folder, write_vae_checkpoint

import main
import main_cache
from models.tokenizers import FINGERPRINT_NAME
from tools.build_mrar_index import main as build_index
from util import checkpoint, runlock
from util.checkpoint import LAST, DiskFullError, save_checkpoint


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    data = write_image_folder(root / "imagenet", corrupt=False)
    return SimpleNamespace(root=root, data=data, vae=write_vae_checkpoint(root / "kl16.ckpt"))


@pytest.fixture(scope="module")
def other_vae(env):
    """Another KL-16 VAE file: the same architecture, other weights."""
    return write_vae_checkpoint(env.root / "other_kl16.ckpt", seed=1)


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)


def tiny(env, out, *extra):
    return [str(a) for a in ["--img_size", 32, "--vae_path", env.vae, "--model", "transdiff_tiny", "--class_num", 2,
                             "--diffusion_batch_mul", 2, "--epochs", 1, "--warmup_epochs", 1, "--batch_size", 4,
                             "--num_workers", 0, "--log_freq", 1, "--threads", 1, "--data_path", env.data,
                             "--output_dir", out, *extra]]


@pytest.fixture(scope="module")
def trained(env):
    """A run folder after one epoch (3 optimizer steps): copy it before changing it."""
    out = env.root / "trained"
    main.cli(tiny(env, out))
    return out


def copy_run(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "run")


def refused(argv, capsys, code=None, entry=main):
    """The one error line of a refused command (exit code `code` when given)."""
    with pytest.raises(SystemExit) as e:
        entry.cli(list(map(str, argv)))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert e.value.code != 0 and (code is None or e.value.code == code), err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def log_lines(folder, words):
    with open(os.path.join(folder, "log.txt")) as f:
        return [line for line in f if words in line]


# ------------------------------------------------------------------ numbers
@pytest.mark.parametrize("flags, words", [
    (["--lr", "-1e-4"], "--lr -0.0001 must be positive"),   # was: "expected one argument"
    (["--lr=-1e-4"], "--lr -0.0001 must be positive"),      # was: a ValueError traceback from AdamW
    (["--blr", "-.5"], "--blr -0.5 must be positive"),
    (["--lr", "0"], "--lr 0.0 must be positive"),           # trained
    (["--warmup_epochs=-1"], "--warmup_epochs -1.0 must not be negative"),  # trained
    (["--weight_decay", "-1E-2"], "--weight_decay -0.01 must not be negative"),
    (["--label_drop_prob", "1"], "--label_drop_prob must lie in [0, 1)"),
])
def test_negative_and_zero_numbers_are_refused(env, tmp_path, capsys, flags, words):
    line = refused(tiny(env, tmp_path / "out", *flags), capsys, code=2)
    assert words in line


def test_legitimate_zeros_are_kept(env, tmp_path):
    parser = main.get_args_parser()
    args = main.check_args(parser, parser.parse_args(tiny(env, tmp_path / "out", "--warmup_epochs", "0", "--cfg",
                                                          "0", "--grad_clip", "0", "--seed", "0")))
    assert (args.warmup_epochs, args.cfg, args.grad_clip) == (0, 0, 0)


def test_refusal_reaches_the_log_of_an_existing_run(env, trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    line = refused(tiny(env, run, "--lr", "-1e-4"), capsys, code=2)
    assert log_lines(run, "main.py: error: --lr -0.0001 must be positive")[0].rstrip().endswith(line)
    # a folder held by another live run: its log.txt is not ours to write
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / runlock.LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        before = (run / "log.txt").read_bytes()
        refused(tiny(env, run, "--lr", "0"), capsys, code=2)
        assert (run / "log.txt").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


def test_output_dir_that_is_a_file(env, tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    assert "--output_dir" in refused(tiny(env, tmp_path / "f"), capsys, code=2)
    line = refused(["--img_size", "32", "--vae_path", env.vae, "--data_path", env.data, "--cached_path",
                    tmp_path / "f", "--num_workers", "0"], capsys, code=2, entry=main_cache)
    assert "--cached_path" in line and "is a file" in line
    assert (tmp_path / "f").read_text() == "mine"


# ------------------------------------------------------------------ checkpoints
def test_zero_byte_checkpoints(env, trained, tmp_path, capsys):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert "is empty (0 bytes" in refused(tiny(env, tmp_path / "a", "--resume", empty), capsys, code=1)
    assert "is empty (0 bytes" in refused(tiny(env, tmp_path / "b", "--evaluate", "--resume", empty, "--skip_metrics",
                                               "--num_images", "2"), capsys, code=1)
    run = copy_run(trained, tmp_path)
    (run / LAST).write_bytes(b"")
    line = refused(tiny(env, run, "--epochs", "2"), capsys, code=1)
    assert "is empty (0 bytes" in line and log_lines(run, "is empty (0 bytes")
    assert (run / LAST).stat().st_size == 0  # left as it was: nothing overwritten


def test_epochs_below_the_checkpoint_say_which_flag_continues(env, trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    main.cli(tiny(env, run, "--epochs", "1"))
    said = log_lines(run, "nothing to do")
    assert len(said) == 1 and "epoch 1" in said[0] and "give --epochs above 1" in said[0]


# ------------------------------------------------------------------ data
def test_fewer_class_folders_than_class_num_is_said(env, tmp_path):
    out = tmp_path / "out"
    main.cli(tiny(env, out, "--class_num", "5", "--max_train_steps", "1"))
    said = log_lines(out, "class folders, --class_num is 5")
    assert len(said) == 1 and "classes 2..4 get no training samples" in said[0] and "--class_num 2" in said[0]


def test_empty_class_folder_is_refused(env, tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", corrupt=False, per_class=2)
    (data / "train" / "n99999999").mkdir()
    line = refused(tiny(env, tmp_path / "out", "--class_num", "3", "--data_path", data), capsys, code=1)
    assert "1 of the 3 class folders" in line and "n99999999" in line and "hold no images" in line


def test_mrar_index_naming_missing_files(env, tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", corrupt=False, per_class=8)
    index = tmp_path / "index.txt"
    build_index(["--data_path", str(data), "--output", str(index)])  # 2 classes x 2 rows of 4
    first = data / "train" / json.loads(index.read_text().splitlines()[1])["cate"]
    gone = sorted(first.iterdir())[:2]
    for path in gone:
        path.unlink()
    line = refused(tiny(env, tmp_path / "out", "--mrar", "--mrar_index", index, "--data_path", data,
                        "--batch_size", "1"), capsys, code=1)
    assert "2 of the 16 files it names are missing" in line and str(first) in line
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_default_workers_capped_to_the_cores_per_process(env, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    argv = [a for a in tiny(env, tmp_path / "out") if a not in ("--num_workers", "0")]
    parser = main.get_args_parser()
    args = main.check_args(parser, parser.parse_args(argv))
    assert args.num_workers == 1
    assert main.STARTUP_NOTES == ["--num_workers 1 per process: the default 10 capped to the 2 CPU cores shared by 2 "
                                  "process(es) on this node (give --num_workers to choose)"]
    args = main.check_args(parser, parser.parse_args([*argv, "--num_workers", "3"]))
    assert args.num_workers == 3 and main.STARTUP_NOTES == []


# ------------------------------------------------------------------ the tokenizer
def cache(env, folder, *extra, vae=None):
    main_cache.cli(list(map(str, ["--img_size", "32", "--vae_path", vae or env.vae, "--data_path", env.data,
                                  "--cached_path", folder, "--num_workers", "0", "--batch_size", "12", *extra])))


def test_cache_of_another_image_size_or_vae(env, other_vae, tmp_path, capsys):
    folder = tmp_path / "cache"
    cache(env, folder)
    capsys.readouterr()
    recorded = json.loads((folder / FINGERPRINT_NAME).read_text())
    assert recorded["img_size"] == 32 and recorded["embed_dim"] == 16 and len(recorded["weights_sha256"]) == 64
    one = next(folder.glob("*/*.npz"))
    stale = one.read_bytes()
    line = refused(["--img_size", "64", "--vae_path", env.vae, "--data_path", env.data, "--cached_path", folder,
                    "--num_workers", "0"], capsys, code=2, entry=main_cache)  # was: "12 already cached", exit 0
    assert "another tokenizer (img_size 32, here 64)" in line and "--allow_tokenizer_change" in line
    assert one.read_bytes() == stale
    # training on it with another VAE (was: silently)
    capsys.readouterr()
    line = refused(tiny(env, tmp_path / "out", "--use_cached", "--cached_path", folder, "--vae_path", other_vae),
                   capsys, code=2)
    assert "made with another tokenizer (weights_sha256" in line
    # a deliberate switch encodes every image again, then records the new tokenizer
    cache(env, folder, "--allow_tokenizer_change", vae=other_vae)
    assert json.loads((folder / FINGERPRINT_NAME).read_text())["weights_sha256"] == checkpoint.file_sha256(other_vae)
    assert one.read_bytes() != stale
    assert "encoding all 12 images again" in capsys.readouterr().out


def test_resume_with_another_vae(env, other_vae, trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    last = (run / LAST).read_bytes()
    line = refused(tiny(env, run, "--epochs", "2", "--vae_path", other_vae), capsys, code=1)
    assert "trained with another tokenizer (weights_sha256" in line and "--allow_tokenizer_change" in line
    assert (run / LAST).read_bytes() == last
    main.cli(tiny(env, run, "--epochs", "2", "--vae_path", other_vae, "--allow_tokenizer_change",
                  "--max_train_steps", "4"))
    assert log_lines(run, "tokenizer changed from the checkpoint's (weights_sha256")
    ckpt = torch.load(run / LAST, weights_only=False)
    assert ckpt["train_state"]["step"] == 4 and vars(ckpt["args"])["tokenizer_fingerprint"]["weights_sha256"] == \
        checkpoint.file_sha256(other_vae)


# ------------------------------------------------------------------ a full disk
def test_full_disk_while_saving(env, trained, tmp_path, capsys, monkeypatch):
    run = copy_run(trained, tmp_path)
    last = (run / LAST).read_bytes()

    def no_space(payload, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    line = refused(tiny(env, run, "--epochs", "2", "--max_train_steps", "4"), capsys, code=1)
    need = checkpoint.payload_bytes(torch.load(run / LAST, weights_only=False))
    assert f"no space left in {run} to write {LAST} (it needs about {need / 2**20:.1f} MiB)" in line
    assert "--output_dir" in line and log_lines(run, "no space left in")
    assert (run / LAST).read_bytes() == last and not list(run.glob(".*.tmp"))  # nothing lost, nothing left over


def test_torch_writer_failure_on_a_full_disk(tmp_path, monkeypatch):
    """torch's zip writer says only "file write failed": the free space tells that the disk is full."""
    def failed(payload, path):
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", failed)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=2**30, used=2**30, free=1000))
    with pytest.raises(DiskFullError, match=r"c\.pth \(it needs about 4\.0 MiB\)"):
        save_checkpoint(tmp_path / "c.pth", {"x": torch.zeros(2**20)})
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=2**40, used=0, free=2**40))
    with pytest.raises(RuntimeError, match="file write failed"):  # not a full disk: torch's own error
        save_checkpoint(tmp_path / "c.pth", {"x": torch.zeros(2**20)})


# ------------------------------------------------------------------ one live run per folder
def test_lock_refusals_say_how_to_take_over(env, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / runlock.LOCK_NAME
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # pid reuse: not a run
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "what": "training run"}))
        line = refused(tiny(env, out), capsys, code=1)
        assert f"if pid {holder.pid} is not that training run" in line and f"delete {lock}" in line
    finally:
        holder.kill()
        holder.wait()
    lock.write_text(json.dumps({"pid": 1, "host": "node-7", "what": "training run"}))
    line = refused(tiny(env, out), capsys, code=1)
    assert "on host node-7" in line and f"from host {socket.gethostname()}" in line and f"delete {lock}" in line
    assert not (out / "log.txt").exists()  # the folder is the other run's



def _can_mount_tmpfs():
    return shutil.which("unshare") and subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs a user namespace to mount a small tmpfs")
def test_real_full_disk(env, tmp_path):
    """A 7 MiB tmpfs holds one checkpoint (4.6 MiB) but not its replacement beside it: the second save fails."""
    disk, out = tmp_path / "disk", tmp_path / "disk" / "run"
    disk.mkdir()
    command = " ".join([sys.executable, "main.py", *tiny(env, out, "--save_every_steps", 1)])
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=7m tmpfs {disk} && {command}; "
                        f"echo rc=$?; cat {out}/log.txt"], capture_output=True, text=True, timeout=300,
                       cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    ours = [line[line.index("main.py: error:"):] for line in r.stderr.splitlines() if "main.py: error:" in line]
    assert "rc=1" in r.stdout and len(ours) == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert f"no space left in {out} to write {LAST} (it needs about" in ours[0]
    assert "saved checkpoint-last.pth (epoch 0, step 1)" in r.stdout and ours[0] in r.stdout  # in log.txt
