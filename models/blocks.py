"""Transformer blocks of TransDiff: the AR encoder block and the diffusion decoder's blocks.

Module and parameter names follow the released checkpoints (see tests/fixtures/official_state_dicts.json).
All attention goes through scaled_dot_product_attention.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp


def _heads(x, num_heads):
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge(x):
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, attn_mask=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(_merge(x)))


class CrossAttention(nn.Module):
    """Queries from the latent tokens, keys/values from the condition tokens.

    `kv(c)` is split out so a sampler can compute the keys and values of fixed conditions once per image
    instead of once per step.
    """

    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def kv(self, c):
        return _heads(self.wk(c), self.num_heads), _heads(self.wv(c), self.num_heads)

    def forward(self, x, kv):
        k, v = kv
        q = _heads(self.wq(x), self.num_heads)
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"{q.shape[0]} latent sequences but {k.shape[0]} condition sequences")
        x = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype),
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(_merge(x)))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block of the AR encoder."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_eps=1e-6, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DecoderBlock(nn.Module):
    """Diffusion decoder block: modulated self-attention, plain cross-attention, modulated MLP.

    The six modulation vectors (shift/scale/gate for attention, then for the MLP) are the shared time
    projection plus this block's own `scale_shift_table`.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_eps=1e-6, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / math.sqrt(dim))
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = SelfAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn2 = CrossAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def forward(self, x, t6, kv):
        """x (B, L, W); t6 (B, 6, W) time projection; kv the cross-attention keys/values."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table + t6).to(x.dtype).chunk(6, dim=1)
        x = x + gate1 * self.attn1(modulate(self.norm1(x), shift1, scale1))
        x = x + self.attn2(self.norm2(x), kv)
        return x + gate2 * self.mlp(modulate(self.norm3(x), shift2, scale2))


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding, cosine half first, no frequency shift; computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeEmbedding(nn.Module):
    """t -> (temb (B, W), time projection (B, 6, W)) in the compute dtype chosen by autocast, not a fixed one."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TimestepEmbedder(freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)

    def forward(self, t):
        temb = self.time_embedder(timestep_embedding(t, self.freq_dim))
        return temb, self.time_proj(F.silu(temb)).unflatten(1, (6, -1))


class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim, norm_eps=1e-6):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / math.sqrt(dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, temb):
        shift, scale = (self.scale_shift_table + temb[:, None]).to(x.dtype).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
