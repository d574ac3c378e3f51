"""Bad inputs under torchrun (2 CPU processes, gloo): a refusal is one line, printed once, and reaches the run's
log.txt, whether every rank finds it (rank 0 speaks) or one rank alone (that rank speaks)."""
from types import SimpleNamespace

import pytest
from helpers import REPO, torchrun, write_image_folder, write_vae_checkpoint


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs_dist")
    data = write_image_folder(root / "imagenet", corrupt=False)
    return SimpleNamespace(root=root, data=data, vae=write_vae_checkpoint(root / "kl16.ckpt"))


def tiny(env, out, *extra):
    return ["--img_size", "32", "--vae_path", env.vae, "--model", "transdiff_tiny", "--class_num", "2",
            "--diffusion_batch_mul", "2", "--epochs", "1", "--warmup_epochs", "1", "--batch_size", "2",
            "--num_workers", "0", "--threads", "1", "--data_path", env.data, "--output_dir", out, *extra]


def no_traceback_of_ours(result):
    """torchrun itself ends in a traceback (ChildFailedError) when a process fails: none but that one."""
    text = result.stdout + result.stderr
    return text.count("Traceback (most recent call last)") == ("ChildFailedError" in text)


def ours(result):
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("main.py: error:")]


def logged(out):
    return [line for line in (out / "log.txt").read_text().splitlines() if "main.py: error:" in line]


def test_refused_flag_is_said_once_and_logged(env, tmp_path):
    out = tmp_path / "run"
    out.mkdir()  # the folder of an earlier run
    r = torchrun(REPO / "main.py", tiny(env, out, "--lr", "-1e-4"), timeout=180)
    assert r.returncode != 0 and no_traceback_of_ours(r), r.stderr[-3000:]
    assert len(ours(r)) == 1 and "--lr -0.0001 must be positive" in ours(r)[0]
    assert len(logged(out)) == 1 and logged(out)[0].endswith(ours(r)[0])


def test_error_every_rank_finds_is_said_once(env, tmp_path):
    data = write_image_folder(tmp_path / "data", corrupt=False, per_class=2)
    (data / "train" / "n99999999").mkdir()
    out = tmp_path / "run"
    r = torchrun(REPO / "main.py", tiny(env, out, "--class_num", "3", "--data_path", data), timeout=180)
    assert r.returncode != 0 and no_traceback_of_ours(r), r.stderr[-3000:]
    assert len(ours(r)) == 1 and "hold no images" in ours(r)[0] and "rank 1" not in ours(r)[0]
    assert len(logged(out)) == 1


@pytest.mark.slow
def test_error_of_one_rank_other_than_0_is_said_by_it(env, tmp_path):
    out = tmp_path / "run"
    r = torchrun(REPO / "tests" / "rank_error_worker.py", tiny(env, out), timeout=180, env={"FAIL_ON_RANK": "1"})
    assert r.returncode != 0 and no_traceback_of_ours(r), r.stderr[-3000:]
    assert len(ours(r)) == 1 and ours(r)[0].startswith("main.py: error: rank 1: --data_path")
    assert len(logged(out)) == 1 and "rank 1: --data_path" in logged(out)[0]
