"""The one-shot check of every CUDA path, for the first GPU the project gets (at most 10 minutes on one H100/H200):

    python benchmarks/gpu_check.py --device cuda     # -> benchmarks/results/gpu_check_cuda.json
    python benchmarks/gpu_check.py --device cpu      # the same checks at tiny sizes (tests/test_gpu_check.py)

Every check asserts; the JSON holds a `checks` list (name, passed, figures, and the error of a failed one) and the
process exits 1 when one failed. The checks: the fused and the plain block paths at L width; the device against
the CPU with a deterministic sampler and TF32 off; per-image generators invariant to batching; SDPA forced to the
flash kernel for the training shapes and to the memory-efficient one for the MRAR mask (the CPU has flash only);
the real training step with fp16 + GradScaler and a forced overflow; a one-rank process group through DDP
accumulation, save and the evaluation plan; the digits preset on the device with the default precision and with
--bf16, then resumed; training of L (tiny on CPU) in bf16 and fp16 with and without gradient checkpointing, peak
memory against benchmarks/memory_model.py and images/s against the FLOP ideal; sampling with CFG in bf16 (ms per
image, fraction of the chip's peak); compiled sampling (recompiles, speed); Inception features on the device
against the CPU with TF32 on and off (|dFID|).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import memory_model as mm  # noqa: E402
import torch  # noqa: E402
import torch.distributed as torch_dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import digits_preset as digits  # noqa: E402
import engine_transdiff as engine  # noqa: E402
import main as entry  # noqa: E402
from models import fused  # noqa: E402
from models.blocks import DecoderBlock, EncoderBlock  # noqa: E402
from models.diffdecoder import DecoderNet  # noqa: E402
from models.tokenizers import build_tokenizer  # noqa: E402
from models.transdiff import block_causal_mask, build_model, compile_model  # noqa: E402
from util.checkpoint import LAST  # noqa: E402
from util.distributed import DistInfo  # noqa: E402
from util.precision import tf32  # noqa: E402

# per device: widths and batches of the checks (cuda: the released L; cpu: tiny, the whole run under a minute)
SIZES = {
    "cuda": dict(width=1024, heads=16, tokens=256, conditions=256, batch_mul=4, train_model="transdiff_large",
                 train_batch=32, train_img=256, sample_model="transdiff_large", sample_batch=256, sample_steps=100,
                 digits_steps=30, inception_images=2560, inception_dims=2048, inception_size=299, timed_steps=5,
                 attn_drop=0.1),
    "cpu": dict(width=64, heads=4, tokens=16, conditions=16, batch_mul=2, train_model="transdiff_tiny",
                train_batch=4, train_img=32, sample_model="transdiff_tiny", sample_batch=8, sample_steps=10,
                digits_steps=3, inception_images=8, inception_dims=4, inception_size=75, timed_steps=2, attn_drop=0.0),
}
FP32_TOL, BF16_TOL = 1e-4, 2e-2
MEMORY_TOL = 0.15
MAX_RECOMPILES = 2
CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_diff(a, b):
    return float((a.float().cpu() - b.float().cpu()).abs().max())


# ------------------------------------------------------------------ numerics
@check
def fused_vs_plain(dev, s):
    """models/fused.py against the plain blocks at L width (fused is CPU-only until this passes on the GPU)."""
    torch.manual_seed(0)
    w, h, n = s["width"], s["heads"], s["tokens"]
    enc = EncoderBlock(w, h).to(dev).eval()
    net = DecoderNet(16, w, w, 2, h, n).to(dev).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, c, t = torch.randn(4, n, w, device=dev), torch.randn(4, s["conditions"], w, device=dev), torch.tensor([500.0])
    z = torch.randn(4, n, 16, device=dev)
    figures, timings = {}, {}
    added = dev.type not in fused.DEVICES
    fused.DEVICES.add(dev.type)
    try:
        for name, dtype, tol in (("fp32", None, FP32_TOL), ("bf16", torch.bfloat16, BF16_TOL)):
            outs = {}
            for path in ("plain", "fused"):
                with torch.no_grad(), torch.autocast(dev.type, dtype or torch.float32, enabled=dtype is not None):
                    ctx = torch.enable_grad() if path == "plain" else contextlib.nullcontext()
                    with ctx:  # autograd on: the plain path
                        for _ in range(2):  # the second call is timed (the first packs weights, warms kernels)
                            sync(dev)
                            t0 = time.perf_counter()
                            outs[path] = (enc(x).detach(), net(z, c, t.to(dev)).detach())
                            sync(dev)
                        timings[f"{name}_{path}_s"] = time.perf_counter() - t0
            diffs = [max_diff(a, b) for a, b in zip(outs["plain"], outs["fused"])]
            figures[f"{name}_max_abs_diff"] = max(diffs)
            assert max(diffs) < tol, f"{name}: fused and plain paths differ by {max(diffs):.3g} (tolerance {tol})"
    finally:
        if added:
            fused.DEVICES.discard(dev.type)
    return {**figures, **timings}


def tiny_sampler_model(dev):
    torch.manual_seed(0)
    return build_model("transdiff_tiny", img_size=64, class_num=10).to(dev).eval()


@check
def device_vs_cpu(dev, s):
    """Deterministic (Euler ODE) samples of the same weights on the device and on the CPU, fp32, TF32 off."""
    model = tiny_sampler_model(torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    labels, noise = torch.tensor([1, 2, 3]), torch.randn(3, model.seq_len, model.token_embed_dim)
    with tf32(False):
        ref = model.samples(labels, 8, cfg=1.5, sampler="euler", noise=noise)
        out = model.to(dev).samples(labels.to(dev), 8, cfg=1.5, sampler="euler", noise=noise.to(dev))
    diff = max_diff(out, ref)
    assert diff < FP32_TOL, f"device and CPU samples differ by {diff:.3g}"
    return {"max_abs_diff": diff, "reference": "cpu"}


@check
def per_image_generators(dev, s):
    """Eight images at once equal the same eight drawn as 3 + 5 (one generator per image)."""
    model = tiny_sampler_model(dev)
    labels = torch.arange(8, device=dev) % 10

    def gens(idx):
        return [torch.Generator(device=dev).manual_seed(1000 + i) for i in idx]

    with tf32(False):
        whole = model.samples(labels, 6, cfg=1.5, generator=gens(range(8)))
        parts = torch.cat([model.samples(labels[:3], 6, cfg=1.5, generator=gens(range(3))),
                           model.samples(labels[3:], 6, cfg=1.5, generator=gens(range(3, 8)))])
    diff = max_diff(whole, parts)
    assert diff < FP32_TOL, f"batching changed the samples by {diff:.3g}"
    return {"max_abs_diff": diff}


@check
def sdpa_kernels(dev, s):
    """The training step's attention with SDPA forced to one kernel: a kernel that cannot serve the shapes, the
    dtype or the dropout raises instead of falling back silently."""
    torch.manual_seed(0)
    w, h, n, mul = s["width"], s["heads"], s["tokens"], s["batch_mul"]
    dtype = torch.bfloat16
    plain = SDPBackend.FLASH_ATTENTION
    masked = SDPBackend.EFFICIENT_ATTENTION if dev.type == "cuda" else SDPBackend.FLASH_ATTENTION  # CPU: flash only
    enc = EncoderBlock(w, h, attn_drop=s["attn_drop"]).to(dev).train()
    dec = DecoderBlock(w, h, attn_drop=s["attn_drop"]).to(dev).train()
    x = torch.randn(2 * mul, n, w, device=dev, requires_grad=True)
    c = torch.randn(2, s["conditions"], w, device=dev)
    figures = {"flash": str(plain), "masked": str(masked), "cross_attention_queries": mul * n}
    with torch.autocast(dev.type, dtype):
        with sdpa_kernel([plain]):
            enc(x).float().sum().backward()
            dec(x, torch.randn(2 * mul, 6, w, device=dev), dec.attn2.kv(c)).float().sum().backward()
        mask = block_causal_mask([n // 4] * 4, device=dev)
        with sdpa_kernel([masked]):
            enc(x, mask).float().sum().backward()
    q = torch.randn(2, h, n, w // h, device=dev, dtype=dtype)
    with sdpa_kernel([masked]):
        forced = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    with sdpa_kernel([SDPBackend.MATH]):
        reference = F.scaled_dot_product_attention(q.float(), q.float(), q.float(), attn_mask=mask)
    figures["masked_vs_math_max_abs_diff"] = max_diff(forced, reference)
    assert figures["masked_vs_math_max_abs_diff"] < BF16_TOL
    assert torch.isfinite(x.grad).all()
    return figures


# ------------------------------------------------------------------ training through the engine
def run_args(root, dev, *extra):
    """main.py's arguments for the digits preset on `dev`, checked as the command line checks them."""
    parser = entry.get_args_parser()
    argv = ["--preset", "digits", "--data_path", str(root / "digits"), "--output_dir", str(root / "out"),
            "--num_workers", "0", "--device", dev.type, "--log_freq", "1", *map(str, extra)]
    args = entry.check_args(parser, entry.parse_args(parser, argv))
    args.preset = None  # its settings, without the report at the end (a judge to train, images to rate)
    return args


