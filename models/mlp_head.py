"""A MAR-style per-token diffusion head (`--decoder mlp`), the ablation beside the transformer decoder.

Each latent token is denoised independently by a residual MLP with adaptive LayerNorm, conditioned on the time
embedding plus *its own* condition vector (MAR's SimpleMLPAdaLN design). The encoder's conditions form a
square grid (the last `cond_block` of them: all in 1-Step, the newest block in MRAR, whose causal attention
already saw the earlier blocks); a grid coarser than the latent tokens is upsampled by nearest neighbour, so a
condition covers the tokens of its cell (2x2 in MRAR at 256 px, as its references are 2x2 patches).

It has the interface of `DecoderNet`: `condition_kv(c)` prepares the conditions once per image, and
`forward(x, c, t, cond_kv=None)` predicts the velocity, so the same loss and samplers drive both heads.
"""
import math

import torch.nn as nn
import torch.nn.functional as F

from models.blocks import TimestepEmbedder, modulate, run_blocks, timestep_embedding


class ResBlock(nn.Module):
    def __init__(self, width, norm_eps=1e-6):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class MLPFinalLayer(nn.Module):
    def __init__(self, width, out_dim, norm_eps=1e-6):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MLPHeadNet(nn.Module):
    def __init__(self, token_dim, cond_dim, width, depth, seq_len, cond_block, norm_eps=1e-6,
                 grad_checkpointing=False, freq_dim=256):
        super().__init__()
        self.token_dim, self.seq_len, self.cond_block = token_dim, seq_len, cond_block
        self.freq_dim, self.grad_checkpointing = freq_dim, grad_checkpointing
        n, g = math.isqrt(cond_block), math.isqrt(seq_len)
        if n * n != cond_block or g * g != seq_len or g % n:
            raise ValueError(f"the MLP head maps a square grid of {cond_block} conditions onto the square grid of "
                             f"{seq_len} latent tokens; these sizes do not tile")
        self.upsample = g // n
        self.time_embed = TimestepEmbedder(freq_dim, width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList([ResBlock(width, norm_eps) for _ in range(depth)])
        self.final_layer = MLPFinalLayer(width, token_dim, norm_eps)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
        # zero modulation and output: every block starts as the identity and the head predicts v = 0
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def condition_kv(self, c):
        """One embedded condition per latent token (B, L, W), from the last `cond_block` conditions."""
        c = self.cond_embed(c[:, -self.cond_block:])
        if self.upsample > 1:
            b, n, w = c.shape
            side = math.isqrt(n)
            grid = c.transpose(1, 2).reshape(b, w, side, side)
            c = F.interpolate(grid, scale_factor=self.upsample, mode="nearest").flatten(2).transpose(1, 2)
        return c

    def forward(self, x, c, t, cond_kv=None):
        if x.shape[1:] != (self.seq_len, self.token_dim):
            raise ValueError(f"the MLP head expects latent tokens of shape (B, {self.seq_len}, {self.token_dim}), "
                             f"got {tuple(x.shape)}")
        cond = self.condition_kv(c) if cond_kv is None else cond_kv
        if cond.shape[0] != x.shape[0]:  # training repeats each target batch_mul times, adjacently
            cond = cond.repeat_interleave(x.shape[0] // cond.shape[0], dim=0)
        y = self.time_embed(timestep_embedding(t, self.freq_dim))[:, None] + cond
        x = self.input_proj(x)
        x = run_blocks(self.res_blocks, x, y, checkpointing=self.grad_checkpointing)
        return self.final_layer(x, y)
