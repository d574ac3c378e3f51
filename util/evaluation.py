"""The pieces of an evaluation that know no model: its settings, where its images go, how they are checked and
how its result is reported. engine_eval.py runs the evaluation itself (generate the class-balanced image set as
PNGs, then FID / Inception Score) with them.

Layout of one evaluation (``eval_dir``)::

    <output_dir>/eval/<settings>/00000.png ... 49999.png   generated images, named by global image index; kept
    <output_dir>/eval/<settings>/generation.json            what produced them (checked when a run resumes)
    <output_dir>/eval/<settings>/metrics.json               metrics, settings and speed of the latest run
    <output_dir>/eval_results.jsonl                         one line per finished evaluation

Image ``i`` has class ``i // (num_images / class_num)`` and draws all of its randomness from its own generator,
seeded by ``image_seed(seed, i)``. Images are generated in the batches of the folder's plan (consecutive indices,
the ``eval_bsz`` of its first run), whole: at equal threads per process the PNGs are byte-identical on any world
size and after any resume; another batch size or thread count moves some pixel values by a few 1/255
(docs/evaluation.md). The weights' fingerprint is part of a folder's identity: other weights never add images to
it. Running the same command again completes an interrupted set.

Works in one process or under torchrun: ranks share the folder (a shared filesystem across nodes), rank 0 decides
which images are missing and broadcasts it, every rank generates its share and extracts the features of its
share, and every rank scores all of them.
"""
import argparse
import hashlib
import json
import math
import os
import queue
import sys
import threading
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from util.amp import dtype_from_name
from util.checkpoint import atomic_write, remove_stale_temp_files, save_json
from util.errors import UserError

# Released reference statistics per resolution (SPEC §4); relative to the repository root.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_FID_STATS = {
    256: "fid_stats/adm_in256_stats.npz",
    512: "fid_stats/VIRTUAL_imagenet512.npz",
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# Keys of generation.json that must match for a rerun to add images to an existing folder. Not `resume`: a
# training run restarted from its own output_dir re-evaluates the same epoch with a different --resume. The
# weights' fingerprint is checked apart (check_manifest): other weights get a folder of their own.
IDENTITY_KEYS = ("model", "mrar", "img_size", "class_num", "latent_scale")
WEIGHTS_KEY = "weights"
# Autocast while sampling when --eval_dtype / sample.py --dtype is not given: on CUDA, bf16 (benchmarks/
# eval_precision.py, docs/evaluation.md: the digits' accuracy and FD do not move, and bf16 cannot overflow where
# fp16 can); on CPU fp32, where autocast is slower than fp32.
DEFAULT_SAMPLING_DTYPE = {"cuda": "bf16"}


@dataclass(frozen=True)
class SamplingSettings:
    """Everything besides the weights that changes the generated images. Built once from the command line
    (`from_args`); it names the evaluation folder, fills the manifest and the metrics record, and is what
    `model.samples` is called with. main.py takes its flag defaults from these."""
    num_sampling_steps: int = 100
    cfg: Any = 1.0            # one number, or one per MRAR image
    scale_0: float = 1.0      # sampler drift scale
    scale_1: float = 1.0      # sampler noise scale
    sampler: str = "maruyama"
    seed: int = 1             # image i draws from image_seed(seed, i)
    ema: bool = True          # the EMA weights (False: --eval_wo_ema)
    dtype: str | None = None  # autocast while sampling: None (fp32), bf16, fp16

    def __post_init__(self):
        dtype_from_name(self.dtype)  # an unknown name fails here, before any image

    @classmethod
    def from_args(cls, args):
        return cls(int(args.num_sampling_steps), list(args.cfg) if isinstance(args.cfg, (list, tuple)) else
                   float(args.cfg), float(args.scale_0), float(args.scale_1), args.sampler, int(args.seed),
                   not args.eval_wo_ema, args.eval_dtype)

    def for_device(self, device):
        """These settings with the default sampling dtype of `device` when none was chosen."""
        if self.dtype is not None:
            return self
        return replace(self, dtype=DEFAULT_SAMPLING_DTYPE.get(torch.device(device).type))

    @property
    def autocast_dtype(self):
        return dtype_from_name(self.dtype)

    def sample_kwargs(self):
        """The keyword arguments of `Transdiff.samples` (and of sample.py's settings)."""
        return dict(num_sampling_steps=self.num_sampling_steps, cfg=self.cfg, sampler=self.sampler,
                    scale_0=self.scale_0, scale_1=self.scale_1)

    def record(self):
        """For generation.json and metrics.json (the field names of the files written before this class)."""
        out = asdict(self)
        out["eval_dtype"] = out.pop("dtype")
        return out


