"""Both diffusion heads (`--decoder transformer|mlp`): shapes, a training step, guided sampling, checkpoints."""
import argparse

import pytest
import torch

from models.pretrained import CheckpointError, load_transdiff
from models.transdiff import build_model

HEADS = ("transformer", "mlp")


def tiny(decoder, **kw):
    torch.manual_seed(0)
    return build_model("transdiff_tiny", **{"class_num": 10, "img_size": 64, "decoder": decoder, **kw})


@pytest.mark.parametrize("mrar", [False, True])
@pytest.mark.parametrize("decoder", HEADS)
def test_training_step_and_guided_sampling(decoder, mrar):
    model = tiny(decoder, mrar=mrar)
    g, c = model.grid, model.vae_embed_dim
    latents = torch.randn(3, 4, c, g, g) if mrar else torch.randn(3, c, g, g)
    labels = torch.tensor([0, 4, 9])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.diffdecoder.state_dict().items()}
    loss = model(latents, labels)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in model.diffdecoder.state_dict().items())
    cfg = [1.0, 1.5, 2.0, 2.0] if mrar else 2.0
    out = model.samples(labels, num_sampling_steps=3, cfg=cfg, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, c, g, g) and torch.isfinite(out).all()
    again = model.samples(labels, num_sampling_steps=3, cfg=cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_mlp_head_is_per_token():
    """Changing one condition only changes the velocity of the latent tokens of its grid cell."""
    net = tiny("mlp", mrar=True).diffdecoder.net  # 4x4 latent tokens, 2x2 conditions per block
    torch.nn.init.normal_(net.final_layer.linear.weight)  # zero-initialised output would hide everything
    for blk in net.res_blocks:
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.1)
    x, t = torch.randn(1, 16, 16), torch.tensor([500.0])
    c = torch.randn(1, 8, 64)  # two blocks of 4: the head reads the newest one
    v = net(x, c, t)
    c2 = c.clone()
    c2[0, 4] += 1.0  # first condition of the newest block: the top-left 2x2 cell
    changed = (net(x, c2, t) - v).abs().sum(-1)[0].reshape(4, 4) > 1e-6
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(changed, expected)
    c3 = c.clone()
    c3[0, 0] += 1.0  # an older block: not read directly by the per-token head
    assert torch.equal(net(x, c3, t), v)


@pytest.mark.parametrize("decoder", HEADS)
def test_checkpoint_round_trip_and_head_mismatch(tmp_path, decoder):
    model = tiny(decoder)
    args = argparse.Namespace(model="transdiff_tiny", img_size=64, decoder=decoder)
    torch.save({"model": model.state_dict(), "model_ema": model.state_dict(), "args": args},
               tmp_path / "checkpoint-last.pth")
    loaded, ckpt = load_transdiff(str(tmp_path))
    assert loaded.decoder == decoder and ckpt["args"].decoder == decoder
    labels = torch.tensor([1, 2])
    noise = torch.randn(2, model.seq_len, model.token_embed_dim)
    torch.testing.assert_close(loaded.samples(labels, 2, cfg=1.5, scale_1=0.0, noise=noise),
                               model.samples(labels, 2, cfg=1.5, scale_1=0.0, noise=noise))
    other = "mlp" if decoder == "transformer" else "transformer"
    with pytest.raises(CheckpointError, match="MLP head"):
        load_transdiff(str(tmp_path), model=tiny(other))


def test_unknown_decoder():
    with pytest.raises(ValueError, match="unknown decoder 'unet'"):
        tiny("unet")
