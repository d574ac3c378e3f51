"""Peak memory and FLOPs of a TransDiff training step and of sampling with CFG, predicted from fake tensors.

    python benchmarks/memory_model.py --model transdiff_large --batch_size 32 --batch_mul 4 --dtype bf16
    python benchmarks/memory_model.py --model transdiff_large --sampling --batch_size 256 --dtype bf16
    python benchmarks/memory_model.py --table --out benchmarks/results/memory_model_table.json

The model, its EMA and its AdamW are built under FakeTensorMode (shapes and dtypes, no data), and the step runs
as training runs it: autocast forward, backward, gradient clipping, AdamW, EMA update; then once more, so the
optimizer state exists as it does at every later step. `LiveBytes`, a dispatch mode, follows every storage the
ops create until its last tensor dies (so what autograd saves for the backward stays counted until the backward
frees it), and reports the peak of the second step. `saved_tensors_hooks` tallies the saved activations apart.

For a CUDA prediction (`--target cuda`, the default) the trace takes the GPU's paths: attention as the flash and
memory-efficient kernels keep it (q, k, v, output and the fp32 log-sum-exp, never the attention matrix; dropout
regenerated from a seed), the plain block path (models/fused.py is CPU-only), torch's own dropout (a bool mask
per element). Not counted: the CUDA context and cuBLAS workspaces (outside torch's allocator statistics) and the
caching allocator's rounding and fragmentation (what `max_memory_reserved` adds over `max_memory_allocated`).
`--target cpu` traces the CPU's own paths instead; tests/test_memory_model.py checks that against the peaks the
CPU allocator reports for real runs of small models.

FLOPs come from torch.utils.flop_counter.FlopCounterMode on the same fake run (matrix products and attention;
elementwise work is not counted, as is usual for model FLOPs), per image: a training image is one image with its
`batch_mul` noise draws, forward and backward; a sampled image is the encoder pass and `steps` decoder passes at
twice the batch (CFG). The last stdout line is JSON with `peak_gib`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import weakref

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch._C._profiler import _EventType  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.optim import adam  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from models import blocks, fused, transdiff  # noqa: E402
from models.transdiff import MODEL_SIZES, build_model  # noqa: E402
from util.amp import DTYPES, autocast  # noqa: E402
from util.optim import EMA, build_adamw  # noqa: E402

GIB = 2 ** 30
# bf16 dense peaks (TFLOP/s, no sparsity) from the vendors' data sheets: the limit speed figures are held against
PEAK_TFLOPS = {"A100": 312.0, "H100 SXM": 989.0, "H200": 989.0}
TABLE_DTYPES = ("bf16", "fp16", "fp32")
CUDA_TARGET_DEFAULT = "cuda"


class LiveBytes(TorchDispatchMode):
    """Bytes of live storages created by the ops run under it (views and in-place results count once); `peak`
    since the last `reset_peak`. A storage dies with its last tensor (weakref on each tensor)."""

    def __init__(self):
        super().__init__()
        self.refs, self.size, self.now, self.peak = {}, {}, 0, 0

    def reset_peak(self):
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def track(self, t):
        key = t.untyped_storage()._cdata
        if key not in self.refs:
            self.refs[key], self.size[key] = 0, t.untyped_storage().nbytes()
            self.now += self.size[key]
            self.peak = max(self.peak, self.now)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            self.now -= self.size.pop(key)
            del self.refs[key]


class _FlashLikeAttention(torch.autograd.Function):
    """What the CUDA flash / memory-efficient kernels allocate and keep: the output and an fp32 log-sum-exp per
    query; saved: q, k, v, output, log-sum-exp. Values are not computed (fake tensors carry none)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _cuda_attention(q, k, v, attn_mask=None, dropout_p=0.0):
    return _FlashLikeAttention.apply(q, k.to(q.dtype), v.to(q.dtype))


@contextlib.contextmanager
def target_paths(target):
    """The code paths of `target` ('cuda' or 'cpu') while tracing on CPU fake tensors."""
    if target == "cpu":
        yield
        return
    saved = blocks.attention, blocks.FAST_DROPOUT, set(fused.DEVICES)
    blocks.attention, blocks.FAST_DROPOUT = _cuda_attention, False
    fused.DEVICES.clear()
    try:
        yield
    finally:
        blocks.attention, blocks.FAST_DROPOUT = saved[:2]
        fused.DEVICES.update(saved[2])


