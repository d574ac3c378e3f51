"""The diffusion decoder: a DiT-like transformer with cross-attention to the AR encoder's conditions,
trained with flow matching and sampled with the samplers of `diffusion/`.

`DiffDecoder` hides the diffusion process behind `loss` / `sample`; its `net` predicts the velocity.
"""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from diffusion.flow import flow_matching_loss
from diffusion.samplers import sample as run_sampler
from models import fused
from models.blocks import DecoderBlock, FinalLayer, TimeEmbedding


class DecoderNet(nn.Module):
    def __init__(self, token_dim, cond_dim, width, depth, num_heads, seq_len, mlp_ratio=4.0, norm_eps=1e-6,
                 attn_drop=0.0, proj_drop=0.0, grad_checkpointing=False):
        super().__init__()
        self.token_dim = token_dim
        self.seq_len = seq_len
        self.grad_checkpointing = grad_checkpointing
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, width))
        self.time_embed = TimeEmbedding(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList([
            DecoderBlock(width, num_heads, mlp_ratio, True, norm_eps, attn_drop, proj_drop) for _ in range(depth)])
        self.final_layer = FinalLayer(width, token_dim, norm_eps)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(_basic)
        nn.init.normal_(self.diffusion_pos_embed_learned, std=0.02)
        for lin in (self.time_embed.time_embedder.linear_1, self.time_embed.time_embedder.linear_2,
                    self.time_embed.time_proj):
            nn.init.normal_(lin.weight, std=0.02)
        # zero output layer: the untrained decoder predicts v = 0 instead of noise
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def condition_kv(self, c):
        """Per-block cross-attention keys/values of conditions c (B, N, cond_dim)."""
        if fused.applies(self, c):
            return fused.condition_kv(self, c)
        c = self.cond_embed(c)
        return [blk.attn2.kv(c) for blk in self.res_blocks]

    def forward(self, x, c, t, cond_kv=None):
        """Velocity for latent tokens x (B, L, token_dim) at times t on the 0..1000 scale: shape (B,), or (1,)
        / a scalar when every sample is at the same time (sampling), which computes the time embedding once.

        Pass either the conditions `c` or their precomputed `cond_kv` (from `condition_kv`). Without autograd
        and in eval mode the network runs models/fused.py (same function, fewer passes over memory)."""
        if x.shape[1:] != (self.seq_len, self.token_dim):
            raise ValueError(f"decoder expects latent tokens of shape (B, {self.seq_len}, {self.token_dim}), "
                             f"got {tuple(x.shape)}")
        t = t.reshape(-1)
        if t.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"t must hold one time or one per sample ({x.shape[0]}), got {t.shape[0]}")
        if cond_kv is None:
            cond_kv = self.condition_kv(c)
        temb, t6 = self.time_embed(t)
        if fused.applies(self, x):
            return fused.decoder(self, x, t6, temb, cond_kv)
        x = self.input_proj(x) + self.diffusion_pos_embed_learned
        for blk, kv in zip(self.res_blocks, cond_kv):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, t6, kv, use_reentrant=False)
            else:
                x = blk(x, t6, kv)
        return self.final_layer(x, temb)


class DiffDecoder(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def loss(self, target, c, batch_mul=1):
        """Flow-matching loss for target tokens (B, L, C) given conditions (B, N, D); each pair is used
        `batch_mul` times with independent noise and t. The conditions' keys/values are computed once and not
        repeated: the repeats of each target are adjacent, and their queries attend to those keys together."""
        kv = self.net.condition_kv(c)
        x0 = target.repeat_interleave(batch_mul, dim=0) if batch_mul > 1 else target
        return flow_matching_loss(lambda x, t: self.net(x, None, t, cond_kv=kv), x0)

    def sample(self, c, noise, num_steps, cfg=1.0, sampler="maruyama", scale_0=1.0, scale_1=1.0, generator=None,
               cache_kv=True):
        """Integrate from `noise` (B, L, C). Under CFG, c holds 2B sequences: conditional, then unconditional.

        The cross-attention keys/values of the conditions are computed once (`cache_kv`, the default); with
        cache_kv=False every step recomputes them (same result, for benchmarks and tests)."""
        if cache_kv:
            kv = self.net.condition_kv(c)
            velocity = lambda x, t: self.net(x, None, t, cond_kv=kv)  # noqa: E731
        else:
            velocity = lambda x, t: self.net(x, c, t)  # noqa: E731
        return run_sampler(velocity, noise, num_steps, cfg, sampler, scale_0, scale_1, generator)
