"""Files a kill can tear: a half last line of metrics.jsonl is dropped with a note, a kill while MetricsLog
rewrites the file loses no line, and each start of a run keeps its arguments in args_history.jsonl."""
import json
import resource
import signal
import subprocess
import sys

import pytest
from helpers import REPO, _env, read_losses, write_image_folder, write_vae_checkpoint

import main
from util.logger import MetricsLog, setup_logger


def write_rows(path, steps, tail=""):
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "note": "x" * 200}) + "\n" for s in steps) + tail)


def test_torn_last_line_is_dropped_with_a_note(tmp_path, capsys):
    setup_logger()  # as a run's rank 0: to stdout
    path = tmp_path / "metrics.jsonl"
    write_rows(path, range(1, 6), tail='{"step": 6, "lo')
    log = MetricsLog(tmp_path, resume_step=10)
    log.write({"step": 6, "loss": 0.5})
    log.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["loss"] == 0.5
    assert "dropped its torn last line" in capsys.readouterr().out


def test_a_line_that_is_no_json_inside_the_file_is_kept(tmp_path, capsys):
    setup_logger()
    path = tmp_path / "metrics.jsonl"
    write_rows(path, [1])
    with open(path, "a") as f:
        f.write("garbage\n" + json.dumps({"step": 2}) + "\n")
    MetricsLog(tmp_path, resume_step=1).close()
    assert path.read_text().splitlines()[1:] == ["garbage"] and "line 2 is no JSON row" in capsys.readouterr().out


# SIGXFSZ as the kernel's default (Python ignores it): the write past the size limit kills the process there
REWRITE = ("import signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); from util.logger import MetricsLog; "
           "MetricsLog(sys.argv[1], resume_step=int(sys.argv[2]))")


def test_a_kill_during_the_rewrite_loses_no_line(tmp_path):
    """The process rewriting metrics.jsonl dies half-way through (the kernel kills it at a file-size limit,
    SIGXFSZ): the file still holds every line."""
    path = tmp_path / "metrics.jsonl"
    write_rows(path, range(1, 2001))
    before = path.read_bytes()
    limit = len(before) // 2

    def cap_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, "-c", REWRITE, str(tmp_path), "1500"], cwd=REPO,
                            env={**_env(), "PYTHONDONTWRITEBYTECODE": "1"}, preexec_fn=cap_file_size,
                            capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGXFSZ, result.stderr[-2000:]  # killed while writing
    assert path.read_bytes() == before
    MetricsLog(tmp_path, resume_step=1500).close()  # the next start: steps past the resumed one go
    assert sorted(read_losses(tmp_path)) == list(range(1, 1501))


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def test_each_start_keeps_its_arguments_and_a_torn_line_does_not_stop_the_next(tmp_path):
    data, vae = write_image_folder(tmp_path / "imagenet"), write_vae_checkpoint(tmp_path / "kl16.ckpt")
    out = tmp_path / "run"
    argv = ["--img_size", "32", "--vae_path", str(vae), "--model", "transdiff_tiny", "--class_num", "10",
            "--diffusion_batch_mul", "2", "--epochs", "1", "--warmup_epochs", "1", "--batch_size", "2",
            "--num_workers", "0", "--log_freq", "1", "--threads", "1", "--data_path", str(data),
            "--output_dir", str(out)]
    main.cli(argv + ["--max_train_steps", "2", "--lr", "1e-4"])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')  # killed while logging step 3
    main.cli(argv + ["--max_train_steps", "3", "--lr", "2e-4"])
    assert sorted(read_losses(out)) == [1, 2, 3]
    history = [json.loads(line) for line in (out / "args_history.jsonl").read_text().splitlines()]
    assert [h["args"]["lr"] for h in history] == [1e-4, 2e-4]
    assert all(h["world_size"] == 1 and len(h["hosts"]) == 1 and h["time"] for h in history)
    assert json.loads((out / "args.json").read_text())["lr"] == 2e-4  # the latest, as before
