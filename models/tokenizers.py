"""Image tokenizers: what turns images into the latents the model learns, and back.

`build_tokenizer(args)` returns a frozen module with `encode(x)` (a posterior with `.sample()` and
`.parameters`), `decode(z)`, and the attributes `scale_factor` (latents the model sees are
posterior samples times this), `stride` (pixels per latent cell) and `embed_dim` (latent channels).
New tokenizers register in TOKENIZERS under the name `--tokenizer` selects.
"""
from models.vae import AutoencoderKL, DiagonalGaussianDistribution

# The latent scale of the KL-16 VAE released with MAR: the only place this number lives.
KL16_SCALE_FACTOR = 0.2325


def _kl16(args):
    vae = AutoencoderKL(embed_dim=args.vae_embed_dim, ch_mult=(1, 1, 2, 2, 4), ckpt_path=args.vae_path)
    vae.scale_factor = KL16_SCALE_FACTOR
    vae.stride = vae.downsample_factor
    return vae


# name -> (builder, stride): the stride is known before the weights are read, for early argument checks
TOKENIZERS = {"kl16": (_kl16, 16)}


def _entry(name):
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]


def tokenizer_stride(name):
    return _entry(name)[1]


def build_tokenizer(args):
    tok = _entry(getattr(args, "tokenizer", "kl16"))[0](args).eval().requires_grad_(False)
    tok.embed_dim = args.vae_embed_dim
    return tok


def latents_from_moments(moments, scale_factor):
    """Scaled latents sampled from cached posterior parameters (mean || logvar along dim 1)."""
    return DiagonalGaussianDistribution(moments).sample() * scale_factor
