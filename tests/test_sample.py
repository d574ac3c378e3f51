"""sample.py: any run folder loads by itself, the grid has the asked size, a seed reproduces an image."""
import argparse
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from models.pretrained import load_tokenizer, load_transdiff
from models.tokenizers import PixelTokenizer
from models.transdiff import MODEL_SIZES, build_model
from util.evaluation import image_seed, to_uint8

SIDE, PATCH, STEPS = 32, 8, 2


def write_pixel_run(folder, seed=0):
    """A run folder as `main.py --preset digits` writes it (pixel tokenizer, 8 px grey patches, a decoder
    narrower than the encoder), with random weights and EMA weights that differ from the raw ones."""
    torch.manual_seed(seed)
    model = build_model("transdiff_tiny", img_size=SIDE, vae_stride=PATCH, vae_embed_dim=PATCH * PATCH,
                        class_num=10, buffer_size=16, decoder_embed_dim=32)
    raw = model.state_dict()
    ema = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in raw.items()}
    args = argparse.Namespace(model="transdiff_tiny", tokenizer="pixel", pixel_patch=PATCH, pixel_channels=1,
                              pixel_scale=1.0, vae_embed_dim=None, img_size=SIDE, class_num=10, diffloss_w=32,
                              cfg=4.0, scale_0=1.0, scale_1=1.0, num_sampling_steps=STEPS, sampler="maruyama",
                              vae_path="nowhere/kl16.ckpt")
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": raw, "model_ema": ema, "epoch": 3, "args": args}, folder / "checkpoint-last.pth")
    return folder


@pytest.fixture
def run(tmp_path):
    return write_pixel_run(tmp_path / "run")


def test_pixel_run_loads_with_no_extra_arguments(run):
    model, ckpt = load_transdiff(str(run))
    assert (model.img_size, model.vae_stride, model.vae_embed_dim, model.class_num) == (SIDE, PATCH, 64, 10)
    assert sample.sampling_settings(model, ckpt)[0]["num_sampling_steps"] == STEPS  # the run's, not the default 100
    tok = load_tokenizer(ckpt)
    assert isinstance(tok, PixelTokenizer) and (tok.stride, tok.embed_dim) == (PATCH, 64)


def test_grid_size_names_and_seed_reproduces_an_image(run, tmp_path):
    grid, singles = tmp_path / "grid.png", tmp_path / "singles"
    images = sample.main(["--resume", str(run), "--classes", "3", "7", "--per_class", "3", "--seed", "5",
                          "--out", str(grid), "--save_dir", str(singles), "--batch_size", "2"])
    with Image.open(grid) as im:
        # 2 rows x 3 columns of 32 px images with 2 px borders
        assert im.size == (3 * (SIDE + 2) + 2, 2 * (SIDE + 2) + 2)
    names = sorted(p.name for p in singles.iterdir())
    assert names == [f"{i:04d}-class{c}-seed5.png" for i, c in enumerate([3, 3, 3, 7, 7, 7])]
    assert images.shape == (6, SIDE, SIDE, 3)

    # image 4 (class 7) alone, in another batch: the same pixels as the sampler and tokenizer give directly
    model, _ = load_transdiff(str(run))
    with torch.no_grad():
        latents = model.samples(torch.tensor([7]), num_sampling_steps=STEPS, cfg=4.0,
                                generator=[torch.Generator().manual_seed(image_seed(5, 4))])
    expected = to_uint8(PixelTokenizer(PATCH, 1).decode(latents))[0]
    assert np.array_equal(np.asarray(Image.open(singles / "0004-class7-seed5.png").convert("RGB")), expected)
    again = sample.main(["--resume", str(run), "--classes", "3", "7", "--per_class", "3", "--seed", "5",
                         "--out", str(tmp_path / "again.png"), "--batch_size", "6"])
    assert np.array_equal(again, images)
    other = sample.main(["--resume", str(run), "--classes", "3", "7", "--per_class", "3", "--seed", "6",
                         "--out", str(tmp_path / "other.png")])
    assert not np.array_equal(other[4], images[4])


def test_bf16_on_cpu_and_raw_weights(run, tmp_path):
    fp32 = sample.main(["--resume", str(run), "--classes", "1", "--per_class", "2", "--out", str(tmp_path / "a.png")])
    bf16 = sample.main(["--resume", str(run), "--classes", "1", "--per_class", "2", "--dtype", "bf16",
                        "--out", str(tmp_path / "b.png")])
    raw = sample.main(["--resume", str(run), "--classes", "1", "--per_class", "2", "--raw",
                       "--out", str(tmp_path / "c.png")])
    assert bf16.shape == fp32.shape and not np.array_equal(raw, fp32)
    # bf16 rounding moves pixels a little, not the whole image
    assert np.abs(bf16.astype(int) - fp32.astype(int)).mean() < 20


def test_default_settings_published_for_released_architectures_else_the_runs(run):
    mrar_l = SimpleNamespace(config={**MODEL_SIZES["transdiff_large"], "class_num": 1000, "decoder": "transformer"},
                             mrar=True, img_size=256)
    run_args = {"args": {"cfg": 3.0, "num_sampling_steps": "64"}}  # as the released code stores it: a string
    settings, source = sample.sampling_settings(mrar_l, run_args)
    assert (settings["cfg"], settings["scale_0"], settings["scale_1"], settings["num_sampling_steps"]) == \
        (1.30, 0.925, 0.95, 100) and "paper" in source and "first release" in source
    mrar_l.img_size = 512  # no released L-MRAR at 512 px: the run's own
    settings, _ = sample.sampling_settings(mrar_l, run_args)
    assert (settings["cfg"], settings["scale_0"], settings["num_sampling_steps"]) == (3.0, 1.0, 64)
    model, ckpt = load_transdiff(str(run))
    settings, source = sample.sampling_settings(model, ckpt, {"cfg": 2.5, "scale_0": None})
    assert settings == {"cfg": 2.5, "scale_0": 1.0, "scale_1": 1.0, "num_sampling_steps": STEPS,
                        "sampler": "maruyama"} and "overridden by cfg" in source


def test_clear_refusals(run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.main(["--resume", str(run), "--classes", "3", "10", "--out", str(tmp_path / "x.png")])
    assert "--classes [10] out of range: the model has classes 0..9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main(["--resume", str(tmp_path / "missing"), "--classes", "3"])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(Exception, match="pass --vae_path"):
        load_tokenizer({"args": {"vae_embed_dim": 16, "vae_path": str(tmp_path / "no.ckpt")}})
