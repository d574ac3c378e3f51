"""The inference path of the transformer blocks of models/blocks.py: the same functions as the blocks' `forward`,
for inference only (no autograd, eval mode), with fewer passes over memory. The samplers call the decoder tens of
times per image, so this is where sampling time goes.

- On CPU in fp32 the linear layers go through oneDNN, with the bias (and GELU where it follows) fused into the
  matrix product and the weight kept in oneDNN's blocked layout between calls (`linear`). On x86 this is faster
  than the BLAS path of F.linear (which writes the bias in a separate pass) and the same to fp32 rounding. Used
  only outside autocast and torch.compile (whose CPU backend picks its own kernels); everything else takes
  F.linear. Set ONEDNN_LINEAR to False to compare.
- When all samples share t (sampling) the modulation is folded into the LayerNorm's own weight and bias.
- Residual adds are made in place and fused with the gates (addcmul_).

Each function here restates a block's `forward`: a change to a block is made in both places, and
tests/test_model.py checks every pair against each other in fp32.
"""
import functools
import weakref

import torch
import torch.nn.functional as F

ONEDNN_LINEAR = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                 and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
_packed_weights = weakref.WeakKeyDictionary()  # nn.Linear -> (weight, its storage and version, packed weight)


def heads(x, num_heads):
    """(B, N, C) -> (B, heads, N, C / heads)."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge(x):
    """Inverse of `heads`."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def condition_groups(b, k):
    """Condition sequences of cross-attention keys `k` for `b` latent sequences (each condition's adjacent)."""
    if b % k.shape[0]:
        raise ValueError(f"{b} latent sequences but {k.shape[0]} condition sequences (need a multiple)")
    return k.shape[0]


# Devices on which the inference path is used. It has been checked against the plain path on CPU only; CUDA joins
# when benchmarks/gpu_check.py shows parity and a gain there (its check `fused_vs_plain` compares both).
DEVICES = {"cpu"}


def applies(module, x):
    """Whether `module` runs its inference path now, for input x: no autograd, eval mode, a device in DEVICES."""
    return not torch.is_grad_enabled() and not module.training and x.device.type in DEVICES


def _packed_weight(layer):
    """The layer's weight reordered for oneDNN, redone whenever the weight changes: in-place updates
    (optimizer steps, load_state_dict, copy_ under no_grad) bump its version, replacing it changes its storage.
    Writes through `.data` bypass the version counter: call `clear_packed_weights()` after those."""
    w = layer.weight
    ident = (w.data_ptr(), w._version, w.shape)
    entry = _packed_weights.get(layer)
    if entry is None or entry[0]() is not w or entry[1] != ident:
        entry = (weakref.ref(w), ident, torch.ops.mkldnn._reorder_linear_weight(w.detach()))
        _packed_weights[layer] = entry
    return entry[2]


def clear_packed_weights():
    _packed_weights.clear()


@functools.cache
def _onednn_works():
    """Once per process: do these kernels run here (some builds or CPUs lack them)?"""
    try:
        w = torch.ones(4, 8)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8), torch.ops.mkldnn._reorder_linear_weight(w),
                                               torch.zeros(4), "gelu", [], "none")
        return bool(torch.allclose(y, F.gelu(torch.full((2, 4), 8.0))))
    except RuntimeError:
        return False


def linear(x, layer, gelu=False):
    """layer(x) (an nn.Linear), optionally followed by exact GELU, through the fastest path available."""
    if (ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32 and layer.weight.dtype == x.dtype
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()):
        if _onednn_works():
            return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(layer), layer.bias,
                                                      "gelu" if gelu else "none", [], "none" if gelu else "")
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y) if gelu else y


def modulated_norm(norm, x, shift, scale):
    """norm(x) * (1 + scale) + shift: when the modulation is the same for every sample (shape (1, 1, W), as in
    sampling, where all samples share t) it is folded into the LayerNorm's own weight and bias, so the whole
    thing is one pass over x."""
    c = x.shape[-1]
    if shift.shape[0] == 1:
        weight, bias = 1 + scale, shift
        if norm.weight is not None:
            weight, bias = norm.weight * weight, torch.addcmul(shift, norm.bias, weight)
        return F.layer_norm(x, (c,), weight.reshape(c), bias.reshape(c), norm.eps)
    h = norm(x)
    return h.mul_(1 + scale).add_(shift)


def mlp(m, x):
    """timm's Mlp: fc1 with its GELU fused, fc2."""
    return linear(linear(x, m.fc1, gelu=True), m.fc2)


# ------------------------------------------------------------------ blocks.SelfAttention / CrossAttention
def self_attention(attn, x, attn_mask=None):
    b, n, c = x.shape
    q, k, v = linear(x, attn.qkv).view(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return linear(merge(x), attn.proj)


def cross_attention_kv(attn, c):
    return heads(linear(c, attn.wk), attn.num_heads), heads(linear(c, attn.wv), attn.num_heads)


def cross_attention(attn, x, kv):
    k, v = kv
    b, n, c = x.shape
    q = linear(x, attn.wq).view(condition_groups(b, k), -1, attn.num_heads, c // attn.num_heads).transpose(1, 2)
    x = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
    return linear(merge(x).view(b, n, c), attn.proj)


# ------------------------------------------------------------------ blocks.EncoderBlock / DecoderBlock / FinalLayer,
# and diffdecoder.DecoderNet's use of them
def encoder_block(blk, x, attn_mask=None):
    """EncoderBlock.forward (x itself is not changed)."""
    x = x + self_attention(blk.attn, blk.norm1(x), attn_mask)
    return x.add_(mlp(blk.mlp, blk.norm2(x)))


def decoder_block_(blk, x, t6, kv):
    """DecoderBlock.forward, updating x in place and returning it."""
    shift1, scale1, gate1, shift2, scale2, gate2 = (blk.scale_shift_table + t6).to(x.dtype).chunk(6, dim=1)
    x.addcmul_(self_attention(blk.attn1, modulated_norm(blk.norm1, x, shift1, scale1)), gate1)
    x.add_(cross_attention(blk.attn2, blk.norm2(x), kv))
    return x.addcmul_(mlp(blk.mlp, modulated_norm(blk.norm3, x, shift2, scale2)), gate2)


def final_layer(layer, x, temb):
    shift, scale = (layer.scale_shift_table + temb[:, None]).to(x.dtype).chunk(2, dim=1)
    return linear(modulated_norm(layer.norm_final, x, shift, scale), layer.linear)


def condition_kv(net, c):
    """DecoderNet.condition_kv."""
    c = linear(c, net.cond_embed)
    return [cross_attention_kv(blk.attn2, c) for blk in net.res_blocks]


def decoder(net, x, t6, temb, cond_kv):
    """DecoderNet.forward after the time embedding: input projection, blocks, final layer."""
    x, pos = linear(x, net.input_proj), net.diffusion_pos_embed_learned
    x = x.add_(pos) if x.dtype == pos.dtype else x + pos  # under autocast: promote to fp32
    for blk, kv in zip(net.res_blocks, cond_kv):
        x = decoder_block_(blk, x, t6, kv)
    return final_layer(net.final_layer, x, temb)