@contextlib.contextmanager
def one_rank_group(dev):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="1", RANK="0",
                      LOCAL_RANK="0")
    torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
        for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
            os.environ.pop(k, None)


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _micro_batches(run, accum):
    batches = iter(run.loader)
    for _ in range(accum):
        x, y, _ = next(batches)
        yield engine.to_latents(x.to(run.dist.device), run.tokenizer, False), y.to(run.dist.device)


@check
def fp16_gradscaler_overflow(dev, s, root):
    """engine.train_step with fp16 autocast and a GradScaler whose scale overflows the gradients: the step is
    skipped (weights unchanged) and the scale halved."""
    args = run_args(root, dev, "--batch_size", 8)
    os.makedirs(args.output_dir, exist_ok=True)
    run = engine.build_run(args, DistInfo(device=dev), build_tokenizer(args).to(dev), None)
    huge = 2.0 ** 120  # finite in fp32; any gradient it multiplies overflows fp16
    run.scaler, run.amp_dtype = torch.amp.GradScaler(dev.type, init_scale=huge), torch.float16
    run.model.train()
    before = [p.detach().clone() for p in run.raw.parameters()]
    run.sampler.set_epoch(0)
    engine.train_step(run, _micro_batches(run, 1))
    changed = sum(not torch.equal(a, p) for a, p in zip(before, run.raw.parameters()))
    scale = float(run.scaler.get_scale())
    assert changed == 0, f"{changed} parameters changed in a step with overflowing gradients"
    assert scale == huge / 2, f"scale {scale} after the overflow, expected {huge / 2}"
    run.scaler = torch.amp.GradScaler(dev.type, init_scale=2.0 ** 8)  # and a scale that fits trains
    loss, grad_norm = engine.train_step(run, _micro_batches(run, 1))
    changed = sum(not torch.equal(a, p) for a, p in zip(before, run.raw.parameters()))
    assert changed > 0 and grad_norm > 0
    return {"init_scale": huge, "scale_after_overflow": scale, "loss_after": loss, "changed_after": changed}


