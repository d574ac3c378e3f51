"""Loading released-format checkpoints: the right weights into the right model, clear refusals otherwise."""
import argparse

import pytest
import torch

from models.pretrained import CheckpointError, adapt_state_dict, describe, infer_config, load_transdiff
from models.transdiff import build_model


def tiny(**kw):
    return build_model("transdiff_tiny", **{"class_num": 10, "img_size": 64, **kw})


@pytest.fixture
def run_dir(tmp_path):
    """A run folder with a checkpoint in the released format (EMA weights differ from the raw ones)."""
    torch.manual_seed(0)
    model = tiny()
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    args = argparse.Namespace(model="transdiff_tiny", img_size=64, vae_embed_dim=16, patch_size=1)
    torch.save({"model": model.state_dict(), "model_ema": ema, "optimizer": {}, "epoch": 4, "args": args},
               tmp_path / "checkpoint-last.pth")
    torch.save({"model": model.state_dict(), "args": args}, tmp_path / "checkpoint-2.pth")
    return tmp_path, model, ema


def test_load_from_folder_and_file_ema_or_raw(run_dir):
    path, model, ema = run_dir
    loaded, ckpt = load_transdiff(str(path))  # folder -> checkpoint-last.pth, EMA by default
    assert ckpt["epoch"] == 4
    assert torch.equal(loaded.fake_latent, ema["fake_latent"])
    raw, _ = load_transdiff(str(path / "checkpoint-last.pth"), use_ema=False)
    assert torch.equal(raw.fake_latent, model.fake_latent)
    into, _ = load_transdiff(str(path), model=tiny(), step=2)
    assert torch.equal(into.fake_latent, model.fake_latent)  # no EMA stored: falls back to raw, says so
    assert infer_config(loaded.state_dict())["img_size"] == 64


@pytest.mark.parametrize("other,words", [
    ({"mrar": True}, "1-Step at 64 px"),
    ({"img_size": 128}, "1-Step at 64 px"),
    ({"decoder_embed_dim": 32}, "but the model is transdiff_tiny 1-Step at 64 px, decoder width 32"),
])
def test_refuses_another_mode_resolution_or_size(run_dir, other, words):
    path, _, _ = run_dir
    with pytest.raises(CheckpointError, match=words):
        load_transdiff(str(path), model=tiny(**other))


def test_unreadable_checkpoints(tmp_path, run_dir):
    path, _, _ = run_dir
    data = (path / "checkpoint-last.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_transdiff(str(tmp_path / "cut.pth"))
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_transdiff(str(tmp_path / "notes.pth"))
    torch.save({"weights": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a TransDiff checkpoint"):
        load_transdiff(str(tmp_path / "other.pth"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_transdiff(str(tmp_path / "missing.pth"))
    with pytest.raises(CheckpointError, match="no checkpoint-7.pth in folder"):
        load_transdiff(str(path), step=7)


def test_mrar_starts_from_1step_checkpoint():
    torch.manual_seed(0)
    one = tiny()
    mrar = tiny(mrar=True)
    sd, notes = adapt_state_dict(one.state_dict(), mrar)
    mrar.load_state_dict(sd, strict=True)
    assert any("mask_token" in n for n in notes) and any("z_proj" in n for n in notes)
    assert torch.equal(mrar.mask_token[:, 3], one.mask_token[:, 0])
    assert torch.equal(mrar.class_emb.weight, one.class_emb.weight)
    assert mrar.samples(torch.tensor([3]), 2, cfg=1.5).shape == (1, 16, 4, 4)


def test_512_starts_from_256_checkpoint():
    one = build_model("transdiff_tiny", class_num=10, img_size=256)
    big = build_model("transdiff_tiny", class_num=10, img_size=512)
    sd, notes = adapt_state_dict(one.state_dict(), big)
    big.load_state_dict(sd, strict=True)
    pos = big.diffdecoder.net.diffusion_pos_embed_learned
    assert pos.shape == (1, 1024, 64) and "16x16 to a 32x32" in notes[0]
    src = one.diffdecoder.net.diffusion_pos_embed_learned.reshape(16, 16, 64)
    # bicubic resize keeps the mean of the grid and is smooth: close to the nearest source position
    assert torch.allclose(pos.mean(), src.mean(), atol=1e-3)
    assert "1-Step at 512 px" in describe(infer_config(big.state_dict()))


def test_adapt_refuses_another_size():
    with pytest.raises(CheckpointError, match="decoder width 32"):
        adapt_state_dict(tiny(decoder_embed_dim=32).state_dict(), tiny())
