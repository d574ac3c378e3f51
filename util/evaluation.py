"""Sample-and-score evaluation: generate the class-balanced image set as PNGs, then FID / Inception Score.

Layout of one evaluation (``eval_dir``)::

    <output_dir>/eval/<settings>/00000.png ... 49999.png   generated images, named by global image index; kept
    <output_dir>/eval/<settings>/generation.json            what produced them (checked when a run resumes)
    <output_dir>/eval/<settings>/metrics.json               metrics, settings and speed of the latest run
    <output_dir>/eval_results.jsonl                         one line per finished evaluation

Image ``i`` has class ``i // (num_images / class_num)`` and draws all of its randomness from its own generator,
seeded by ``image_seed(seed, i)``: the set depends neither on the world size nor on ``--eval_bsz`` (with equal
threads per process the PNGs are byte-identical; another thread count moves some pixels by 1/255). Running the
same command again skips the images already written, so an interrupted run completes its set.

Works in one process or under torchrun: ranks share the folder (a shared filesystem across nodes), rank 0 decides
which images are missing and broadcasts it, every rank generates its share, and rank 0 scores the folder.
"""
import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from util import runlock
from util.checkpoint import atomic_write

# Released reference statistics per resolution (SPEC §4); relative to the repository root.
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FID_STATS = {
    256: "fid_stats/adm_in256_stats.npz",
    512: "fid_stats/VIRTUAL_imagenet512.npz",
}
EVAL_DTYPES = {None: None, "fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_TMP_RE = re.compile(r"^\.\d+\.png\.\d+\.tmp$")
# Keys of generation.json that must match for a rerun to add images to an existing folder. Not `resume`: a
# training run restarted from its own output_dir re-evaluates the same epoch with a different --resume.
_IDENTITY_KEYS = ("model", "mrar", "img_size", "class_num", "latent_scale")


# ---------------------------------------------------------------------------------------------------- small helpers
def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _on_rank0(fn, device):
    """Run `fn` on rank 0; if it raises, every rank raises (rank 0 with the real error), so none is left waiting."""
    rank, world = _dist_info()
    error = None
    if rank == 0:
        try:
            fn()
        except Exception as e:
            error = e
    if world > 1:
        flag = torch.tensor([error is not None], dtype=torch.uint8, device=_comm_device(device))
        dist.broadcast(flag, src=0)
        if error is None and flag.item():
            raise RuntimeError("rank 0 stopped the evaluation; see its error")
    if error is not None:
        raise error


def _comm_device(device):
    """NCCL only moves CUDA tensors; every other backend here takes CPU tensors."""
    if "nccl" in str(dist.get_backend()):
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fmt(x):
    if isinstance(x, (list, tuple)):
        return "_".join(_fmt(v) for v in x)
    return f"{float(x):g}"


def _sampling_steps(model, args):
    steps = getattr(args, "num_sampling_steps", None)
    return int(model.num_sampling_steps if steps in (None, "") else steps)


def _eval_dtype(args):
    name = getattr(args, "eval_dtype", None)
    key = name.lower() if isinstance(name, str) else name
    if key not in EVAL_DTYPES:
        raise ValueError(f"eval_dtype must be one of fp32, bf16, fp16 (or None), got {name!r}")
    return EVAL_DTYPES[key]


def _autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _latent_scale(tokenizer):
    scale = getattr(tokenizer, "scale_factor", None)
    if scale is None:
        raise AttributeError(f"the tokenizer ({type(tokenizer).__name__}) has no `scale_factor`: the model's latents "
                             "are decoded as tokenizer.decode(latents / scale_factor); see models/tokenizers.py")
    return float(scale)


def _module_device(module, default=None):
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            return p.device
        for b in module.buffers():
            return b.device
    return default


def _index_width(num_images):
    return max(5, len(str(num_images - 1)))


def image_path(out_dir, index, num_images):
    return os.path.join(out_dir, f"{index:0{_index_width(num_images)}d}.png")


def _atomic_write_bytes(path, data):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def _atomic_write_json(path, obj):
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _append_jsonl(path, obj):
    """Append a line by rewriting the file atomically: a crash leaves the old file or the new one, never half a
    line (evaluations are rare, so the rewrite costs nothing)."""
    old = Path(path).read_bytes() if os.path.exists(path) else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    _atomic_write_bytes(path, old + (json.dumps(obj, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------------------------------------------- public pieces
def labels_for(num_images, class_num):
    """Class ids in image-index order: class c for images c*k .. c*k+k-1, with k = num_images / class_num."""
    num_images, class_num = int(num_images), int(class_num)
    if num_images <= 0 or class_num <= 0:
        raise ValueError(f"num_images ({num_images}) and class_num ({class_num}) must be positive")
    if num_images % class_num:
        lo = num_images - num_images % class_num
        raise ValueError(f"--num_images {num_images} is not a multiple of the {class_num} classes, so the classes "
                         f"cannot all get the same number of images; use e.g. {lo or class_num} or {lo + class_num}")
    return torch.arange(class_num, dtype=torch.int64).repeat_interleave(num_images // class_num)


def image_seed(seed, index):
    """A 63-bit seed for image `index` of a run seeded with `seed`. Hashed rather than `seed + index`, so that runs
    with neighbouring seeds do not share shifted copies of the same noise."""
    digest = hashlib.blake2b(f"transdiff-eval:{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def eval_folder_name(args, epoch=None, model=None):
    """Folder name holding every setting that changes the images, e.g.
    ``transdiff_large-res256-steps100-maruyama-cfg1.3-s00.89-s10.95-n50000-seed1-ema-ep799``.

    The MRAR flag comes from `model` when given (the checkpoint decides it), else from ``args.mrar``."""
    mrar = bool(model.mrar) if model is not None else bool(getattr(args, "mrar", False))
    steps = _sampling_steps(model, args) if model is not None else getattr(args, "num_sampling_steps", None)
    parts = []
    if getattr(args, "model", None):
        parts.append(str(args.model))
    if mrar:
        parts.append("mrar")
    parts += [f"res{int(args.img_size)}", f"steps{steps}", str(getattr(args, "sampler", "maruyama")),
              f"cfg{_fmt(getattr(args, 'cfg', 1.0))}", f"s0{_fmt(getattr(args, 'scale_0', 1.0))}",
              f"s1{_fmt(getattr(args, 'scale_1', 1.0))}", f"n{int(args.num_images)}",
              f"seed{int(getattr(args, 'seed', 0))}", "noema" if getattr(args, "eval_wo_ema", False) else "ema"]
    if _eval_dtype(args) is not None:
        parts.append(str(args.eval_dtype).lower())
    if epoch is not None:
        parts.append(f"ep{int(epoch)}")
    return "-".join(parts)


def eval_dir(args, epoch=None, model=None):
    return os.path.join(args.output_dir, "eval", eval_folder_name(args, epoch, model))


def is_complete_png(path, img_size=None):
    """True when `path` is a whole PNG (signature, IHDR of the expected size, IEND trailer). Reads 36 bytes, so a
    50K-image folder is checked in seconds."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            f.seek(0, os.SEEK_END)
            if f.tell() < 24 + len(_PNG_IEND):
                return False
            f.seek(-len(_PNG_IEND), os.SEEK_END)
            tail = f.read()
    except OSError:
        return False
    if head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR" or tail != _PNG_IEND:
        return False
    if img_size is not None:
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        return width == height == int(img_size)
    return True


def missing_indices(out_dir, num_images, img_size=None):
    """Indices whose PNG is absent or incomplete, in order; deletes stale temporary files of killed runs."""
    names = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    for name in names:
        if _TMP_RE.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, name))
    width = _index_width(num_images)
    return [i for i in range(num_images)
            if f"{i:0{width}d}.png" not in names or not is_complete_png(image_path(out_dir, i, num_images), img_size)]


def to_uint8(images):
    """(B, 3, H, W) decoder output in about [-1, 1] -> (B, H, W, 3) uint8, rounded as MAR does."""
    images = (images.float() + 1) / 2
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    return np.round(np.clip(arr * 255, 0, 255)).astype(np.uint8)


def save_png(array, path):
    """Write through a temporary name and rename, so a killed run never leaves half a PNG under the final name."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _peak_memory(device):
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    try:
        import resource
    except ImportError:  # not on Windows
        return None, None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_max_rss"


# ---------------------------------------------------------------------------------------------------- generation
def _generation_manifest(model, tokenizer, args, out_dir):
    resume = getattr(args, "resume", None)
    return {
        "model": getattr(args, "model", None),
        "mrar": bool(model.mrar),
        "img_size": int(args.img_size),
        "class_num": int(model.class_num),
        "resume": os.path.normpath(os.path.abspath(resume)) if resume else None,
        "latent_scale": _latent_scale(tokenizer),
        "num_images": int(args.num_images),
        "seed": int(getattr(args, "seed", 0)),
        "cfg": getattr(args, "cfg", 1.0),
        "scale_0": float(getattr(args, "scale_0", 1.0)),
        "scale_1": float(getattr(args, "scale_1", 1.0)),
        "sampler": getattr(args, "sampler", "maruyama"),
        "num_sampling_steps": _sampling_steps(model, args),
        "ema": not getattr(args, "eval_wo_ema", False),
        "eval_dtype": getattr(args, "eval_dtype", None),
        "folder": os.path.abspath(out_dir),
    }


def _check_manifest(out_dir, manifest):
    """Refuse to add images to a folder that another kind of model started (B and B-MRAR share their published
    sampling settings, and the published commands may share an output_dir)."""
    path = os.path.join(out_dir, "generation.json")
    if os.path.exists(path):
        old = json.loads(Path(path).read_text())
        diff = {k: (old.get(k), manifest[k]) for k in _IDENTITY_KEYS if old.get(k) != manifest[k]}
        if diff:
            what = "; ".join(f"{k}: folder has {a!r}, this run {b!r}" for k, (a, b) in diff.items())
            raise RuntimeError(f"{out_dir} holds images of another model ({what}). Refusing to mix "
                               "them: use another --output_dir, or delete that folder to regenerate.")
    else:
        _atomic_write_json(path, manifest)


def _plan(model, tokenizer, args, out_dir, device):
    """Rank 0 locks the folder (one live run per folder), checks it and lists the missing images; every rank gets
    the list (or the refusal). Returns (missing indices, the lock for runlock.release)."""
    rank, world = _dist_info()
    n = int(args.num_images)
    status, missing, error, lock = 0, [], None, None
    if rank == 0:
        try:
            lock = runlock.acquire(out_dir, "image generation", log=lambda m: print(f"[eval] {m}", flush=True))
            _check_manifest(out_dir, _generation_manifest(model, tokenizer, args, out_dir))
            missing = missing_indices(out_dir, n, args.img_size)
        except Exception as e:  # told to the other ranks below, so they do not wait forever
            status, error = 1, e
    if world > 1:
        buf = torch.zeros(n + 1, dtype=torch.uint8, device=_comm_device(device))
        if rank == 0:
            buf[0] = status
            buf[1:][torch.tensor(missing, dtype=torch.int64, device=buf.device)] = 1
        dist.broadcast(buf, src=0)
        buf = buf.cpu()
        status = int(buf[0])
        missing = torch.nonzero(buf[1:]).flatten().tolist()
    if error is not None:
        runlock.release(lock)
        raise error
    if status:
        raise RuntimeError(f"rank 0 could not prepare {out_dir}; see its error")
    return missing, lock


def generate_images(model, tokenizer, args, out_dir):
    """Write the PNGs of `out_dir` that are still missing, this rank's share of them; returns speed statistics
    reduced over ranks (identical on every rank)."""
    n, bsz = int(args.num_images), int(args.eval_bsz)
    if bsz <= 0:
        raise ValueError(f"--eval_bsz must be positive, got {bsz}")
    class_num = int(getattr(args, "class_num", None) or model.class_num)
    if class_num != model.class_num:
        raise ValueError(f"args.class_num={class_num} but the model has {model.class_num} classes")
    if int(args.img_size) != model.img_size:
        raise ValueError(f"--img_size {args.img_size} but the model generates {model.img_size} px images")
    labels_for(n, class_num)  # refuses an unbalanced count before the folder is touched
    device = _module_device(model, torch.device("cpu"))
    missing, lock = _plan(model, tokenizer, args, out_dir, device)
    try:
        return _generate(model, tokenizer, args, out_dir, missing, device)
    finally:
        runlock.release(lock)


def _generate(model, tokenizer, args, out_dir, missing, device):
    rank, world = _dist_info()
    n, bsz = int(args.num_images), int(args.eval_bsz)
    labels = labels_for(n, int(getattr(args, "class_num", None) or model.class_num))
    tok_device = _module_device(tokenizer, device)
    autocast_dtype = _eval_dtype(args)
    seed = int(getattr(args, "seed", 0))
    scale = _latent_scale(tokenizer)
    sample_kw = dict(num_sampling_steps=_sampling_steps(model, args), cfg=getattr(args, "cfg", 1.0),
                     sampler=getattr(args, "sampler", "maruyama"), scale_0=float(getattr(args, "scale_0", 1.0)),
                     scale_1=float(getattr(args, "scale_1", 1.0)))
    mine = missing[rank::world]  # the missing images dealt round-robin: shares differ by at most one image
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    modes = [(m, m.training) for m in (model, tokenizer) if isinstance(m, torch.nn.Module)]
    for m, _ in modes:
        m.eval()
    done, timed_images, nonfinite = 0, 0, 0
    start = time.perf_counter()
    timed_start = None
    try:
        with torch.no_grad(), tqdm(total=len(mine), unit="img", desc=f"generating {os.path.basename(out_dir)}",
                                   disable=rank != 0, dynamic_ncols=True) as bar:
            for lo in range(0, len(mine), bsz):
                idx = mine[lo:lo + bsz]
                gens = [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in idx]
                with _autocast(device, autocast_dtype):
                    latents = model.samples(labels[idx].to(device), generator=gens, **sample_kw)
                    images = tokenizer.decode(latents.to(tok_device) / scale)
                images = images.float()
                if images.shape[1:] != (3, int(args.img_size), int(args.img_size)):
                    raise ValueError(f"the tokenizer decoded images of shape {tuple(images.shape[1:])}; expected "
                                     f"(3, {args.img_size}, {args.img_size}) for --img_size {args.img_size}")
                bad = ~torch.isfinite(images).flatten(1).all(dim=1)
                if bad.any():
                    # One diverged sample should not end a 50K run: written as mid-grey, counted, reported.
                    nonfinite += int(bad.sum())
                    images = torch.nan_to_num(images, nan=0.0, posinf=1.0, neginf=-1.0)
                for i, arr in zip(idx, to_uint8(images)):
                    save_png(arr, image_path(out_dir, i, n))
                done += len(idx)
                bar.update(len(idx))
                if timed_start is None:
                    timed_start = time.perf_counter()  # the first batch pays for warm-up and allocations
                else:
                    timed_images += len(idx)
    finally:
        for m, was_training in modes:
            m.train(was_training)
    end = time.perf_counter()
    peak, peak_kind = _peak_memory(device)
    _barrier()

    counts = [done, timed_images, nonfinite]
    times = [end - start, (end - timed_start) if timed_start is not None and timed_images else 0.0,
             float(peak if peak is not None else -1)]
    if world > 1:
        comm = _comm_device(device)
        c = torch.tensor(counts, dtype=torch.int64, device=comm)
        t = torch.tensor(times, dtype=torch.float64, device=comm)
        dist.all_reduce(c, op=dist.ReduceOp.SUM)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        counts, times = c.tolist(), t.tolist()
    generated, timed_images, nonfinite = counts
    wall, timed_wall, peak = times
    return {
        "images_total": n,
        "images_generated": generated,
        "images_skipped": n - len(missing),
        "world_size": world,
        "eval_bsz": bsz,
        # kernels split work by thread count: 1/255 pixel differences between thread counts, none between batch sizes
        "threads_per_rank": torch.get_num_threads(),
        "generation_wall_s": wall,
        # first batch of every rank excluded; None when no rank ran a second batch
        "images_per_s": timed_images / timed_wall if timed_images and timed_wall > 0 else None,
        "s_per_image": timed_wall / timed_images if timed_images and timed_wall > 0 else None,
        "timed_images": timed_images,
        "peak_memory_bytes": int(peak) if peak >= 0 else None,
        "peak_memory_kind": peak_kind,
        "nonfinite_images": nonfinite,
    }


# ---------------------------------------------------------------------------------------------------- metrics
def resolve_fid_reference(args):
    """(ref_stats, ref_dir): exactly one is set. Raises before any image is generated when neither is usable."""
    stats, ref_dir = getattr(args, "fid_stats", None), getattr(args, "fid_ref_dir", None)
    if stats and ref_dir:
        raise ValueError("give one FID reference: --fid_stats (an .npz with mu and sigma) or --fid_ref_dir "
                         "(a folder of reference images), not both")
    if ref_dir:
        if not os.path.isdir(ref_dir):
            raise FileNotFoundError(f"FID reference image folder {ref_dir!r} does not exist")
        return None, ref_dir
    if not stats:
        default = DEFAULT_FID_STATS.get(int(args.img_size))
        if default is None:
            raise ValueError(f"no default FID reference at img_size {args.img_size} (there are "
                             f"{', '.join(f'{v} at {k}' for k, v in DEFAULT_FID_STATS.items())}): pass --fid_stats "
                             "or --fid_ref_dir, or skip the metrics with --skip_metrics")
        stats = default if os.path.exists(default) else str(REPO_ROOT / default)
    if not os.path.isfile(stats):
        raise FileNotFoundError(f"FID statistics {stats!r} not found. fid_stats/README.md says how to obtain or "
                                "make it (tools/make_fid_stats.py); or pass --fid_stats PATH / --fid_ref_dir DIR, "
                                "or --skip_metrics to only generate")
    return stats, None


def _settings(model, args, epoch):
    cfg = getattr(args, "cfg", 1.0)
    return {
        "model": getattr(args, "model", None), "mrar": bool(model.mrar), "img_size": int(args.img_size),
        "num_images": int(args.num_images), "class_num": int(model.class_num), "seed": int(getattr(args, "seed", 0)),
        "cfg": list(cfg) if isinstance(cfg, (list, tuple)) else float(cfg),
        "scale_0": float(getattr(args, "scale_0", 1.0)), "scale_1": float(getattr(args, "scale_1", 1.0)),
        "sampler": getattr(args, "sampler", "maruyama"), "num_sampling_steps": _sampling_steps(model, args),
        "ema": not getattr(args, "eval_wo_ema", False), "eval_dtype": getattr(args, "eval_dtype", None),
        "epoch": epoch, "resume": getattr(args, "resume", None),
    }


def _check_folder(out_dir, n):
    width = _index_width(n)
    pngs = {f for f in os.listdir(out_dir) if f.lower().endswith(".png")}
    expected = {f"{i:0{width}d}.png" for i in range(n)}
    if pngs != expected:
        lack, extra = sorted(expected - pngs), sorted(pngs - expected)
        raise RuntimeError(f"{out_dir} should hold exactly images 0..{n - 1}: missing {lack[:5]} ({len(lack)}), "
                           f"unexpected {extra[:5]} ({len(extra)})")


def run_evaluation(model, tokenizer, args, epoch=None, log_writer=None, feature_extractor=None):
    """Generate ``args.num_images`` images with `model` (already holding the weights to evaluate) and score them.

    Collective: every rank calls it. Returns the result dict on rank 0 and None elsewhere. `feature_extractor`
    replaces the Inception network (tests; see ``util.metrics.compute_metrics``). With ``args.skip_metrics`` only
    the images and the speed report are produced.
    """
    from util import metrics as metrics_lib  # torch-fidelity is only imported when evaluating

    model = getattr(model, "module", model)  # tolerate a DDP wrapper
    rank, _ = _dist_info()
    out_dir = eval_dir(args, epoch, model)
    skip_metrics = bool(getattr(args, "skip_metrics", False))
    weights = getattr(args, "fid_weights", None)
    ref_stats = ref_dir = None
    isc_unavailable = None  # why there is no Inception Score, when the weights cannot give one

    def check_references():
        # Before generating, so that a missing file fails in seconds rather than after hours of sampling.
        nonlocal ref_stats, ref_dir, isc_unavailable
        ref_stats, ref_dir = resolve_fid_reference(args)
        if feature_extractor is None and not metrics_lib.inception_weights_have_logits(weights):
            isc_unavailable = (f"{metrics_lib.resolve_inception_weights(weights)} has no logits head (made by "
                               "tools/fid_weights.py); the Inception Score needs torch-fidelity's own "
                               f"{metrics_lib.INCEPTION_WEIGHTS_FILENAME}")
            print(f"[eval] no Inception Score: {isc_unavailable}; scoring FID"
                  f"{' and precision/recall' if ref_dir else ''} only", flush=True)

    if not skip_metrics:
        # Only rank 0 scores, so only its node needs the statistics and the Inception weights.
        _on_rank0(check_references, _module_device(model, torch.device("cpu")))

    speed = generate_images(model, tokenizer, args, out_dir)

    result = None
    if rank == 0:
        n = int(args.num_images)
        _check_folder(out_dir, n)
        scores = {"fid": None, "inception_score_mean": None, "inception_score_std": None, "precision": None,
                  "recall": None, "num_images": n}
        if not skip_metrics:
            device = _module_device(model, torch.device("cpu"))
            # precision/recall need reference samples: only with a reference folder
            scores = metrics_lib.compute_metrics(
                out_dir, ref_stats=ref_stats, ref_dir=ref_dir, feature_extractor_weights_path=weights, device=device,
                batch_size=int(getattr(args, "fid_batch_size", 100)), isc=isc_unavailable is None,
                prc=ref_dir is not None, feature_extractor=feature_extractor)
        result = {**scores, "inception_score_unavailable": isc_unavailable, "metrics_skipped": skip_metrics,
                  "fid_reference": ref_stats or ref_dir, "folder": os.path.abspath(out_dir),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "settings": _settings(model, args, epoch),
                  "speed": speed}
        _atomic_write_json(os.path.join(out_dir, "metrics.json"), result)
        _append_jsonl(os.path.join(args.output_dir, "eval_results.jsonl"), result)
        _report(result, log_writer, epoch)
    _barrier()
    return result


def _report(result, log_writer, epoch):
    speed = result["speed"]

    def num(x, spec):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    peak = speed["peak_memory_bytes"]
    prc = (f"  precision {num(result['precision'], '.4f')}  recall {num(result['recall'], '.4f')}"
           if result.get("precision") is not None else "")
    print(f"[eval] {result['folder']}\n"
          f"[eval] FID {num(result['fid'], '.4f')}  IS {num(result['inception_score_mean'], '.2f')} "
          f"± {num(result['inception_score_std'], '.2f')}{prc}  ({result['num_images']} images)\n"
          f"[eval] generated {speed['images_generated']} (skipped {speed['images_skipped']} already written) on "
          f"{speed['world_size']} rank(s) x {speed.get('threads_per_rank')} thread(s) in "
          f"{speed['generation_wall_s']:.1f} s: "
          f"{num(speed['images_per_s'], '.2f')} img/s, {num(speed['s_per_image'], '.4f')} s/img (first batch "
          f"excluded); peak memory {num(peak / 2**30 if peak is not None else None, '.2f')} GiB "
          f"({speed['peak_memory_kind']})", flush=True)
    if speed["nonfinite_images"]:
        print(f"[eval] WARNING: {speed['nonfinite_images']} images had non-finite values (written as grey)",
              flush=True)
    if log_writer is not None:
        step = 0 if epoch is None else int(epoch)
        for tag, key in (("eval/fid", "fid"), ("eval/inception_score", "inception_score_mean"),
                         ("eval/precision", "precision"), ("eval/recall", "recall")):
            if result.get(key) is not None:
                log_writer.add_scalar(tag, result[key], step)
        if speed["images_per_s"] is not None:
            log_writer.add_scalar("eval/images_per_s", speed["images_per_s"], step)
        if hasattr(log_writer, "flush"):
            log_writer.flush()