@check
def one_rank_ddp(dev, s, root):
    """A one-rank process group: DDP (gradients as bucket views) with accumulation, save, then the evaluation
    plan of engine_eval generating its images."""
    out = root / "ddp"
    args = run_args(root, dev, "--batch_size", 4, "--gradient_accumulation_steps", 2, "--max_train_steps", 2,
                    "--output_dir", out)
    with one_rank_group(dev):
        entry.main(args)
    assert (out / LAST).is_file()
    ckpt = torch.load(out / LAST, map_location="cpu", weights_only=False)
    assert ckpt["train_state"]["step"] == 2
    eval_args = run_args(root, dev, "--evaluate", "--resume", out, "--output_dir", out, "--skip_metrics",
                         "--num_images", 10, "--eval_bsz", 5, "--num_sampling_steps", 3)
    with one_rank_group(dev):
        entry.main(eval_args)
    images = sorted(p for p in out.rglob("*.png") if "samples_grid" not in p.name)
    assert len(images) >= 10, f"{len(images)} evaluation images written"
    return {"steps": ckpt["train_state"]["step"], "evaluation_images": len(images)}


@check
def digits_preset(dev, s, root):
    """The digits preset on the device: default precision, then --bf16; each run stopped and resumed."""
    figures = {}
    for name, extra in (("default", []), ("bf16", ["--bf16"])):
        out = root / f"digits_{name}"
        for steps in (s["digits_steps"], 2 * s["digits_steps"]):
            args = run_args(root, dev, "--output_dir", out, "--max_train_steps", steps, *extra)
            t0 = time.time()
            entry.main(args)
            figures[f"{name}_to_{steps}_s"] = time.time() - t0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps_logged = [r["step"] for r in rows]
        assert steps_logged == list(range(1, 2 * s["digits_steps"] + 1)), steps_logged
        assert all(map(lambda r: r["loss"] == r["loss"] and r["loss"] < 10, rows))
        figures[f"{name}_first_loss"], figures[f"{name}_last_loss"] = rows[0]["loss"], rows[-1]["loss"]
        figures[f"{name}_images_per_s"] = rows[-1]["images_per_sec"]
    return figures