def parse_cfg(text):
    """--cfg: one number, or four comma-separated numbers (one per MRAR image)."""
    values = [float(v) for v in str(text).split(",")]
    if len(values) not in (1, 4):
        raise argparse.ArgumentTypeError(f"--cfg takes one number or 4 comma-separated numbers, got {text!r}")
    return values[0] if len(values) == 1 else values


# ---------------------------------------------------------------------------------------------------- small helpers
def _fmt(x):
    if isinstance(x, (list, tuple)):
        return "_".join(_fmt(v) for v in x)
    return f"{float(x):g}"


def latent_scale(tokenizer):
    scale = getattr(tokenizer, "scale_factor", None)
    if scale is None:
        raise AttributeError(f"the tokenizer ({type(tokenizer).__name__}) has no `scale_factor`: the model's latents "
                             "are decoded as tokenizer.decode(latents / scale_factor); see models/tokenizers.py")
    return float(scale)


def _index_width(num_images):
    return max(5, len(str(num_images - 1)))


def image_path(out_dir, index, num_images):
    return os.path.join(out_dir, f"{index:0{_index_width(num_images)}d}.png")


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


def weights_fingerprint(*modules):
    """A 16-hex-digit digest of the names, dtypes, shapes and bytes of every tensor of `modules` (the generating
    weights and the tokenizer): images of other weights are never mixed into one folder. SHA-256, the fastest
    hash of hashlib where CPUs have SHA instructions: about 2 s of CPU for TransDiff-L (docs/evaluation.md)."""
    h = hashlib.sha256()
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            continue
        for name, t in module.state_dict().items():
            t = t.detach()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


def eval_folder_name(args, epoch=None, model=None, sampling=None):
    """Folder name holding every setting that changes the images, e.g.
    ``transdiff_large-res256-steps100-maruyama-cfg1.3-s00.89-s10.95-n50000-seed1-ema-ep799``.

    The MRAR flag comes from `model` when given (the checkpoint decides it), else from ``args.mrar``; the sampling
    settings from `sampling`, else from `args`."""
    s = sampling or SamplingSettings.from_args(args)
    parts = [str(args.model)] if args.model else []
    if model.mrar if model is not None else args.mrar:
        parts.append("mrar")
    parts += [f"res{int(args.img_size)}", f"steps{s.num_sampling_steps}", s.sampler, f"cfg{_fmt(s.cfg)}",
              f"s0{_fmt(s.scale_0)}", f"s1{_fmt(s.scale_1)}", f"n{int(args.num_images)}", f"seed{s.seed}",
              "ema" if s.ema else "noema"]
    if s.autocast_dtype is not None:
        parts.append(str(s.dtype).lower())
    if epoch is not None:
        parts.append(f"ep{int(epoch)}")
    return "-".join(parts)


def eval_dir(args, epoch=None, model=None, sampling=None):
    return os.path.join(args.output_dir, "eval", eval_folder_name(args, epoch, model, sampling))


# ---------------------------------------------------------------------------------------------------- image files
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
    """Indices whose PNG is absent or incomplete, in order; deletes stale temporary files of killed runs (call it
    holding the folder, util.runlock)."""
    remove_stale_temp_files(out_dir)
    names = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    width = _index_width(num_images)
    return [i for i in range(num_images)
            if f"{i:0{width}d}.png" not in names or not is_complete_png(image_path(out_dir, i, num_images), img_size)]


