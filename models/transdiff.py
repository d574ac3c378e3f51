"""TransDiff: an AR Transformer encoder that turns a class label (and, in MRAR mode, earlier images of the
same class) into condition tokens, and a flow-matching diffusion decoder that generates the image latent.

One class serves both modes:
- 1-Step AR: the encoder sees [buffer x class embedding][mask tokens] and emits all conditions at once.
- MRAR: the encoder sees [buffer][mask block][ref 0]...[ref K-2] under a block-causal mask; image k is
  decoded from the outputs of [mask, ref 0 .. ref k-1], and the last of the K images is returned.
"""
import math
from functools import partial

import torch
import torch.nn as nn

from models.blocks import EncoderBlock, run_blocks
from models.diffdecoder import DecoderNet, DiffDecoder
from models.mlp_head import MLPHeadNet

# The released encoder emits 256 condition tokens, at 256 px and at 512 px alike.
DEFAULT_MAX_CONDITIONS = 256


def patchify(x, p):
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), channels outermost inside a token (released layout)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x, p, c):
    """Inverse of `patchify` for a square grid."""
    b, n, _ = x.shape
    g = math.isqrt(n)
    x = x.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, g * p, g * p)


def block_causal_mask(block_sizes, device=None):
    """Boolean (N, N) attention mask: each block attends to itself and to every earlier block."""
    ids = torch.tensor([i for i, size in enumerate(block_sizes) for _ in range(size)], device=device)
    return ids[:, None] >= ids[None, :]


def check_label_range(labels, class_num):
    """Class ids (a host tensor or sequence) must lie in [0, class_num): one clear error instead of an index
    error on CPU or a device-side assert on CUDA."""
    labels = torch.as_tensor(labels)
    if labels.numel() and (labels.min() < 0 or labels.max() >= class_num):
        raise ValueError(f"labels must lie in [0, {class_num}); got values from {int(labels.min())} "
                         f"to {int(labels.max())}")


