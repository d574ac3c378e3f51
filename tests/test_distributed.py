"""main.py and main_cache.py under torchrun on CPU (gloo): two processes on one node, and two "nodes" on
localhost with one process each, in 1-Step, MRAR and cached-latent modes, each saving and resuming."""
import pytest
import torch
from helpers import REPO, read_losses, torchrun, torchrun_two_nodes, write_image_folder, write_vae_checkpoint

from tools.build_mrar_index import main as build_index


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    write_image_folder(root / "imagenet")
    build_index(["--data_path", str(root / "imagenet"), "--output", str(root / "mrar.txt"), "--repeats", "2"])
    return {"root": root, "data": root / "imagenet", "vae": write_vae_checkpoint(root / "kl16.ckpt"),
            "index": root / "mrar.txt"}


def common(world, out, img_size=32):
    return ["--img_size", img_size, "--vae_path", world["vae"], "--vae_embed_dim", 16, "--patch_size", 1,
            "--model", "transdiff_tiny", "--diffusion_batch_mul", 2, "--epochs", 2, "--warmup_epochs", 1,
            "--class_num", 10, "--num_workers", 0, "--log_freq", 1, "--output_dir", out, "--resume", out,
            "--data_path", world["data"]]


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def resumed_in(text):
    return "resumed from" in text


def test_one_step_resume_across_topologies_matches_uninterrupted(world):
    """2 processes stop after 2 steps (mid-epoch), 2 "nodes" resume: the losses equal an uninterrupted run."""
    main = REPO / "main.py"
    full, split = world["root"] / "one_full", world["root"] / "one_split"
    ok(torchrun(main, common(world, full) + ["--batch_size", 2]))
    ok(torchrun(main, common(world, split) + ["--batch_size", 2, "--max_train_steps", 2]))
    nodes = [ok(r) for r in torchrun_two_nodes(main, common(world, split) + ["--batch_size", 2])]
    assert resumed_in(nodes[0].stdout)
    a, b = read_losses(full), read_losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))  # 13 images, 2 ranks x 2 per batch: 3 steps per epoch
    for step in a:
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])
    ckpt = torch.load(split / "checkpoint-last.pth", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["train_state"]["step"] == 6 and len(ckpt["rng"]) == 2


def test_mrar_two_processes_then_two_nodes(world):
    main, out = REPO / "main.py", world["root"] / "mrar"
    args = common(world, out) + ["--mrar", "--bf16", "--batch_size", 1, "--gradient_accumulation_steps", 2,
                                 "--mrar_index", world["index"]]
    ok(torchrun(main, args + ["--max_train_steps", 1]))
    nodes = [ok(r) for r in torchrun_two_nodes(main, args)]
    assert resumed_in(nodes[0].stdout)
    assert sorted(read_losses(out)) == [1, 2]  # 4 rows / (2 ranks x 1 x 2 micro-steps) = 1 step per epoch
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=False)
    assert ckpt["model"]["mask_token"].shape == (1, 1, 64) and ckpt["epoch"] == 1


def test_cached_latents_two_processes_then_two_nodes(world):
    cache = world["root"] / "cache"
    ok(torchrun(REPO / "main_cache.py", ["--img_size", 32, "--vae_path", world["vae"], "--vae_embed_dim", 16,
                                         "--batch_size", 4, "--num_workers", 0, "--data_path", world["data"],
                                         "--cached_path", cache]))
    assert len(list(cache.glob("*/*.png.npz"))) == 12  # the broken image is reported, not cached
    main, out = REPO / "main.py", world["root"] / "cached"
    args = common(world, out) + ["--use_cached", "--cached_path", cache, "--batch_size", 2]
    ok(torchrun(main, args + ["--max_train_steps", 2]))
    nodes = [ok(r) for r in torchrun_two_nodes(main, args)]
    assert resumed_in(nodes[0].stdout)
    assert sorted(read_losses(out)) == list(range(1, 7))


def test_non_finite_loss_stops_every_rank(world):
    """Rank 1's loss turns NaN at step 2: both ranks stop with the step named, no rank hangs, and the
    checkpoint saved at step 1 stays as it was."""
    out = world["root"] / "nan"
    args = common(world, out) + ["--batch_size", 2, "--save_every_steps", 1]
    result = torchrun(REPO / "tests" / "helpers.py", args, env={"NAN_AT_CALL": "2"}, timeout=180)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "non-finite loss on 1 of 2 ranks at epoch 0, optimizer step 2" in text
    assert "(rank 1)" in text  # rank 1 stopped by itself, it was not killed by the launcher
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=False)
    assert ckpt["train_state"]["step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