def to_uint8(images):
    """(B, 3, H, W) decoder output in about [-1, 1] -> (B, H, W, 3) uint8, rounded as MAR does."""
    images = (images.float() + 1) / 2
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    return np.round(np.clip(arr * 255, 0, 255)).astype(np.uint8)


def save_png(array, path):
    """Atomically: a killed run never leaves half a PNG under the final name."""
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def grid(images, rows, cols, pad=2):
    """uint8 (rows*cols, H, W, 3) -> one PIL image, row r holding images r*cols .. r*cols+cols-1; grey when
    the images are (a third of the file size)."""
    _, h, w, c = images.shape
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
    grey = bool((canvas == canvas[..., :1]).all())
    return Image.fromarray(canvas[..., 0] if grey else canvas)


def grid_title(mrar, settings, epoch=None, ema=True, seed=None):
    """What a grid shows, in one line: mode, the sampler `settings` (`Transdiff.samples` keywords), the
    training epochs of the checkpoint (which stores the index of its last epoch), the weights and the seed."""
    cfg = settings["cfg"]
    cfg = ",".join(f"{c:g}" for c in cfg) if isinstance(cfg, (list, tuple)) else f"{cfg:g}"
    parts = [f"class per row; {'MRAR' if mrar else '1-Step'}", f"cfg {cfg}",
             f"{settings['num_sampling_steps']} {settings['sampler']} steps"]
    parts += [] if epoch is None else [f"{int(epoch) + 1} epochs"]
    parts += [f"{'EMA' if ema else 'raw'} weights"] + ([] if seed is None else [f"seed {seed}"])
    return ", ".join(parts)


def _wrap(text, font, width):
    """Lines of `text` cut at its commas, each as wide as fits in `width` pixels (a wider part stays whole)."""
    lines = []
    for part in text.split(", "):
        joined = f"{lines[-1]}, {part}" if lines else part
        if lines and font.getbbox(joined)[2] <= width:
            lines[-1] = joined
        else:
            lines.append(part)
    return lines


