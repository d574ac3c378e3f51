"""Image tokenizers: what turns images into the latents the model learns, and back.

`build_tokenizer(args)` returns a frozen module with `encode(x)` (a posterior with `.sample()` and
`.parameters`), `decode(z)`, and the attributes `scale_factor` (latents the model sees are
posterior samples times this), `stride` (pixels per latent cell) and `embed_dim` (latent channels).
New tokenizers register in TOKENIZERS under the name `--tokenizer` selects, with a `geometry` that gives
(stride, embed_dim) from the arguments alone, so the model can be sized before any weights are read.
"""
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.vae import AutoencoderKL, DiagonalGaussianDistribution
from util.checkpoint import file_sha256, save_json

DEFAULT_VAE_PATH = "ckpt/vae/kl16.ckpt"  # where README.md puts the released KL-16 VAE

# The latent scale of the KL-16 VAE released with MAR: the only place this number lives.
KL16_SCALE_FACTOR = 0.2325
KL16_STRIDE, KL16_EMBED_DIM = 16, 16
# The pixel tokenizer's defaults, also read when the arguments (e.g. main_cache.py's) do not name them.
PIXEL_DEFAULTS = {"pixel_patch": 4, "pixel_channels": 1, "pixel_scale": 1.0}
# Log-variance of a point mass: the VAE's lower clamp, so the posterior's spread is numerically nil (exp(-15)).
POINT_MASS_LOGVAR = -30.0
# The arguments that configure a tokenizer: what a checkpoint must carry for its tokenizer to be rebuilt.
TOKENIZER_ARGS = ("tokenizer", "vae_embed_dim", *PIXEL_DEFAULTS)


class PixelTokenizer(nn.Module):
    """Pixel patches as latent tokens, for images too small for the KL-16 VAE: encode is space-to-depth (a
    p x p patch of C channels is one latent cell of C*p*p values), decode its exact inverse. With one channel,
    RGB input is averaged to grey and decoded grey is replicated to RGB, so the rest of the pipeline keeps
    seeing 3-channel images."""

    def __init__(self, patch=PIXEL_DEFAULTS["pixel_patch"], channels=PIXEL_DEFAULTS["pixel_channels"],
                 scale_factor=PIXEL_DEFAULTS["pixel_scale"]):
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"the pixel tokenizer takes 1 (grey) or 3 (RGB) channels, got {channels}")
        if patch < 1:
            raise ValueError(f"the pixel patch must be at least 1, got {patch}")
        self.stride, self.channels, self.scale_factor = patch, channels, scale_factor
        self.embed_dim = channels * patch * patch

    def encode(self, x):
        if self.channels == 1:
            x = x.mean(dim=1, keepdim=True)
        elif x.shape[1] != 3:
            raise ValueError(f"the RGB pixel tokenizer needs 3-channel images, got {x.shape[1]} channels")
        z = F.pixel_unshuffle(x, self.stride)
        # the VAE's posterior type, with no spread: training, caching (main_cache.py) and the cached-latent
        # loader treat both tokenizers alike
        return DiagonalGaussianDistribution(torch.cat([z, torch.full_like(z, POINT_MASS_LOGVAR)], dim=1))

    def decode(self, z):
        x = F.pixel_shuffle(z, self.stride)
        return x.repeat(1, 3, 1, 1) if self.channels == 1 else x


def _pixel_settings(args):
    return {k: getattr(args, k, None) if getattr(args, k, None) is not None else v for k, v in PIXEL_DEFAULTS.items()}


def _build_pixel(args):
    s = _pixel_settings(args)
    return PixelTokenizer(s["pixel_patch"], s["pixel_channels"], s["pixel_scale"])


def _pixel_geometry(args):
    s = _pixel_settings(args)
    return s["pixel_patch"], s["pixel_channels"] * s["pixel_patch"] ** 2


def _build_kl16(args):
    vae = AutoencoderKL(embed_dim=KL16_EMBED_DIM, ch_mult=(1, 1, 2, 2, 4), ckpt_path=args.vae_path,
                        unsafe_load=bool(getattr(args, "vae_unsafe_load", False)))
    vae.scale_factor = KL16_SCALE_FACTOR
    vae.stride = vae.downsample_factor
    return vae


@dataclass(frozen=True)
class TokenizerEntry:
    build: Any      # args -> module
    geometry: Any   # args -> (stride, embed_dim), without reading any weights
    needs_weights: bool


TOKENIZERS = {
    "kl16": TokenizerEntry(_build_kl16, lambda args: (KL16_STRIDE, KL16_EMBED_DIM), needs_weights=True),
    "pixel": TokenizerEntry(_build_pixel, _pixel_geometry, needs_weights=False),
}


def _entry(name):
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]


def tokenizer_geometry(args):
    """(stride, embed_dim) of the tokenizer that `args.tokenizer` names, configured by `args`."""
    return _entry(getattr(args, "tokenizer", "kl16")).geometry(args)


def tokenizer_needs_weights(name):
    return _entry(name).needs_weights


def build_tokenizer(args):
    name = getattr(args, "tokenizer", "kl16")
    stride, embed_dim = tokenizer_geometry(args)
    asked = getattr(args, "vae_embed_dim", None)
    if asked is not None and asked != embed_dim:
        raise ValueError(f"--vae_embed_dim {asked} does not fit the {name} tokenizer, whose latents have "
                         f"{embed_dim} channels")
    tok = _entry(name).build(args).eval().requires_grad_(False)
    tok.embed_dim, tok.stride = embed_dim, stride
    return tok


