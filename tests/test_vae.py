"""KL-16 VAE: state-dict layout, parity with the reference implementation, checkpoint loading, sampling."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from models.vae import AutoencoderKL, DiagonalGaussianDistribution, load_vae

FIXTURES = Path(__file__).parent / "fixtures"


def _synth_module():
    spec = importlib.util.spec_from_file_location("synth", FIXTURES / "synth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def manifest():
    return json.loads((FIXTURES / "official_state_dicts.json").read_text())["vae_kl16"]


@pytest.fixture(scope="module")
def parity():
    return torch.load(FIXTURES / "parity_vae_kl16.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def synth_weights(manifest, parity):
    return _synth_module().synth_state_dict(manifest["state_dict"], base_seed=parity["weights_seed"])


@pytest.fixture(scope="module")
def vae(parity, synth_weights):
    model = AutoencoderKL(**parity["config"]).eval()
    model.load_state_dict(synth_weights, strict=True)
    return model


@pytest.fixture(scope="module")
def released_ckpt(tmp_path_factory, synth_weights):
    """The synthetic weights written in the released kl16.ckpt format."""
    path = tmp_path_factory.mktemp("vae") / "kl16.ckpt"
    torch.save({"model": synth_weights}, path)
    return path


def test_state_dict_matches_release(manifest):
    model = AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == manifest["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]


@torch.no_grad()
def test_parity_with_reference(vae, parity):
    posterior = vae.encode(parity["image"])
    torch.testing.assert_close(posterior.parameters, parity["moments"], rtol=0, atol=1e-4)
    torch.testing.assert_close(vae.decode(posterior.mean), parity["decoded_from_mean"], rtol=0, atol=1e-4)


@torch.no_grad()
def test_any_size_divisible_by_16(vae):
    x = torch.randn(1, 3, 16, 32)
    posterior = vae.encode(x)
    assert posterior.mean.shape == (1, 16, 1, 2)
    assert vae.decode(posterior.mean).shape == x.shape
    with pytest.raises(ValueError, match="divisible by 16"):
        vae.encode(torch.randn(1, 3, 40, 32))


@torch.no_grad()
def test_load_released_format(vae, released_ckpt, parity):
    loaded = load_vae(released_ckpt)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    image = parity["image"][:1, :, :32, :32]
    torch.testing.assert_close(loaded.encode(image).parameters, vae.encode(image).parameters, rtol=0, atol=0)


def test_bare_state_dict_accepted(tmp_path, synth_weights):
    path = tmp_path / "bare.pt"
    torch.save(synth_weights, path)
    model = AutoencoderKL(ckpt_path=path)
    torch.testing.assert_close(model.post_quant_conv.weight, synth_weights["post_quant_conv.weight"])


def test_checkpoint_with_pickled_args(tmp_path, synth_weights):
    """Old training checkpoints also pickle an argparse.Namespace, which the safe loader refuses."""
    path = tmp_path / "with_args.pth"
    torch.save({"model": synth_weights, "args": argparse.Namespace(vae_embed_dim=16)}, path)
    model = AutoencoderKL(ckpt_path=path)
    torch.testing.assert_close(model.quant_conv.bias, synth_weights["quant_conv.bias"])


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="--vae_path") as info:
        AutoencoderKL(ckpt_path=tmp_path / "nope.ckpt")
    assert "nope.ckpt" in str(info.value) and "MAR" in str(info.value)


def test_truncated_checkpoint(tmp_path, released_ckpt):
    data = released_ckpt.read_bytes()
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="not a valid torch checkpoint") as info:
        AutoencoderKL(ckpt_path=path)
    assert "truncated" in str(info.value) and info.value.__cause__ is None


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "kl16.ckpt"
    path.write_text("<html>404 Not Found</html>\n")
    with pytest.raises(RuntimeError, match="not a valid torch checkpoint"):
        AutoencoderKL(ckpt_path=path)


def test_other_architecture(tmp_path):
    path = tmp_path / "kl8.ckpt"
    torch.save({"model": AutoencoderKL(embed_dim=8).state_dict()}, path)
    with pytest.raises(RuntimeError, match="does not hold weights") as info:
        AutoencoderKL(ckpt_path=path)
    message = str(info.value)
    assert "shape mismatches" in message and "encoder.conv_out.weight" in message
    assert "embed_dim=8, ch_mult=(1, 1, 2, 2, 4)" in message


def test_foreign_state_dict(tmp_path):
    path = tmp_path / "transdiff.pth"
    torch.save({"model": {"encoder_pos_embed_learned": torch.zeros(1, 320, 8)}}, path)
    with pytest.raises(RuntimeError, match="missing keys") as info:
        AutoencoderKL(ckpt_path=path)
    assert "unexpected keys: encoder_pos_embed_learned" in str(info.value)


def test_sample_reproducible():
    moments = torch.randn(2, 32, 4, 4)
    posterior = DiagonalGaussianDistribution(moments)
    a = posterior.sample(torch.Generator().manual_seed(0))
    b = posterior.sample(torch.Generator().manual_seed(0))
    c = posterior.sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert posterior.mode() is posterior.mean and posterior.kl().shape == (2,)


def test_logvar_clamped():
    moments = torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1)], dim=1)
    posterior = DiagonalGaussianDistribution(moments)
    assert posterior.logvar.flatten().tolist() == [-30.0, 20.0]
    assert torch.isfinite(posterior.var).all()


@torch.no_grad()
def test_bf16_autocast_close_to_fp32(vae, parity):
    image = parity["image"][:1, :, :16, :16]
    ref = vae.encode(image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        posterior = vae.encode(image)
        decoded = vae.decode(posterior.mean)
    assert torch.isfinite(decoded).all()
    torch.testing.assert_close(posterior.parameters.float(), ref.parameters, rtol=0, atol=0.1)
    torch.testing.assert_close(decoded.float(), vae.decode(ref.mean), rtol=0, atol=0.2)
