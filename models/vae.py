"""Frozen KL-16 VAE released with MAR (LDM ``AutoencoderKL`` architecture).

Module names and creation order mirror the released ``kl16.ckpt`` so that it loads with ``strict=True``.
Images in [-1, 1] of any size divisible by 2 ** (len(ch_mult) - 1) map to latents of ``embed_dim`` channels.
"""

import argparse
import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.errors import UserError

# What released VAE files pickle besides tensors (MAR's training arguments); the safe loader accepts these only.
SAFE_GLOBALS = [argparse.Namespace]
UNSAFE_FLAG = "--vae_unsafe_load"


class VAEFileError(UserError, RuntimeError):
    pass


class VAEFileMissing(VAEFileError, FileNotFoundError):
    pass


def Normalize(channels, num_groups=32):
    return nn.GroupNorm(num_groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, dropout=0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (1x1-conv projections)."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        # (B, 1, HW, C): one head whose width is the channel count, so SDPA's 1/sqrt(C) scale matches LDM.
        q, k, v = (proj(h).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.squeeze(1).transpose(1, 2).reshape(b, c, hgt, wid)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # Asymmetric padding (right/bottom only) as in LDM; symmetric padding would shift the latent grid.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels, dropout=0.0):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, in_channels=3, z_channels=16, dropout=0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            last = i == len(ch_mult) - 1
            level.block = nn.ModuleList()
            # The released model attends at the 16x16 level of a 256px input, i.e. the last level; the module
            # structure is fixed by the checkpoint, not by the input size.
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * mult, dropout))
                block_in = ch * mult
                if last:
                    level.attn.append(AttnBlock(block_in))
            if not last:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = MidBlock(block_in, dropout)
        self.norm_out = Normalize(block_in)
        # double_z: the encoder emits mean and logvar.
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, out_channels=3, z_channels=16, dropout=0.0):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, dropout)
        # Built from the deepest level up, but indexed by level (up.0 is the full-resolution one) to match LDM.
        up = []
        for i in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * ch_mult[i], dropout))
                block_in = ch * ch_mult[i]
            level.attn = nn.ModuleList()  # kept (empty) so the module tree mirrors LDM's
            if i > 0:
                level.upsample = Upsample(block_in)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    def __init__(self, parameters):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        # Clamp keeps exp() finite for untrained or extreme inputs (LDM's bounds).
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    def kl(self):
        """KL divergence to the standard normal, summed over latent dimensions (one value per sample)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    def __init__(self, embed_dim=16, ch_mult=(1, 1, 2, 2, 4), ckpt_path=None, unsafe_load=False):
        super().__init__()
        self.embed_dim = embed_dim
        self.ch_mult = tuple(ch_mult)
        self.encoder = Encoder(ch_mult=ch_mult, z_channels=embed_dim)
        self.decoder = Decoder(ch_mult=ch_mult, z_channels=embed_dim)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        if ckpt_path is not None:
            self.load_checkpoint(ckpt_path, unsafe_load)

    @property
    def downsample_factor(self):
        return 2 ** (len(self.ch_mult) - 1)

    def encode(self, x):
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"VAE input size {tuple(x.shape[-2:])} must be divisible by {f}")
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=True, generator=None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def load_checkpoint(self, path, unsafe_load=False):
        state_dict = _read_state_dict(path, unsafe_load)
        problems = _describe_mismatch(self.state_dict(), state_dict)
        if problems:
            raise VAEFileError(
                f"{path} does not hold weights of AutoencoderKL(embed_dim={self.embed_dim}, ch_mult={self.ch_mult}): "
                f"{problems}. Pass the KL-16 VAE released with MAR (kl16.ckpt) via --vae_path, or the "
                "embed_dim/ch_mult that match this file."
            )
        self.load_state_dict(state_dict, strict=True)


def load_vae(path, embed_dim=16, ch_mult=(1, 1, 2, 2, 4), unsafe_load=False):
    """The frozen VAE: weights from `path`, eval mode, no gradients."""
    return AutoencoderKL(embed_dim, ch_mult, ckpt_path=path, unsafe_load=unsafe_load).eval().requires_grad_(False)


def _read_state_dict(path, unsafe_load=False):
    """The state dict of a VAE file, read by the safe loader (tensors and SAFE_GLOBALS only); a file that pickles
    anything else is refused unless `unsafe_load` (the user's explicit --vae_unsafe_load) allows full unpickling,
    which runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise VAEFileMissing(
            f"VAE checkpoint not found: {path}. Download the KL-16 VAE released with MAR (kl16.ckpt) and pass "
            "its path with --vae_path."
        )
    try:
        if unsafe_load:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if zipfile.is_zipfile(path) and "Unsupported global" in str(err):  # a whole torch file, foreign objects
            raise VAEFileError(
                f"VAE checkpoint {path} pickles objects that the safe loader refuses ({_unsupported(err)}). If you "
                f"trust this file, pass {UNSAFE_FLAG}, which unpickles it fully and so RUNS CODE FROM THE FILE; "
                "else use the KL-16 VAE released with MAR (kl16.ckpt) via --vae_path.") from None
        raise VAEFileError(
            f"Could not read VAE checkpoint {path}: it is not a valid torch checkpoint (truncated or corrupted "
            f"download?) [{type(err).__name__}: {first[:120]}]. Download kl16.ckpt again and pass it with "
            "--vae_path.") from None
    except Exception as err:
        raise VAEFileError(
            f"Could not read VAE checkpoint {path}: it is not a valid torch checkpoint (truncated or corrupted "
            f"download?) [{type(err).__name__}: {str(err).split('. ')[0][:120]}]. Download kl16.ckpt again and "
            "pass it with --vae_path."
        ) from None
    state_dict = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise VAEFileError(
            f"VAE checkpoint {path} holds no state dict (expected a dict of tensors, or one under the key 'model'). "
            "Pass the KL-16 VAE released with MAR (kl16.ckpt) with --vae_path."
        )
    return state_dict


def _unsupported(err):
    """The global the safe loader refused, as its message names it."""
    for line in str(err).splitlines():
        if "Unsupported global" in line:
            return line.strip().split(" To ")[0].rstrip(".")
    return "objects other than tensors"


def _describe_mismatch(expected, found, limit=3):
    """Human-readable summary of key/shape differences, with a guess of the architecture `found` belongs to."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    if not parts:
        return ""
    guess = _guess_architecture(found)
    return "; ".join(parts) + (f"; the file looks like {guess}" if guess else "")


def _guess_architecture(state_dict):
    if "post_quant_conv.weight" not in state_dict or "encoder.conv_in.weight" not in state_dict:
        return "something other than an LDM AutoencoderKL" if state_dict else "an empty state dict"
    embed_dim = state_dict["post_quant_conv.weight"].shape[0]
    ch = state_dict["encoder.conv_in.weight"].shape[0]
    mults, i = [], 0
    while f"encoder.down.{i}.block.0.conv1.weight" in state_dict:
        mults.append(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch)
        i += 1
    return f"AutoencoderKL(embed_dim={embed_dim}, ch_mult={tuple(mults)})"