def add_tokenizer_args(add):
    """The tokenizer flags of main.py and main_cache.py; `add` is a parser's (or group's) add_argument."""
    add("--tokenizer", default="kl16", choices=list(TOKENIZERS),
        help="kl16: the VAE released with MAR (stride 16); pixel: pixel patches as tokens, for small images")
    add("--vae_path", default=DEFAULT_VAE_PATH, help="the KL-16 VAE released with MAR (kl16.ckpt)")
    add("--vae_unsafe_load", action="store_true",
        help="read a --vae_path file that the safe loader refuses by full unpickling, which RUNS CODE FROM THE "
             "FILE: only for files you trust")
    add("--vae_embed_dim", type=int, default=None, help="latent channels: the tokenizer's (KL-16: 16; pixel: "
                                                         "channels * patch^2); given, it must agree")
    add("--pixel_patch", type=int, default=PIXEL_DEFAULTS["pixel_patch"], help="pixel tokenizer: patch side (stride)")
    add("--pixel_channels", type=int, default=PIXEL_DEFAULTS["pixel_channels"], choices=[1, 3],
        help="pixel tokenizer: 1 (grey; RGB averaged, decoded grey replicated to RGB) or 3")
    add("--pixel_scale", type=float, default=PIXEL_DEFAULTS["pixel_scale"], help="pixel tokenizer: latent scale")
    add("--allow_tokenizer_change", action="store_true",
        help="use a tokenizer other than the one recorded in --cached_path or the checkpoint (a deliberate switch; "
             "main_cache.py then encodes every image again)")


def check_tokenizer_args(args):
    """Set args.vae_embed_dim to the tokenizer's channel count; returns why the tokenizer flags cannot work
    (a given --vae_embed_dim that disagrees, a missing weights file), or None."""
    _, embed_dim = tokenizer_geometry(args)
    if args.vae_embed_dim not in (None, embed_dim):
        return (f"--vae_embed_dim {args.vae_embed_dim} conflicts with --tokenizer {args.tokenizer}, whose latents "
                f"have {embed_dim} channels" + (" (pixel_channels * pixel_patch^2)" if args.tokenizer == "pixel"
                                                else "") + ": leave --vae_embed_dim out")
    args.vae_embed_dim = embed_dim
    if tokenizer_needs_weights(args.tokenizer) and not os.path.isfile(args.vae_path):
        return f"--vae_path {args.vae_path} is not a file (the KL-16 VAE, kl16.ckpt)"
    return None


# ------------------------------------------------------------------ fingerprints
# What a tokenizer's latents depend on. A latent cache depends on the image size too, a run on the scale too
# (caches hold unscaled moments; a fine-tuning start may change the image size).
FINGERPRINT_NAME = "tokenizer.json"
CACHE_FINGERPRINT_KEYS = ("tokenizer", "weights_sha256", "embed_dim", "stride", "img_size")
RUN_FINGERPRINT_KEYS = ("tokenizer", "weights_sha256", "embed_dim", "stride", "scale_factor")
_hashes = {}  # (path, size, mtime): sha256, so that a process hashes a weights file once


def _weights_sha256(path):
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        _hashes[key] = file_sha256(path)
    return _hashes[key]


def tokenizer_fingerprint(args):
    """The tokenizer of `args` as recorded in a latent cache and a run's args: its weights' sha256, latent
    channels, stride, scale and the image size."""
    name = getattr(args, "tokenizer", "kl16")
    stride, embed_dim = tokenizer_geometry(args)
    scale = KL16_SCALE_FACTOR if name == "kl16" else _pixel_settings(args)["pixel_scale"]
    return {"tokenizer": name, "weights_sha256": _weights_sha256(args.vae_path) if tokenizer_needs_weights(name)
            else None, "embed_dim": embed_dim, "stride": stride, "scale_factor": scale, "img_size": args.img_size}


def fingerprint_mismatch(recorded, current, keys):
    """None when the fingerprints agree on `keys`, else what differs ("img_size 64, here 128; ...")."""
    def short(v):
        return v[:12] if isinstance(v, str) and len(v) == 64 else v  # a sha256: its first 12 digits

    diff = [f"{k} {short(recorded.get(k))}, here {short(current.get(k))}" for k in keys
            if recorded.get(k) != current.get(k)]
    return "; ".join(diff) or None


def read_fingerprint(folder):
    """The fingerprint that main_cache.py recorded in `folder`, or None."""
    try:
        with open(os.path.join(folder, FINGERPRINT_NAME)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cache_tokenizer_change(folder, fingerprint):
    """(the fingerprint recorded in latent cache `folder` or None, what differs from `fingerprint` or None)."""
    recorded = read_fingerprint(folder)
    return recorded, recorded and fingerprint_mismatch(recorded, fingerprint, CACHE_FINGERPRINT_KEYS)


def write_fingerprint(folder, fingerprint):
    save_json(os.path.join(folder, FINGERPRINT_NAME), fingerprint)


def latents_from_moments(moments, scale_factor):
    """Scaled latents sampled from cached posterior parameters (mean || logvar along dim 1)."""
    return DiagonalGaussianDistribution(moments).sample() * scale_factor