class Transdiff(nn.Module):
    def __init__(self, img_size=256, patch_size=1,
                 encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
                 decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16,
                 mlp_ratio=4., vae_embed_dim=16, label_drop_prob=0.1, class_num=1000,
                 attn_dropout=0.1, proj_dropout=0.1, buffer_size=64, diffusion_batch_mul=4,
                 grad_checkpointing=False, mrar=False,
                 vae_stride=16, num_conditions=None, norm_eps=1e-6, mrar_images=4, mrar_ref_patch=2,
                 decoder="transformer"):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if img_size % vae_stride:
            raise ValueError(f"img_size {img_size} is not a multiple of the tokenizer stride {vae_stride}")
        self.img_size, self.vae_stride, self.vae_embed_dim = img_size, vae_stride, vae_embed_dim
        self.grid = img_size // vae_stride
        self.mrar = mrar
        # MRAR decodes single latent pixels and patchifies references by the released factor, whatever
        # `patch_size` says (the published MRAR commands pass 1 and 2).
        self.patch_size = 1 if mrar else patch_size
        if self.grid % self.patch_size:
            raise ValueError(f"the {self.grid}x{self.grid} latent grid is not divisible by patch_size {patch_size}")
        self.seq_len = (self.grid // self.patch_size) ** 2
        self.token_embed_dim = vae_embed_dim * self.patch_size ** 2
        self.class_num, self.label_drop_prob, self.buffer_size = class_num, label_drop_prob, buffer_size
        self.diffusion_batch_mul = diffusion_batch_mul
        self.grad_checkpointing = grad_checkpointing
        self.encoder_dropout = attn_dropout > 0 or proj_dropout > 0

        if mrar:
            if self.grid % mrar_ref_patch:
                raise ValueError(f"the {self.grid}x{self.grid} latent grid is not divisible by the MRAR "
                                 f"reference patch {mrar_ref_patch}")
            self.mrar_images, self.ref_patch = mrar_images, mrar_ref_patch
            self.ref_tokens = (self.grid // mrar_ref_patch) ** 2
            derived = mrar_images * self.ref_tokens
            if num_conditions not in (None, derived):
                raise ValueError(f"MRAR emits {mrar_images} x {self.ref_tokens} = {derived} conditions; "
                                 f"num_conditions={num_conditions} does not fit")
            self.num_conditions, mask_len = derived, self.ref_tokens
            z_in = vae_embed_dim * mrar_ref_patch ** 2
        else:
            self.mrar_images = 1
            self.num_conditions = num_conditions or min(self.seq_len, DEFAULT_MAX_CONDITIONS)
            mask_len, z_in = 1, self.token_embed_dim
        d = encoder_embed_dim

        self.fake_latent = nn.Parameter(torch.zeros(1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, mask_len, d))
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + self.num_conditions, d))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.num_conditions, d))
        self.class_emb = nn.Embedding(class_num, d)
        self.z_proj = nn.Linear(z_in, d)  # projects reference tokens; unused in 1-Step (kept for weight layout)
        self.z_proj_ln = nn.LayerNorm(d, eps=norm_eps)
        self.encoder_blocks = nn.ModuleList([
            EncoderBlock(d, encoder_num_heads, mlp_ratio, True, norm_eps, attn_dropout, proj_dropout)
            for _ in range(2 * encoder_depth)])  # released: `encoder_depth` counts pairs of blocks
        self.encoder_norm = nn.LayerNorm(d, eps=norm_eps)
        self.decoder = decoder
        if decoder == "transformer":
            net = DecoderNet(self.token_embed_dim, d, decoder_embed_dim, decoder_depth, decoder_num_heads,
                             self.seq_len, mlp_ratio, norm_eps, attn_dropout, proj_dropout, grad_checkpointing)
        elif decoder == "mlp":  # per-token ablation head: each latent token sees its own condition
            net = MLPHeadNet(self.token_embed_dim, d, decoder_embed_dim, decoder_depth, self.seq_len,
                             mask_len if mrar else self.num_conditions, norm_eps, grad_checkpointing)
        else:
            raise ValueError(f"unknown decoder '{decoder}'; choose 'transformer' or 'mlp'")
        self.diffdecoder = DiffDecoder(net)
        if mrar:
            sizes = [buffer_size] + [self.ref_tokens] * mrar_images
            self.register_buffer("attn_mask", block_causal_mask(sizes), persistent=False)
        else:
            self.attn_mask = None
        self.initialize_weights()

    def initialize_weights(self):
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if m is self.diffdecoder:
                break
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ checks
    def check_labels(self, labels):
        """dtype and shape always; the values where they are on the host (a device tensor would need a sync, a
        compiled forward a graph break: the data of a run is checked when it is built, see
        engine_transdiff.build_data, and `samples` checks a host copy)."""
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D tensor of class ids, got shape {tuple(labels.shape)}")
        if labels.device.type == "cpu" and not torch.compiler.is_compiling():
            check_label_range(labels, self.class_num)

    def _latent_shape(self):
        return (self.vae_embed_dim, self.grid, self.grid)

    def _split_training_latents(self, latents, bsz):
        """1-Step: (B, C, h, w). MRAR: (B, K, C, h, w) or a sequence of K (B, C, h, w) tensors."""
        if self.mrar and isinstance(latents, (list, tuple)):
            latents = torch.stack(list(latents), dim=1)
        want = ((bsz, self.mrar_images) if self.mrar else (bsz,)) + self._latent_shape()
        if tuple(latents.shape) != want:
            what = f"{self.mrar_images} latents per sample" if self.mrar else "one latent per sample"
            raise ValueError(f"expected training latents of shape {want} ({what}), got {tuple(latents.shape)}")
        return latents.unbind(1) if self.mrar else [latents]

    # ------------------------------------------------------------------ encoder
    def forward_encoder(self, class_embedding, refs=None):
        """Conditions (B, n, D) for class embeddings (B, D) and, in MRAR, reference tokens (B, k*T, ref_dim):
        n = num_conditions in 1-Step, (k+1)*T in MRAR."""
        b, d = class_embedding.shape
        mask_len = self.mask_token.shape[1] if self.mrar else self.num_conditions
        parts = [class_embedding[:, None].expand(b, self.buffer_size, d), self.mask_token.expand(b, mask_len, d)]
        if refs is not None and refs.shape[1]:
            parts.append(self.z_proj(refs).to(class_embedding.dtype))
        x = torch.cat(parts, dim=1)
        n = x.shape[1]
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned[:, :n])
        mask = self.attn_mask[:n, :n] if self.attn_mask is not None else None
        x = run_blocks(self.encoder_blocks, x, mask, checkpointing=self.grad_checkpointing)
        x = self.encoder_norm(x)[:, self.buffer_size:]
        return x + self.diffusion_pos_embed_learned[:, :x.shape[1]]

    def encode(self, keys, refs=None):
        """Conditions for encoder inputs `keys` (B,): class ids, `class_num` for the fake latent (no class).

        A 1-Step encoder sees nothing but its class input, so without active dropout its conditions are a
        function of the key: when the batch holds more rows than there are keys, it runs once per key and
        each row takes its own (the same numbers; the gather sums the gradients as the full batch would).
        Small label sets gain most: 10 digit classes in a batch of 64 make a digits training step 15% faster."""
        inputs = torch.cat([self.class_emb.weight, self.fake_latent.to(self.class_emb.weight.dtype)])
        deterministic = not self.training or not self.encoder_dropout
        if refs is None and not self.mrar and deterministic and inputs.shape[0] < keys.shape[0]:
            return self.forward_encoder(inputs)[keys]
        return self.forward_encoder(inputs[keys], refs)

    # ------------------------------------------------------------------ training
    def forward(self, latents, labels):
        """Training loss for VAE latents (scaled) and class labels."""
        self.check_labels(labels)
        images = self._split_training_latents(latents, labels.shape[0])
        keys = labels
        if self.training and self.label_drop_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.label_drop_prob
            keys = torch.where(drop, self.class_num, labels)
        refs = None
        if self.mrar:
            refs = torch.cat([patchify(x, self.ref_patch) for x in images[:-1]], dim=1)
        z = self.encode(keys, refs)
        t = self.num_conditions // self.mrar_images
        losses = [self.diffdecoder.loss(patchify(x, self.patch_size), z[:, :t * (k + 1)], self.diffusion_batch_mul)
                  for k, x in enumerate(images)]
        return sum(losses) / len(losses)

    # ------------------------------------------------------------------ sampling
    def _cfg_list(self, cfg):
        cfgs = list(cfg) if isinstance(cfg, (list, tuple)) else [float(cfg)] * self.mrar_images
        if len(cfgs) != self.mrar_images:
            raise ValueError(f"cfg must be one number or a list of {self.mrar_images} (one per "
                             f"{'MRAR image' if self.mrar else 'image'}), got {cfg}")
        return [float(c) for c in cfgs]

    def _noise(self, bsz, noise, generator, device):
        shape = (bsz, self.seq_len, self.token_embed_dim)
        if noise is None:
            if isinstance(generator, (list, tuple)):
                return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generator])
            return torch.randn(shape, generator=generator, device=device)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape} (batch, latent tokens, token dim), got "
                             f"{tuple(noise.shape)}")
        return noise.to(device=device, dtype=torch.float32)

    @torch.no_grad()
    def samples(self, labels, num_sampling_steps, cfg=1.0, sampler='maruyama', scale_0=1.0, scale_1=1.0,
                noise=None, generator=None):
        """Latents (B, C, H/stride, W/stride) for class labels (B,), integrated in `num_sampling_steps` steps.

        `noise` is the initial noise (B, L, C); every random draw comes from `generator` when given (a
        torch.Generator, or a list with one per sample to make each sample independent of its batch).
        `cfg` may be a list with one value per MRAR image. The model is in eval mode while sampling.
        """
        self.check_labels(labels)
        check_label_range(labels.cpu(), self.class_num)  # on the host: on CUDA a bad id is a device-side assert
        steps = int(num_sampling_steps)
        cfgs = self._cfg_list(cfg)
        device = self.fake_latent.device
        labels = labels.to(device)
        bsz = labels.shape[0]
        x_init = self._noise(bsz, noise, generator, device)
        was_training = self.training
        self.eval()
        try:
            uncond = torch.full_like(labels, self.class_num)
            refs = x_init.new_zeros(bsz, 0, self.z_proj.in_features) if self.mrar else None
            t = self.num_conditions // self.mrar_images
            for k, cfg_k in enumerate(cfgs):
                guided = cfg_k != 1.0
                keys = torch.cat([labels, uncond]) if guided else labels
                z = self.encode(keys, refs if refs is None or not guided else torch.cat([refs, refs]))[:, :t * (k + 1)]
                tokens = self.diffdecoder.sample(z, x_init, steps, cfg_k, sampler, scale_0, scale_1, generator)
                image = unpatchify(tokens.float(), self.patch_size, self.vae_embed_dim)
                if k + 1 < len(cfgs):
                    refs = torch.cat([refs, patchify(image, self.ref_patch)], dim=1)
            return image
        finally:
            self.train(was_training)