@contextlib.contextmanager
def fake_mode():
    """FakeTensorMode, with what reads values off (the model's label check, AdamW's step count) and oneDNN's
    linear layers (no fake kernels) off."""
    check, step_value = transdiff.check_label_range, adam._get_value
    transdiff.check_label_range = lambda labels, class_num: None
    adam._get_value = lambda step: 1
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), without_onednn():
            yield
    finally:
        transdiff.check_label_range, adam._get_value = check, step_value


@contextlib.contextmanager
def without_onednn():
    """models/fused.py's linear layers through F.linear: also in the CPU runs measured against the fake ones
    (oneDNN keeps a packed copy of each weight, CPU-only memory that the fake trace cannot follow)."""
    saved, fused.ONEDNN_LINEAR = fused.ONEDNN_LINEAR, False
    try:
        yield
    finally:
        fused.ONEDNN_LINEAR = saved


def _training_inputs(model, batch, device="cpu"):
    lead = (batch, model.mrar_images) if model.mrar else (batch,)
    return (torch.randn(*lead, model.vae_embed_dim, model.grid, model.grid, device=device),
            torch.randint(0, model.class_num, (batch,), device=device))


def training_step(model, ema, optimizer, latents, labels, dtype, grad_clip=3.0):
    """The training step of engine_transdiff.train_step on one process, without loss scaling and the
    finiteness all-reduce (neither allocates more than a few scalars)."""
    with autocast(latents.device, dtype):
        loss = model(latents, labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.update(model)
    return loss


def build_training(name, config):
    """Model, EMA and AdamW with what engine_transdiff.set_trainable freezes frozen (`only_train_diff`: the
    encoder side, which then has neither gradients nor optimizer state)."""
    only_diff = config.get("only_train_diff", False)
    model = build_model(name, **{k: v for k, v in config.items() if k != "only_train_diff"}).train()
    excluded = set()
    for n, p in model.named_parameters():
        if (only_diff and not n.startswith("diffdecoder.")) or (n.startswith("z_proj.") and not model.mrar):
            p.requires_grad_(False)
            excluded.update([n] if only_diff and not n.startswith("z_proj.") else [])
    return model, EMA(model, 0.9999), build_adamw(model, 1e-4, 0.02, excluded)


def _optimizer_as_on(optimizer, target):
    # torch's default AdamW on CUDA is the foreach one (whose temporaries are lists as large as the parameters)
    for group in optimizer.param_groups:
        group["foreach"] = target == "cuda"


def predict_training(name, batch, dtype=None, target=CUDA_TARGET_DEFAULT, **config):
    """Peak bytes of a training step (the second: optimizer state allocated), with its parts."""
    tracker, saved = LiveBytes(), {}

    def pack(t):
        saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with fake_mode(), tracker, target_paths(target):
        model, ema, optimizer = build_training(name, config)
        _optimizer_as_on(optimizer, target)
        params = tracker.now
        latents, labels = _training_inputs(model, batch)
        training_step(model, ema, optimizer, latents, labels, dtype)
        state = tracker.now
        tracker.reset_peak()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            training_step(model, ema, optimizer, latents, labels, dtype)
    return {"peak_bytes": tracker.peak, "weights_ema_bytes": params, "steady_state_bytes": state,
            "saved_activation_bytes": sum(saved.values())}


def predict_sampling(name, batch, steps=2, dtype=None, target=CUDA_TARGET_DEFAULT, cfg=1.5, **config):
    """Peak bytes of sampling a batch with CFG (weights in the compute device, no EMA or optimizer)."""
    tracker = LiveBytes()
    labels = torch.arange(batch) % config.get("class_num", 1000)
    with fake_mode(), tracker, target_paths(target):
        model = build_model(name, **config).eval()
        weights = tracker.now
        tracker.reset_peak()
        with autocast("cpu", dtype):
            model.samples(labels, steps, cfg=cfg)
    return {"peak_bytes": tracker.peak, "weights_bytes": weights}


def count_flops(fn):
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):  # attention as matrix products, which the counter sees
        fn()
    return counter.get_total_flops()


