"""Preemption as a scheduler does it: a stop signal to one process, or to torchrun (which forwards it to its
workers); the run saves at the step the ranks agree on and exits with PREEMPTED_EXIT; the same command again
continues it with the losses of an uninterrupted run. A killed launcher takes its workers with it.

Run as a script it is main.py whose rank 0 sends SIGNAL (to its process group, or to its parent: torchrun) at
the forward call SIGNAL_AT_CALL, once per SIGNAL_ONCE file, and writes its pid to PID_DIR.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO, _env, free_port, read_losses, torchrun, write_image_folder, write_vae_checkpoint

import main
from util.preemption import PREEMPTED_EXIT

SCRIPT = os.path.abspath(__file__)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    write_image_folder(root / "imagenet")
    return {"root": root, "data": root / "imagenet", "vae": write_vae_checkpoint(root / "kl16.ckpt")}


def flags(world, out, epochs=2):
    return ["--img_size", 32, "--vae_path", world["vae"], "--vae_embed_dim", 16, "--model", "transdiff_tiny",
            "--diffusion_batch_mul", 2, "--epochs", epochs, "--warmup_epochs", 1, "--class_num", 10,
            "--batch_size", 2, "--num_workers", 1, "--log_freq", 1, "--threads", 1, "--output_dir", out,
            "--data_path", world["data"]]


def hook_env(tmp, at_call, target, sig="SIGTERM"):
    return {"SIGNAL_AT_CALL": str(at_call), "SIGNAL_TARGET": target, "SIGNAL": sig,
            "SIGNAL_ONCE": str(tmp / "signalled"), "PID_DIR": str(tmp / "pids")}


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def in_process(args):
    main.cli([str(a) for a in args])


def run_script(args, env, timeout=240):
    cmd = [sys.executable, SCRIPT, *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env={**_env(), **env}, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)  # its own process group, as a job step's


def assert_same_losses(reference, resumed):
    a, b = read_losses(reference), read_losses(resumed)
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])


def last_step(out):
    return torch.load(out / "checkpoint-last.pth", weights_only=False)["train_state"]["step"]


def test_sigterm_saves_exits_and_the_same_command_continues(world, tmp_path):
    """SIGTERM to the process group (the run and its data loader's worker, as a scheduler sends it) during the
    first forward pass of step 2, whose second micro-batch the worker has yet to load: step 2 completes, is
    saved, exit 75; run again: the losses of steps 1-6 equal an uninterrupted run's."""
    full, split = tmp_path / "full", tmp_path / "split"
    env, accum = hook_env(tmp_path, 3, "group"), ["--gradient_accumulation_steps", 2]
    in_process(flags(world, full) + accum)
    first = run_script(flags(world, split) + accum, env)
    assert first.returncode == PREEMPTED_EXIT, first.stdout[-2000:] + first.stderr[-2000:]
    assert "stopped by SIGTERM after saving checkpoint-last.pth at optimizer step 2" in first.stdout
    assert last_step(split) == 2 and sorted(read_losses(split)) == [1, 2]
    again = run_script(flags(world, split) + accum, env)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resumed from" in again.stdout
    assert_same_losses(full, split)


def test_save_every_minutes_saves_on_the_clock(world, tmp_path):
    """A clock that is always due (0.0001 minutes) saves after every step: the log names each save."""
    out = tmp_path / "clock"
    in_process(flags(world, out, epochs=1) + ["--save_every_minutes", "0.0001"])
    saves = [line for line in (out / "log.txt").read_text().splitlines() if "saved checkpoint-last.pth" in line]
    assert len(saves) >= 6 and last_step(out) == 6  # 6 steps per epoch, one save each (and one at the epoch end)


def test_unknown_stop_signal_is_refused(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        in_process(flags(world, tmp_path / "x") + ["--stop_signals", "SIGTERM,SIGNOPE"])
    assert e.value.code == 2 and "--stop_signals: SIGNOPE cannot be a stop signal" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_both_ranks_and_continues(world, tmp_path):
    """SIGTERM to the launcher (as a scheduler sends it): torchrun forwards it, both ranks stop at one step,
    save and exit 75; the same command again continues with the losses of an uninterrupted run."""
    full, split = tmp_path / "full", tmp_path / "split"
    args = flags(world, full, epochs=3)
    assert torchrun(SCRIPT, args).returncode == 0
    args = flags(world, split, epochs=3)
    first = torchrun(SCRIPT, args, env=hook_env(tmp_path, 2, "parent"))
    text = first.stdout + first.stderr
    assert first.returncode != 0 and "got signal: 15" in text, text[-3000:]  # torchrun's own exit after a signal
    assert "stopped by SIGTERM after saving checkpoint-last.pth" in text, text[-3000:]
    stopped = last_step(split)
    assert 2 <= stopped < 9 and sorted(read_losses(split)) == list(range(1, stopped + 1))
    again = torchrun(SCRIPT, args, env=hook_env(tmp_path, 2, "parent"))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert_same_losses(full, split)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) is not alive
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_kill_9_of_torchrun_ends_its_workers(world, tmp_path):
    """kill -9 of the launcher mid-run (a run of 300 epochs, far from its end): within 30 s no rank lives on,
    and they saved where they stopped."""
    out, pids = tmp_path / "orphans", tmp_path / "pids"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--node_rank=0",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", SCRIPT, *map(str, flags(world, out, 300))]
    env = {**_env(), **hook_env(tmp_path, 2, "none")}
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (len(workers) == 2 and (tmp_path / "signalled").exists()):
            workers = [int(p.read_text()) for p in pids.glob("*")] if pids.exists() else []
            time.sleep(0.2)
        assert len(workers) == 2, "the workers did not start"
        launcher.kill()
        launcher.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(alive(p) for p in workers):
            time.sleep(0.5)
        assert not any(alive(p) for p in workers), "ranks outlived their killed launcher by 30 s"
        assert last_step(out) >= 2
    finally:
        for p in workers:
            if alive(p):
                os.kill(p, signal.SIGKILL)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    import main as entry
    from models.transdiff import Transdiff

    forward, calls = Transdiff.forward, [0]
    rank, once, at_call = os.environ.get("RANK", "0"), os.environ.get("SIGNAL_ONCE"), os.environ.get("SIGNAL_AT_CALL")
    if os.environ.get("PID_DIR"):
        os.makedirs(os.environ["PID_DIR"], exist_ok=True)
        with open(os.path.join(os.environ["PID_DIR"], rank), "w") as f:
            f.write(str(os.getpid()))

    def signalling_forward(self, latents, labels):
        calls[0] += 1
        if rank == "0" and at_call and calls[0] == int(at_call) and not os.path.exists(once):
            open(once, "w").close()
            sig, target = signal.Signals[os.environ["SIGNAL"]], os.environ["SIGNAL_TARGET"]
            if target == "group":  # sent by another process, as by a scheduler
                subprocess.run(["kill", f"-{sig.name[3:]}", "--", f"-{os.getpgrp()}"], start_new_session=True)
            elif target == "parent":
                os.kill(os.getppid(), sig)
        return forward(self, latents, labels)

    Transdiff.forward = signalling_forward
    entry.cli(sys.argv[1:])
