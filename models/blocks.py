"""Transformer blocks of TransDiff: the AR encoder block and the diffusion decoder's blocks.

Module and parameter names follow the released checkpoints (see tests/fixtures/official_state_dicts.json).
All attention goes through scaled_dot_product_attention. Each `forward` here is the plain path (training, any
call with autograd, any device outside fused.DEVICES); without autograd in eval mode on CPU the blocks run
models/fused.py, which restates each `forward` with fewer passes over memory: a change to a block is made in
both files (tests/test_model.py checks every pair against each other).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from torch.utils.checkpoint import checkpoint

from models import fused
from models.fused import heads, merge

# Training on CPU: torch's dropout draws a float Bernoulli per element (with SDPA's unfused math path that
# dropout needs, the largest non-matmul cost of a CPU training step, ~18% of it at width 256) and rescales in a
# second pass. Here the keep mask comes from 16 random bits per element (the drop probability rounded to a
# multiple of 2^-16, the rescaling matched to the rounded value so the expectation is kept exactly) and the
# rescaling is folded into a small neighbour (the following linear layer's weight, or the attention output),
# so each dropout is one `where` pass. Same distribution as nn.Dropout (up to that rounding), other draws; used
# only on CPU outside autocast and torch.compile. Set FAST_DROPOUT to False to compare.
FAST_DROPOUT = True
_MASK_BITS = 16


def _fast_dropout(x, p):
    return (FAST_DROPOUT and 0.0 < p < 1.0 and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def keep_mask(shape, p, device):
    """(boolean keep mask of `shape`, the rescaling 1 / keep probability) for dropout probability p."""
    n = math.prod(shape)
    bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=device).random_(-2 ** 31, 2 ** 31)
    drop = round(p * 2 ** _MASK_BITS)
    keep = bits.view(torch.int16)[:n].view(shape) >= drop - 2 ** (_MASK_BITS - 1)
    return keep, 2 ** _MASK_BITS / (2 ** _MASK_BITS - drop)


def linear_dropout(x, layer, p):
    """dropout(layer(x), p) (p = 0: no dropout)."""
    if p == 0.0:
        return F.linear(x, layer.weight, layer.bias)
    if not _fast_dropout(x, p):
        return F.dropout(F.linear(x, layer.weight, layer.bias), p, True)
    keep, scale = keep_mask((*x.shape[:-1], layer.out_features), p, x.device)
    bias = layer.bias * scale if layer.bias is not None else None
    return torch.where(keep, F.linear(x, layer.weight * scale, bias), 0.0)


def mlp_forward(mlp, x):
    """timm's Mlp (fc1, GELU, dropout, fc2, dropout; no norm) with `linear_dropout`'s dropouts in training."""
    p1, p2 = (mlp.drop1.p, mlp.drop2.p) if mlp.training else (0.0, 0.0)
    if not (_fast_dropout(x, p1) or _fast_dropout(x, p2)):
        return mlp(x)
    h = F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias))
    if p1 > 0.0:
        keep, scale = keep_mask(h.shape, p1, h.device)
        h = torch.where(keep, h, 0.0)
        return linear_dropout(h, _ScaledLinear(mlp.fc2, scale), p2)
    return linear_dropout(h, mlp.fc2, p2)


class _ScaledLinear:
    """The weight of `layer` times `scale`, its bias unchanged: fc2(dropout(h)) = scaled fc2 of the masked h."""

    def __init__(self, layer, scale):
        self.weight, self.bias, self.out_features = layer.weight * scale, layer.bias, layer.out_features


def attention(q, k, v, attn_mask=None, dropout_p=0.0):
    """scaled_dot_product_attention; with dropout on CPU, the same math with `keep_mask`'s dropout."""
    if attn_mask is not None or not _fast_dropout(q, dropout_p):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    weights = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    keep, scale = keep_mask(weights.shape, dropout_p, q.device)
    return (torch.where(keep, weights, 0.0) @ v) * scale


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
        x = attention(q, k, v, attn_mask, self.attn_drop if self.training else 0.0)
        return linear_dropout(merge(x), self.proj, self.proj_drop.p if self.training else 0.0)


class CrossAttention(nn.Module):
    """Queries from the latent tokens, keys/values from the condition tokens.

    `kv(c)` is split out so a sampler can compute the keys and values of fixed conditions once per image
    instead of once per step. x may hold m latent sequences per condition sequence (B*m vs B), each
    condition's m sequences adjacent (training with `diffusion_batch_mul` m): they attend to the same keys
    and values as one query sequence m times longer, so the keys and values are never repeated.
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
        return heads(self.wk(c), self.num_heads), heads(self.wv(c), self.num_heads)

    def forward(self, x, kv):
        k, v = kv
        b, n, c = x.shape
        q = self.wq(x).view(fused.condition_groups(b, k), -1, self.num_heads, c // self.num_heads).transpose(1, 2)
        x = attention(q, k.to(q.dtype), v.to(q.dtype), dropout_p=self.attn_drop if self.training else 0.0)
        return linear_dropout(merge(x).view(b, n, c), self.proj, self.proj_drop.p if self.training else 0.0)


class EncoderBlock(nn.Module):
    """Pre-norm ViT block of the AR encoder."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_eps=1e-6, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def forward(self, x, attn_mask=None):
        if fused.applies(self, x):  # dispatched here, so that torch.compile of the block covers both paths
            return fused.encoder_block(self, x, attn_mask)
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + mlp_forward(self.mlp, self.norm2(x))


def run_blocks(blocks, x, *args, checkpointing=False):
    """x through each block in turn (block(x, *args)); with autograd and `checkpointing`, recomputing each
    block's activations in the backward pass instead of keeping them."""
    for blk in blocks:
        x = checkpoint(blk, x, *args, use_reentrant=False) if checkpointing and torch.is_grad_enabled() \
            else blk(x, *args)
    return x


def modulate(x, shift, scale):
    """x * (1 + scale) + shift in one fused op."""
    return torch.addcmul(shift, x, 1 + scale)


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
        """x (B, L, W); t6 (B or 1, 6, W) time projection; kv the cross-attention keys/values."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table + t6).to(x.dtype).chunk(6, dim=1)
        x = torch.addcmul(x, gate1, self.attn1(modulate(self.norm1(x), shift1, scale1)))
        x = x + self.attn2(self.norm2(x), kv)
        return torch.addcmul(x, gate2, mlp_forward(self.mlp, modulate(self.norm3(x), shift2, scale2)))


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
