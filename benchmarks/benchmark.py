"""Speed benchmark of TransDiff sampling and training: what users wait for.

Measures, for any registered model size (with optional depth/width overrides), batch, number of steps, cfg,
dtype and device:
  - decoder sampling (the part users feel: ~99% of generation time): images/s, ms/image, the analytic FLOPs of
    the decoder evaluations per image, the FLOP/s achieved, and that as a fraction of (a) a plain matrix product
    of the decoder's dominant shape ((batch*tokens) x W by W x W, timed here the same way on the same device and
    dtype) and (b) a peak FLOP/s given with --peak_tflops;
  - optionally the same sampling without the per-image cache of the cross-attention keys/values (--compare_cache),
    and end-to-end `model.samples` (encoder + decoder, --full);
  - training (--train): forward + backward + AdamW step on random latents, images/s.
Warm-up runs are excluded; every figure is the median over --repeats timed runs. Results are printed and written
as JSON (--out).

Examples (repository root; benchmarks/README.md has the measured figures and the GPU commands):
  # CPU, fp32, transdiff_base-width decoder layers (depth reduced for run time)
  python benchmarks/benchmark.py --model transdiff_base --decoder_depth 2 --encoder_depth 1 --batch 4 \
      --steps 20 --cfg 1.3 --repeats 5 --compare_cache --out bench_cpu.json
  # H100/H200, bf16, TransDiff-L as evaluated (batch 256, 100 steps, cfg 1.3)
  python benchmarks/benchmark.py --model transdiff_large --device cuda --dtype bf16 --batch 256 --steps 100 \
      --cfg 1.3 --scale_0 0.89 --scale_1 0.95 --peak_tflops 989 --compare_cache --full --out L_sample.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from models import fused  # noqa: E402
from models.diffdecoder import DecoderNet  # noqa: E402
from models.transdiff import MODEL_SIZES, build_model  # noqa: E402
from util.amp import autocast  # noqa: E402
from util.cli import HelpFormatter  # noqa: E402
from util.precision import set_tf32  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------- FLOPs
def decoder_flops(net: DecoderNet, num_conditions: int) -> dict:
    """Analytic FLOPs (2*m*n*k per matmul) of one decoder evaluation of ONE sequence, and of the
    cross-attention keys/values of one sequence of conditions (computed once per image, not per step).

    Counted: input_proj, time MLP (linear_1, linear_2, time_proj), per block self-attention qkv and proj,
    attention scores and values (2*2*L^2*W), cross-attention wq and proj, cross attention (2*2*L*N*W), MLP,
    and the final linear layer. Not counted: norms, modulation, softmax, activations, sampler arithmetic
    (elementwise work, which the efficiency target treats as overhead)."""
    L, c_in = net.seq_len, net.token_dim
    W = net.input_proj.out_features
    blk = net.res_blocks[0]
    hidden = blk.mlp.fc1.out_features
    freq = net.time_embed.freq_dim
    depth = len(net.res_blocks)
    N = num_conditions
    per_block = {
        "self_attn_qkv": 2 * L * W * 3 * W,
        "self_attn_proj": 2 * L * W * W,
        "self_attn_sdpa": 2 * 2 * L * L * W,
        "cross_attn_q": 2 * L * W * W,
        "cross_attn_sdpa": 2 * 2 * L * N * W,
        "cross_attn_proj": 2 * L * W * W,
        "mlp": 2 * 2 * L * W * hidden,
    }
    per_eval = {
        "input_proj": 2 * L * c_in * W,
        "time_mlp": 2 * freq * W + 2 * W * W + 2 * W * 6 * W,
        "blocks": depth * sum(per_block.values()),
        "final_layer": 2 * L * W * c_in,
    }
    cond_dim = net.cond_embed.in_features
    kv = {"cond_embed": 2 * N * cond_dim * W, "cross_attn_kv": depth * 2 * (2 * N * W * W)}
    return {
        "per_sequence_evaluation": sum(per_eval.values()),
        "per_sequence_evaluation_breakdown": per_eval,
        "per_block_breakdown": per_block,
        "condition_kv_per_sequence": sum(kv.values()),
        "condition_kv_breakdown": kv,
        "dominant_matmul_fraction": depth * (28 * L * W * W) / sum(per_eval.values()) if hidden == 4 * W else None,
    }


# ---------------------------------------------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    """Seconds of one fn() on `device`, its queued work included."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def time_fn(fn, device, warmup, repeats, between=None):
    """Median (and all) wall times in seconds of fn(), warm-up runs excluded; `between()` (untimed here) runs
    after each timed run (the interleaved reference)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        times.append(_timed(fn, device))
        if between is not None:
            between()
    return statistics.median(times), times


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # process peak resident set size (Linux: KiB), a whole-process upper bound on CPU
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _autocast(device, dtype):
    return autocast(device, None if dtype == torch.float32 else dtype)  # fp32 here means no autocast


class MatmulReference:
    """A plain (m x w) @ (w x w) matrix product in `dtype`: torch.mm (the BLAS the device uses: MKL on x86
    CPUs, cuBLAS on GPUs) and, on CPU, the same product through oneDNN (the library the decoder's linear
    layers use on CPU in fp32). Each timed run repeats the product enough times to last `min_seconds`; runs are
    interleaved with the model's timed runs so that both see the same machine load."""

    def __init__(self, m, w, device, dtype, min_seconds=0.5):
        self.m, self.w, self.device = m, w, device
        self.a = torch.randn(m, w, device=device, dtype=dtype)
        self.b = torch.randn(w, w, device=device, dtype=dtype)
        self.bt = self.b.t().contiguous()  # oneDNN takes the (out, in) weight layout of nn.Linear
        self.out = torch.empty(m, w, device=device, dtype=dtype)
        self.kinds = {"torch_mm": lambda: torch.mm(self.a, self.b, out=self.out)}
        if device.type == "cpu" and dtype == torch.float32 and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            self.kinds["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(self.a, self.bt, None, "none", [], "")
        self.reps, self.times = {}, {k: [] for k in self.kinds}
        for kind, fn in self.kinds.items():
            fn()
            self.reps[kind] = max(1, math.ceil(min_seconds / max(_timed(fn, device), 1e-7)))

    def run(self):
        for kind, fn in self.kinds.items():
            _sync(self.device)
            t0 = time.perf_counter()
            for _ in range(self.reps[kind]):
                fn()
            _sync(self.device)
            self.times[kind].append(time.perf_counter() - t0)

    def result(self):
        flops = 2 * self.m * self.w * self.w
        out = {"shape": [self.m, self.w, self.w], "flops_per_matmul": flops}
        for kind in self.kinds:
            med = statistics.median(self.times[kind])
            out[kind] = {"matmuls_per_run": self.reps[kind], "seconds_per_matmul": med / self.reps[kind],
                         "flops_per_s": flops * self.reps[kind] / med,
                         "runs_flops_per_s": [flops * self.reps[kind] / t for t in self.times[kind]]}
        out["flops_per_s"] = out["torch_mm"]["flops_per_s"]
        out["best_flops_per_s"] = max(out[k]["flops_per_s"] for k in self.kinds)
        return out


# ---------------------------------------------------------------------------------------------------- model
def make_model(args, device):
    overrides = {"img_size": args.img_size, "class_num": args.class_num}
    for key in ("encoder_depth", "decoder_depth", "decoder_embed_dim"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.decoder_heads is not None:
        overrides["decoder_num_heads"] = args.decoder_heads
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = build_model(args.model, grad_checkpointing=args.grad_checkpointing,
                            diffusion_batch_mul=args.batch_mul, **overrides)
    # the released decoder initialises its output layer to zero; give it weights so the work is not trivial
    with torch.no_grad():
        torch.nn.init.normal_(model.diffdecoder.net.final_layer.linear.weight, std=0.02)
    return model


def bench_sampling(args, model, device, dtype):
    net = model.diffdecoder.net
    guided = args.cfg != 1.0
    seqs = args.batch * (2 if guided else 1)
    gen = torch.Generator(device).manual_seed(args.seed)
    labels = torch.randint(0, args.class_num, (args.batch,), device=device, generator=gen)
    noise = torch.randn(args.batch, model.seq_len, model.token_embed_dim, device=device, generator=gen)
    if args.per_sample_generators:
        gen = [torch.Generator(device).manual_seed(args.seed + i) for i in range(args.batch)]
    model.eval()
    with torch.no_grad(), _autocast(device, dtype):
        cls = model.class_emb(labels)
        if guided:
            cls = torch.cat([cls, model.fake_latent.expand(args.batch, -1)])
        cond = model.forward_encoder(cls)
    flops = decoder_flops(net, cond.shape[1])
    evals_per_image = args.steps * (2 if guided else 1)  # sequences evaluated per image
    eval_flops_img = evals_per_image * flops["per_sequence_evaluation"]
    kv_flops_img = (2 if guided else 1) * flops["condition_kv_per_sequence"]
    sample_kw = dict(num_steps=args.steps, cfg=args.cfg, scale_0=args.scale_0, scale_1=args.scale_1)
    ref = MatmulReference(seqs * net.seq_len, net.input_proj.out_features, device,
                          torch.float32 if dtype == torch.float32 else dtype, args.matmul_seconds)

    def decoder_run(cache_kv):
        def run():
            with torch.no_grad(), _autocast(device, dtype):
                model.diffdecoder.sample(cond, noise, generator=gen, cache_kv=cache_kv, **sample_kw)
        return run

    result = {"what": "DiffDecoder.sample on encoder conditions: condition K/V once per image + all steps",
              "flops": flops, "sequences_per_evaluation": seqs, "evaluations_per_image": evals_per_image,
              "decoder_evaluation_flops_per_image": eval_flops_img, "condition_kv_flops_per_image": kv_flops_img,
              "flops_note": "evaluation_flops_per_s counts the decoder evaluations only (the conditions' K/V "
                            "are timed but not counted); evaluation_plus_kv_flops_per_s counts both"}
    variants = [("decoder", True)] + ([("decoder_no_kv_cache", False)] if args.compare_cache else [])
    for i, (name, cache) in enumerate(variants):
        _reset_peak(device)
        t0 = time.perf_counter()
        decoder_run(cache)()  # first call, includes compilation under --compile
        first = time.perf_counter() - t0
        med, times = time_fn(decoder_run(cache), device, max(args.warmup - 1, 0), args.repeats,
                             between=ref.run if i == 0 else None)
        # the K/V of the conditions are counted only once per image, also when recomputed every step
        achieved = eval_flops_img * args.batch / med
        result[name] = {
            "seconds_per_batch": med, "runs_seconds": times, "first_call_seconds": first,
            "images_per_s": args.batch / med, "ms_per_image": 1e3 * med / args.batch,
            "evaluation_flops_per_s": achieved,
            "evaluation_plus_kv_flops_per_s": (eval_flops_img + kv_flops_img) * args.batch / med,
            "peak_memory_mib": _peak_mib(device),
        }
    r = ref.result()
    result["matmul_reference"] = r
    for name, _ in variants:
        res = result[name]
        res["fraction_of_matmul"] = res["evaluation_flops_per_s"] / r["flops_per_s"]
        res["fraction_of_best_matmul"] = res["evaluation_flops_per_s"] / r["best_flops_per_s"]
        # ratio per interleaved run pair (sampling run i, reference run i after it)
        res["fraction_of_matmul_runs"] = [eval_flops_img * args.batch / t / f
                                          for t, f in zip(res["runs_seconds"], r["torch_mm"]["runs_flops_per_s"])]
        if args.peak_tflops:
            res["fraction_of_peak"] = res["evaluation_flops_per_s"] / (args.peak_tflops * 1e12)
    if args.peak_tflops:
        r["fraction_of_peak"] = r["flops_per_s"] / (args.peak_tflops * 1e12)
    if args.compare_cache:
        result["kv_cache_speedup"] = result["decoder_no_kv_cache"]["seconds_per_batch"] / result["decoder"][
            "seconds_per_batch"]
    if args.full:
        def full():
            with torch.no_grad(), _autocast(device, dtype):
                model.samples(labels, num_sampling_steps=args.steps, cfg=args.cfg, scale_0=args.scale_0,
                              scale_1=args.scale_1, generator=gen)
        _reset_peak(device)
        med, times = time_fn(full, device, args.warmup, args.repeats)
        result["full_model"] = {"what": "model.samples: encoder + decoder, from labels to latents (no VAE decode)",
                                "seconds_per_batch": med, "runs_seconds": times, "images_per_s": args.batch / med,
                                "ms_per_image": 1e3 * med / args.batch, "peak_memory_mib": _peak_mib(device)}
    return result


def bench_training(args, model, device, dtype):
    """Forward + backward + AdamW step of the whole model (encoder and decoder) on random latents and labels,
    with the released optimizer settings (grad clip 3.0); no data loading."""
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.startswith("diffdecoder")]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and not n.startswith("diffdecoder"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.02}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95))
    b = args.train_batch
    gen = torch.Generator(device).manual_seed(args.seed + 1)
    shape = (b, model.mrar_images) if model.mrar else (b,)
    latents = torch.randn(*shape, model.vae_embed_dim, model.grid, model.grid, device=device, generator=gen)
    labels = torch.randint(0, args.class_num, (b,), device=device, generator=gen)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step():
        with _autocast(device, dtype):
            loss = model(latents, labels)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    _reset_peak(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    med, times = time_fn(step, device, max(args.warmup - 1, 0), args.repeats)
    return {"what": "forward + backward + AdamW step on random latents (no data loading)",
            "train_batch": b, "batch_mul": model.diffusion_batch_mul, "grad_checkpointing": args.grad_checkpointing,
            "seconds_per_step": med, "runs_seconds": times, "first_step_seconds": first, "images_per_s": b / med,
            "peak_memory_mib": _peak_mib(device)}


# ------------------------------------------------------------------------------------------------------ main
def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="transdiff_base", choices=sorted(MODEL_SIZES), help="model size")
    p.add_argument("--encoder_depth", type=int, default=None, help="override (released: pairs of blocks)")
    p.add_argument("--decoder_depth", type=int, default=None, help="override the number of decoder blocks")
    p.add_argument("--decoder_embed_dim", type=int, default=None, help="override the decoder width W")
    p.add_argument("--decoder_heads", type=int, default=None, help="override the decoder heads")
    p.add_argument("--img_size", type=int, default=256, help="image side in pixels")
    p.add_argument("--class_num", type=int, default=1000, help="number of classes")
    p.add_argument("--batch", type=int, default=4, help="images per sampling batch (doubled under cfg)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--cfg", type=float, default=1.3, help="guidance scale (1: no unconditional half)")
    p.add_argument("--scale_0", type=float, default=0.87, help="sampler drift scale")
    p.add_argument("--scale_1", type=float, default=0.91, help="sampler noise scale")
    p.add_argument("--per_sample_generators", action="store_true",
                   help="one torch.Generator per sample (the world-size-invariant evaluation mode)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype (fp32: none)")
    p.add_argument("--device", default="cpu", help="where to run")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder and the encoder blocks")
    p.add_argument("--no_onednn", action="store_true",
                   help="CPU fp32 inference: F.linear (BLAS) instead of oneDNN fused linear layers")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the chip's peak dense TFLOP/s in --dtype, for fraction_of_peak (H100 SXM / H200: 989 "
                        "bf16/fp16 dense)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (the first includes compilation)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; figures are medians")
    p.add_argument("--matmul_seconds", type=float, default=0.5, help="length of each timed reference run")
    p.add_argument("--compare_cache", action="store_true",
                   help="also time sampling that recomputes the conditions' keys/values every step")
    p.add_argument("--full", action="store_true", help="also time model.samples (encoder + decoder)")
    p.add_argument("--no_sampling", action="store_true", help="do not time sampling")
    p.add_argument("--train", action="store_true", help="also time training steps")
    p.add_argument("--train_batch", type=int, default=8, help="images per training step (per device)")
    p.add_argument("--batch_mul", type=int, default=4, help="diffusion_batch_mul for training")
    p.add_argument("--grad_checkpointing", action="store_true", help="training: recompute activations")
    p.add_argument("--seed", type=int, default=0, help="weights, labels and noise")
    p.add_argument("--out", default=None, help="JSON file for the results")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    set_tf32()  # the project's policy: fp32 means fp32; bf16/fp16 go through autocast
    if args.no_onednn:
        fused.ONEDNN_LINEAR = False
    dtype = DTYPES[args.dtype]
    model = make_model(args, device)
    if args.compile:
        from models.transdiff import compile_model
        compile_model(model)
    net = model.diffdecoder.net
    report = {
        "config": vars(args),
        "model": {"name": args.model, "decoder_width": net.input_proj.out_features,
                  "decoder_depth": len(net.res_blocks), "decoder_heads": net.res_blocks[0].attn1.num_heads,
                  "latent_tokens": net.seq_len, "conditions": model.num_conditions,
                  "encoder_blocks": len(model.encoder_blocks),
                  "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                  "decoder_params_m": sum(p.numel() for p in net.parameters()) / 1e6},
        "env": {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
                "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                else _cpu_name()),
                "threads": torch.get_num_threads(), "onednn_linear": fused.ONEDNN_LINEAR,
                "load_average_before": _loadavg()},
    }
    if not args.no_sampling:
        report["sampling"] = bench_sampling(args, model, device, dtype)
    if args.train:
        report["training"] = bench_training(args, model, device, dtype)
    report["env"]["load_average_after"] = _loadavg()
    print(json.dumps(summary(report), indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


def _loadavg():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summary(report):
    """The headline figures (the JSON file has everything, including every timed run)."""
    out = {"model": report["model"], "env": report["env"]}
    s = report.get("sampling")
    if s:
        keep = ("images_per_s", "ms_per_image", "evaluation_flops_per_s", "fraction_of_matmul",
                "fraction_of_best_matmul", "fraction_of_peak", "peak_memory_mib", "first_call_seconds")
        out["sampling"] = {k: {kk: s[k][kk] for kk in keep if kk in s[k]}
                           for k in ("decoder", "decoder_no_kv_cache") if k in s}
        if "full_model" in s:
            out["sampling"]["full_model"] = {k: s["full_model"][k] for k in ("images_per_s", "ms_per_image")}
        ref = s["matmul_reference"]
        out["sampling"]["matmul_reference_flops_per_s"] = {k: ref[k]["flops_per_s"] for k in ("torch_mm", "onednn")
                                                           if k in ref}
        out["sampling"]["decoder_evaluation_gflops_per_image"] = s["decoder_evaluation_flops_per_image"] / 1e9
        if "kv_cache_speedup" in s:
            out["sampling"]["kv_cache_speedup"] = s["kv_cache_speedup"]
    if "training" in report:
        out["training"] = {k: v for k, v in report["training"].items() if k != "runs_seconds"}
    return out


if __name__ == "__main__":
    main()