def labelled_grid(images, row_labels, cols, title, pad=2):
    """`grid` with each row's label at its left and `title` above: what a grid shows, readable without its
    command. The text is scaled to the images' side (half of it, within 10..24 px)."""
    picture = grid(images, len(row_labels), cols, pad)
    side = images.shape[1]
    font = ImageFont.load_default(size=max(10, min(24, side // 2)))
    label_w = max(font.getbbox(str(lab))[2] for lab in row_labels) + 3 * pad
    lines = _wrap(title, font, label_w + picture.width - 2 * pad)
    line_h = font.getbbox("Ag")[3] + pad
    width = max(label_w + picture.width, max(font.getbbox(line)[2] for line in lines) + 2 * pad)
    title_h = len(lines) * line_h + pad
    canvas = Image.new(picture.mode, (width, title_h + picture.height), "white")
    canvas.paste(picture, (label_w, title_h))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * line_h), line, fill="black", font=font)
    for r, lab in enumerate(row_labels):
        draw.text((label_w - pad, title_h + pad + r * (side + pad) + side // 2), str(lab), fill="black", font=font,
                  anchor="rm")
    return canvas


class OtherWeightsError(UserError, RuntimeError):
    """The folder holds images of other weights of the same kind of model."""


def check_manifest(out_dir, manifest):
    """Refuse to add images to a folder that another kind of model started (B and B-MRAR share their published
    sampling settings, and the published commands may share an output_dir), or other weights
    (OtherWeightsError, naming both); a new folder gets the manifest. Returns the folder's manifest: its
    `eval_bsz` is the batch plan every rerun follows."""
    path = os.path.join(out_dir, "generation.json")
    if not os.path.exists(path):
        save_json(path, manifest)
        return manifest
    with open(path) as f:
        old = json.load(f)
    diff = {k: (old.get(k), manifest[k]) for k in IDENTITY_KEYS if old.get(k) != manifest[k]}
    if diff:
        what = "; ".join(f"{k}: folder has {a!r}, this run {b!r}" for k, (a, b) in diff.items())
        raise RuntimeError(f"{out_dir} holds images of another model ({what}). Refusing to mix "
                           "them: use another --output_dir, or delete that folder to regenerate.")
    if old.get(WEIGHTS_KEY) != manifest[WEIGHTS_KEY]:
        raise OtherWeightsError(
            f"{out_dir} holds images of other weights (fingerprint {old.get(WEIGHTS_KEY) or 'not recorded'}, "
            f"from {old.get('resume') or 'the training run'}) than this run's ({manifest[WEIGHTS_KEY]}, from "
            f"{manifest.get('resume') or 'the training run'}): use another --output_dir, or delete that folder")
    return old


def planned_batches(missing, num_images, batch_size):
    """The batches of the folder's plan (consecutive image indices, `batch_size` each) that hold a missing
    image: a batch's float results depend on its shape and members, so only a batch regenerated whole gives
    back the bytes an uninterrupted run wrote, on any world size."""
    todo = sorted({i // batch_size for i in missing})
    return [range(k * batch_size, min((k + 1) * batch_size, num_images)) for k in todo]


class PngWriter:
    """Writes PNGs (save_png: atomic) from a worker thread while the caller generates the next batch; at most
    `max_pending` images wait, so memory stays bounded. One thread keeps up with a GPU (benchmarks/
    png_writer.py) and writes in order, so that a killed run leaves every batch but the last ones whole. The
    first error stops the writes still queued and is raised by the next `put` or by `close`."""

    def __init__(self, max_pending, threads=1):
        self._queue = queue.Queue(maxsize=max(1, int(max_pending)))
        self._error = None
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(int(threads))]
        for t in self._threads:
            t.start()

    def _work(self):
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    save_png(*item)  # looked up at call time: tests replace it
                except BaseException as e:  # a KeyboardInterrupt too: the caller re-raises it
                    self._error = e
            self._queue.task_done()
        self._queue.task_done()

    def _raise(self):
        if self._error is not None:
            raise self._error

    def put(self, array, path):
        self._raise()
        self._queue.put((array, path))  # blocks while max_pending images wait

    def close(self):
        """Wait for every queued image; raise the first error."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._raise()


def check_reference_images(ref_dir, files):
    """Decode every reference image before any is generated: one unreadable file ends the run in seconds, naming
    it, not after hours of sampling."""
    for path in files:
        try:
            with Image.open(path) as im:
                im.convert("RGB").load()
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(f"FID reference image {path} in --fid_ref_dir {ref_dir} cannot be read "
                            f"({type(e).__name__}: {e}): replace or delete it") from None


def check_folder(out_dir, n):
    width = _index_width(n)
    pngs = {f for f in os.listdir(out_dir) if f.lower().endswith(".png")}
    expected = {f"{i:0{width}d}.png" for i in range(n)}
    if pngs != expected:
        lack, extra = sorted(expected - pngs), sorted(pngs - expected)
        raise RuntimeError(f"{out_dir} should hold exactly images 0..{n - 1}: missing {lack[:5]} ({len(lack)}), "
                           f"unexpected {extra[:5]} ({len(extra)})")


def peak_memory(device):
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    try:
        import resource
    except ImportError:  # not on Windows
        return None, None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_max_rss"


# ---------------------------------------------------------------------------------------------------- metrics
def resolve_fid_reference(args):
    """(ref_stats, ref_dir): exactly one is set. Raises before any image is generated when neither is usable."""
    stats, ref_dir = args.fid_stats, args.fid_ref_dir
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
        stats = default if os.path.exists(default) else os.path.join(REPO_ROOT, default)
    if not os.path.isfile(stats):
        raise FileNotFoundError(f"FID statistics {stats!r} not found. fid_stats/README.md says how to obtain or "
                                "make it (tools/make_fid_stats.py); or pass --fid_stats PATH / --fid_ref_dir DIR, "
                                "or --skip_metrics to only generate")
    return stats, None


def report(result, log_writer, epoch):
    """Print an evaluation's result and speed; log its metrics to TensorBoard when a writer is given."""
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