def compile_model(model, **kwargs):
    """torch.compile, in place, the parts of a Transdiff model (or a bare DecoderNet) that run often: the
    decoder network and the encoder blocks. Modules keep their names, so state dicts and checkpoints are
    unchanged. kwargs go to torch.compile (e.g. mode="max-autotune")."""
    nets = [model] if isinstance(model, DecoderNet) else [model.diffdecoder.net, *getattr(model, "encoder_blocks", [])]
    for net in nets:
        net.compile(**kwargs)
    return model


MODEL_SIZES = {
    # a few-hundred-thousand-parameter model for CPU smoke runs and tests
    "transdiff_tiny": dict(encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=4,
                           decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4),
    "transdiff_base": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                           decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12),
    "transdiff_large": dict(encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
                            decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16),
    "transdiff_huge": dict(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
                           decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16),
}


def build_model(name, **overrides):
    """Model of a registered size; `overrides` are Transdiff keyword arguments (decoder_embed_dim is the
    decoder width, `--diffloss_w` on the command line)."""
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model '{name}'; choose one of {', '.join(MODEL_SIZES)}")
    return Transdiff(**{**MODEL_SIZES[name], **overrides})


# The released sizes as functions, by the names README.md and SPEC.md give them.
transdiff_base = partial(build_model, "transdiff_base")
transdiff_large = partial(build_model, "transdiff_large")
transdiff_huge = partial(build_model, "transdiff_huge")