def training_flops_per_image(name, batch=2, **config):
    with fake_mode(), target_paths("cuda"):
        model = build_model(name, **config).train()
        latents, labels = _training_inputs(model, batch)
        return count_flops(lambda: model(latents, labels).backward()) / batch


def sampling_flops_per_image(name, steps, batch=2, cfg=1.5, **config):
    """Encoder pass + `steps` decoder passes per image, from two fake runs (2 and 3 steps) that separate the
    per-step cost from the fixed one."""
    labels = torch.arange(batch) % config.get("class_num", 1000)
    with fake_mode(), target_paths("cuda"):
        model = build_model(name, **config).eval()
        two, three = (count_flops(lambda n=n: model.samples(labels, n, cfg=cfg)) for n in (2, 3))
    return (two + (steps - 2) * (three - two)) / batch


def ideal_seconds(flops):
    return {gpu: flops / (tf * 1e12) for gpu, tf in PEAK_TFLOPS.items()}


# ------------------------------------------------------------------ measured on CPU, for validation
def measured_cpu_peak(fn):
    """Peak bytes the CPU allocator reports while fn() runs, above what was allocated before (the profiler's
    allocation and free events, summed in order)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    events = [n for n in walk(prof.profiler.kineto_results.experimental_event_tree()) if n.tag == _EventType.Allocation]
    now = peak = 0
    for n in sorted(events, key=lambda n: n.start_time_ns):
        now += n.extra_fields.alloc_size
        peak = max(peak, now)
    return peak


def _live_storage_bytes(tensors):
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure_training_cpu(name, batch, dtype=None, seed=0, **config):
    """Real CPU run of the same step: the state after one step (weights, EMA, AdamW; counted from the objects)
    plus the allocator's peak above it during the second."""
    torch.manual_seed(seed)
    model, ema, optimizer = build_training(name, config)
    latents, labels = _training_inputs(model, batch)
    training_step(model, ema, optimizer, latents, labels, dtype)
    state = [*model.parameters(), *model.buffers(), *ema.shadow,
             *(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))]
    base = _live_storage_bytes(state)
    return base + measured_cpu_peak(lambda: training_step(model, ema, optimizer, latents, labels, dtype))


def measure_sampling_cpu(name, batch, steps=2, dtype=None, cfg=1.5, **config):
    model = build_model(name, **config).eval()
    labels = torch.arange(batch) % config.get("class_num", 1000)

    def run():
        with autocast("cpu", dtype), without_onednn():
            model.samples(labels, steps, cfg=cfg)

    return _live_storage_bytes([*model.parameters(), *model.buffers()]) + measured_cpu_peak(run)


# ------------------------------------------------------------------ the command line
# (name, per-GPU batch, training config, dtypes) of the published commands (README "Training"); 1-Step at 256 px
# in every precision (fp16 is the default on CUDA, --bf16 the other), MRAR and 512 px as published (bf16)
PUBLISHED_RUNS = [
    *((name, 32, dict(img_size=256, diffusion_batch_mul=4), TABLE_DTYPES)
      for name in ("transdiff_base", "transdiff_large", "transdiff_huge")),
    ("transdiff_large", 16, dict(img_size=256, diffusion_batch_mul=2, mrar=True), ("bf16",)),
    ("transdiff_large", 16, dict(img_size=512, diffusion_batch_mul=4, only_train_diff=True), ("bf16",)),
]