# ------------------------------------------------------------------ memory and speed
def _measured_training_peak(dev, s, dtype, ckpt, config):
    torch.manual_seed(0)
    if dev.type == "cpu":
        return mm.measure_training_cpu(s["train_model"], s["train_batch"], dtype, **config), None
    with dev:
        model, ema, optimizer = mm.build_training(s["train_model"], config)
    latents, labels = (t.to(dev) for t in mm._training_inputs(model, s["train_batch"]))
    mm.training_step(model, ema, optimizer, latents, labels, dtype)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    mm.training_step(model, ema, optimizer, latents, labels, dtype)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    t0 = time.perf_counter()
    for _ in range(s["timed_steps"]):
        mm.training_step(model, ema, optimizer, latents, labels, dtype)
    torch.cuda.synchronize(dev)
    return peak, s["train_batch"] * s["timed_steps"] / (time.perf_counter() - t0)


@check
def training_memory_and_speed(dev, s):
    """Peak memory of a training step against the memory model (+-15%), images/s against the FLOP ideal."""
    target = "cuda" if dev.type == "cuda" else "cpu"
    config = dict(img_size=s["train_img"], class_num=1000 if dev.type == "cuda" else 10,
                  diffusion_batch_mul=s["batch_mul"])
    flops = mm.training_flops_per_image(s["train_model"], **config)
    figures, worst = {"train_tflop_per_image": flops / 1e12}, 0.0
    for dtype_name in ("bf16", "fp16"):
        dtype = mm.DTYPES[dtype_name]
        for ckpt in (False, True):
            cfg = dict(config, grad_checkpointing=ckpt)
            predicted = mm.predict_training(s["train_model"], s["train_batch"], dtype, target, **cfg)["peak_bytes"]
            measured, images_per_s = _measured_training_peak(dev, s, dtype, ckpt, cfg)
            key = f"{dtype_name}{'_ckpt' if ckpt else ''}"
            figures[f"{key}_peak_gib"] = measured / mm.GIB
            figures[f"{key}_predicted_gib"] = predicted / mm.GIB
            worst = max(worst, abs(predicted / measured - 1))
            if images_per_s is not None:
                figures[f"{key}_images_per_s"] = images_per_s
                figures[f"{key}_fraction_of_peak"] = images_per_s * flops / (peak_tflops(dev) * 1e12)
    figures["worst_relative_error"] = worst
    assert worst < MEMORY_TOL, f"memory model off by {worst:.1%}"
    return figures


def peak_tflops(dev):
    """bf16 dense peak of this GPU (memory_model.PEAK_TFLOPS by name), None when unknown (a CPU)."""
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    for gpu, tf in mm.PEAK_TFLOPS.items():
        if gpu.split()[0] in name:
            return tf
    return None


def _time_sampling(model, labels, steps, dtype, repeats=1):
    dev = labels.device
    with torch.autocast(dev.type, dtype):
        model.samples(labels, 2, cfg=1.5)  # warm-up (and compilation)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.samples(labels, steps, cfg=1.5)
        sync(dev)
    return (time.perf_counter() - t0) / repeats


@check
def sampling_speed(dev, s):
    """Sampling with CFG in bf16: ms per image and the fraction of the chip's bf16 peak it reaches."""
    torch.manual_seed(0)
    model = build_model(s["sample_model"], img_size=256 if dev.type == "cuda" else 64).to(dev).eval()
    labels = torch.arange(s["sample_batch"], device=dev) % model.class_num
    seconds = _time_sampling(model, labels, s["sample_steps"], torch.bfloat16)
    flops = mm.sampling_flops_per_image(s["sample_model"], s["sample_steps"], img_size=model.img_size)
    ms = 1e3 * seconds / s["sample_batch"]
    peak = peak_tflops(dev)
    fraction = flops / (seconds / s["sample_batch"]) / (peak * 1e12) if peak else None
    assert ms > 0 and (fraction is None or 0 < fraction < 1)
    return {"ms_per_image": ms, "tflop_per_image": flops / 1e12, "fraction_of_peak": fraction,
            "batch": s["sample_batch"], "steps": s["sample_steps"]}