def table(runs=PUBLISHED_RUNS, sampling_batch=256, steps=100):
    rows = []

    def add(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name, batch, config, dtypes in runs:
        what = {"model": name, "batch": batch, **config}
        for dtype in dtypes:
            for ckpt in (False, True):
                t0 = time.time()
                r = predict_training(name, batch, DTYPES[dtype], grad_checkpointing=ckpt, **config)
                add({"what": "train", **what, "dtype": dtype, "grad_checkpointing": ckpt,
                     **{k.replace("_bytes", "_gib"): v / GIB for k, v in r.items()}, "trace_s": time.time() - t0})
        if config.get("only_train_diff"):
            continue
        sample_config = {k: v for k, v in config.items() if k in ("img_size", "mrar")}
        r = predict_sampling(name, sampling_batch, dtype=torch.bfloat16, **sample_config)
        add({"what": "sample_cfg", "model": name, "batch": sampling_batch, "dtype": "bf16", **sample_config,
             **{k.replace("_bytes", "_gib"): v / GIB for k, v in r.items()}})
        train_f = training_flops_per_image(name, **{k: v for k, v in config.items() if k != "only_train_diff"})
        sample_f = sampling_flops_per_image(name, steps, **sample_config)
        add({"what": "flops_per_image", **what, "train_tflop": train_f / 1e12, "sample_tflop": sample_f / 1e12,
             "sampling_steps": steps,
             "ideal_train_images_per_s": {g: 1 / s for g, s in ideal_seconds(train_f).items()},
             "ideal_sample_ms_per_image": {g: 1e3 * s for g, s in ideal_seconds(sample_f).items()}})
    return rows


# a small model whose real CPU runs the predictions are checked against (tests/test_memory_model.py, --validate)
VALIDATION = dict(img_size=64, class_num=10, encoder_embed_dim=128, encoder_depth=1, encoder_num_heads=4,
                  decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, buffer_size=16, diffusion_batch_mul=2)


def validate(batch=8):
    """Predicted (CPU paths) against measured (CPU allocator) peaks of the VALIDATION model."""
    rows = []
    for what, ckpt, dtype in (("train", False, "fp32"), ("train", True, "fp32"), ("train", False, "bf16"),
                              ("sample_cfg", False, "fp32")):
        config = dict(VALIDATION, grad_checkpointing=ckpt)
        if what == "train":
            predicted = predict_training("transdiff_tiny", batch, DTYPES[dtype], "cpu", **config)["peak_bytes"]
            measured = measure_training_cpu("transdiff_tiny", batch, DTYPES[dtype], **config)
        else:
            predicted = predict_sampling("transdiff_tiny", batch, target="cpu", **config)["peak_bytes"]
            measured = measure_sampling_cpu("transdiff_tiny", batch, **config)
        rows.append({"what": what, "dtype": dtype, "grad_checkpointing": ckpt, "batch": batch,
                     "predicted_mib": predicted / 2 ** 20, "measured_mib": measured / 2 ** 20,
                     "relative_error": predicted / measured - 1, "peak_gib": predicted / GIB})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="transdiff_large", choices=list(MODEL_SIZES))
    p.add_argument("--img_size", type=int, default=256)
    p.add_argument("--class_num", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=32, help="per GPU (sampling: images, doubled by CFG)")
    p.add_argument("--batch_mul", type=int, default=4, help="diffusion_batch_mul")
    p.add_argument("--dtype", default="bf16", choices=list(TABLE_DTYPES))
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--mrar", action="store_true")
    p.add_argument("--sampling", action="store_true", help="sampling with CFG instead of a training step")
    p.add_argument("--steps", type=int, default=100, help="sampling steps (for the FLOPs)")
    p.add_argument("--target", default=CUDA_TARGET_DEFAULT, choices=["cuda", "cpu"], help="whose code paths")
    p.add_argument("--flops", action="store_true", help="also count FLOPs per image and the ideal times")
    p.add_argument("--table", action="store_true", help="the README table: B/L/H at the published batches")
    p.add_argument("--validate", action="store_true", help="predicted against measured peaks of small CPU runs")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.set_defaults(overrides={})
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.table or args.validate:
        result = {"rows": table() if args.table else validate()}
        result["peak_gib"] = max(r["peak_gib"] for r in result["rows"] if "peak_gib" in r)
    else:
        config = dict(img_size=args.img_size, class_num=args.class_num, mrar=args.mrar)
        dtype = DTYPES[args.dtype]
        if args.sampling:
            r = predict_sampling(args.model, args.batch_size, dtype=dtype, target=args.target, **config)
        else:
            r = predict_training(args.model, args.batch_size, dtype, args.target, diffusion_batch_mul=args.batch_mul,
                                 grad_checkpointing=args.grad_checkpointing, **config)
        result = {"config": {k: v for k, v in vars(args).items() if k != "overrides"},
                  **{k.replace("_bytes", "_gib"): v / GIB for k, v in r.items()}}
        if args.flops:
            f = (sampling_flops_per_image(args.model, args.steps, **config) if args.sampling else
                 training_flops_per_image(args.model, diffusion_batch_mul=args.batch_mul, **config))
            result.update(tflop_per_image=f / 1e12, ideal_seconds_per_image=ideal_seconds(f))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