@check
def compiled_sampling(dev, s):
    """compile_model sampling: at most 2 recompiles over differently sized calls, and (on the GPU) faster than
    eager. The CPU run traces with dynamo's eager backend: inductor's CPU compile takes minutes on a small box."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(s["sample_model"], img_size=256 if dev.type == "cuda" else 64).to(dev).eval()
    labels = torch.arange(s["sample_batch"], device=dev) % model.class_num
    steps = max(2, s["sample_steps"] // 5)  # the speed comparison needs fewer steps than the speed figure
    eager = _time_sampling(model, labels, steps, torch.bfloat16)
    backend = "inductor" if dev.type == "cuda" else "eager"
    graphs = []

    def counting_backend(gm, example_inputs):  # one call per graph compiled
        graphs.append(len(gm.graph.nodes))
        if backend == "eager":
            return gm.forward
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    compile_model(model, backend=counting_backend)
    t0 = time.perf_counter()
    _time_sampling(model, labels, steps, torch.bfloat16)
    first_s = time.perf_counter() - t0
    first_graphs = len(graphs)
    compiled = _time_sampling(model, labels, steps, torch.bfloat16)
    _time_sampling(model, labels[: max(1, len(labels) // 2)], 2, torch.bfloat16)  # another batch size
    recompiles = len(graphs) - first_graphs
    frames = len(graphs)
    torch._dynamo.reset()
    figures = {"backend": backend, "eager_s": eager, "compiled_s": compiled, "first_call_s": first_s,
               "recompiles": recompiles, "graphs": frames, "speedup": eager / compiled}
    assert recompiles <= MAX_RECOMPILES, f"{recompiles} recompiles"
    if dev.type == "cuda":
        assert compiled < eager, f"compiled sampling {compiled:.2f} s, eager {eager:.2f} s"
    return figures


@check
def inception_tf32(dev, s):
    """Inception pool features on the device against the CPU, TF32 off and on: |dFID|, the FID between the two
    feature sets of the same images less that of the CPU set with itself. The architecture of FID's Inception with
    seeded random weights: what is measured is rounding, which needs no trained weights (nor a download)."""
    import numpy as np
    import torchvision

    from util.metrics import features_to_stats, frechet_distance

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True).eval()
    net.fc = torch.nn.Identity()
    images = torch.rand(s["inception_images"], 3, s["inception_size"], s["inception_size"])
    dims = s["inception_dims"]  # fewer than the images, or the covariances are singular (CPU: a few images)

    def features(device):
        with torch.no_grad():
            return torch.cat([net(x.to(device)).double().cpu() for x in images.split(256)])[:, :dims].numpy()

    ref = features(torch.device("cpu"))
    base = frechet_distance(*features_to_stats(ref), *features_to_stats(ref))
    figures = {"weights": "torchvision architecture, seeded random weights", "images": len(images), "dims": dims}
    net = net.to(dev)
    for allow in (False, True):
        with tf32(allow):
            feats = features(dev)
        figures[f"tf32_{'on' if allow else 'off'}_max_abs_diff"] = float(np.abs(feats - ref).max())
        fid = frechet_distance(*features_to_stats(feats), *features_to_stats(ref))
        figures[f"tf32_{'on' if allow else 'off'}_abs_dfid"] = float(abs(fid - base))
    assert figures["tf32_off_max_abs_diff"] < 1e-3
    return figures


# ------------------------------------------------------------------ running them
def run_checks(dev, only=None, out=None):
    s = SIZES[dev.type]
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        root = Path(tmp)
        digits.prepare(str(root / "digits"))
        for fn in CHECKS:
            if only and fn.__name__ not in only:
                continue
            t0 = time.time()
            entry_ = {"name": fn.__name__, "passed": False}
            try:
                needs_root = fn.__code__.co_argcount == 3
                entry_["figures"] = fn(dev, s, root) if needs_root else fn(dev, s)
                entry_["passed"] = True
            except Exception as e:  # recorded, and the other checks still run
                entry_["error"] = f"{type(e).__name__}: {e}"
                entry_["traceback"] = traceback.format_exc(limit=6)
            entry_["seconds"] = time.time() - t0
            results.append(entry_)
            print(f"{'PASS' if entry_['passed'] else 'FAIL'} {fn.__name__} ({entry_['seconds']:.1f} s) "
                  f"{json.dumps(entry_.get('figures', entry_.get('error')))}", flush=True)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    report = {"device": str(dev), "device_name": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "passed": all(r["passed"] for r in results), "checks": results}
    out = out or REPO / "benchmarks" / "results" / f"gpu_check_{dev.type}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{sum(r['passed'] for r in results)}/{len(results)} checks passed -> {os.path.relpath(out, REPO)}")
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--only", nargs="+", default=None, choices=[fn.__name__ for fn in CHECKS])
    p.add_argument("--out", default=None, help="JSON report (default benchmarks/results/gpu_check_<device>.json)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but no CUDA device is visible")
    report = run_checks(torch.device(args.device), args.only, args.out)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
