"""Sample a grid of chosen classes from a TransDiff checkpoint (DiT's sample.py, for this repository).

    python sample.py --resume ckpt/transdiff_l/ --classes 207 360 388 --per_class 4 --seed 0 --out grid.png
    python sample.py --resume output/digits --classes 0 1 2 3 4 5 6 7 8 9 --per_class 8 --out digits.png

--resume takes a run folder, a checkpoint file or a `.safetensors` export (tools/export.py), read by the same
loader as evaluation; the model and its tokenizer (the KL-16 VAE, or a digits run's pixel tokenizer) are rebuilt
from what the checkpoint stores. The sampler settings default to the paper's for a model of a released
architecture (README "Released models") and to the run's own (its stored args) otherwise; flags override both.
The grid has one row per class. Image i (row-major) draws its noise from a generator seeded with
image_seed(--seed, i), as main.py's evaluation does, so it does not depend on --batch_size.
"""
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from diffusion.samplers import SAMPLERS
from models.pretrained import (
    DEFAULT_VAE_PATH,
    FIRST_RELEASE_SAMPLING,
    checkpoint_args,
    load_tokenizer,
    load_transdiff,
    published_sampling,
    size_name,
)
from models.transdiff import compile_model
from util.amp import DTYPES, autocast
from util.cli import HelpFormatter
from util.errors import OneLineParser, UserError
from util.evaluation import (
    SamplingSettings,
    grid,
    grid_title,
    image_seed,
    labelled_grid,
    latent_scale,
    parse_cfg,
    save_png,
    to_uint8,
)
from util.precision import set_tf32

SETTINGS = ("cfg", "scale_0", "scale_1", "num_sampling_steps", "sampler")
RUNS = " (default: the published value, else the run's)"


def get_args_parser():
    p = OneLineParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--resume", required=True, help="run folder, checkpoint-*.pth or .safetensors export")
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--load_step", default=None, help="checkpoint-<step>.pth of a run folder instead of the last")
    p.add_argument("--vae_path", default=None, help=f"KL-16 VAE weights (default: the run's, else {DEFAULT_VAE_PATH})")
    a = p.add_argument_group("images").add_argument
    a("--classes", type=int, nargs="+", required=True, help="class ids, one grid row each")
    a("--per_class", type=int, default=4, help="images per class (grid columns)")
    a("--seed", type=int, default=0, help="image i is seeded from (seed, i), whatever the batch size")
    a("--out", default="samples.png", help="the grid PNG")
    a("--labels", action="store_true", help="write each row's class beside it and the settings above the grid")
    a("--save_dir", default=None, help="also write each image as <index>-class<c>-seed<seed>.png here")
    a = p.add_argument_group("sampler (default: the published settings of a released model, else the run's)")
    a = a.add_argument
    a("--cfg", type=parse_cfg, default=None, help="guidance: one number, or four comma-separated (MRAR)" + RUNS)
    a("--scale_0", type=float, default=None, help="drift scale" + RUNS)
    a("--scale_1", type=float, default=None, help="noise scale" + RUNS)
    a("--num_sampling_steps", "--steps", type=int, default=None, help="network evaluations per image" + RUNS)
    a("--sampler", default=None, choices=SAMPLERS, help="Euler-Maruyama SDE (published), or Euler / Heun ODE" + RUNS)
    a = p.add_argument_group("device").add_argument
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to sample")
    a("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
      help="autocast dtype (default: bf16 on CUDA, fp32 on CPU; docs/evaluation.md)")
    a("--batch_size", type=int, default=32, help="images per sampling batch")
    a("--compile", action="store_true", help="torch.compile the decoder network and the encoder blocks "
                                             "(the first batch takes longer while it compiles)")
    return p


def sampling_settings(model, ckpt, given=None):
    """(settings, where they come from): the published ones for a released architecture, else the run's stored
    args, else main.py's defaults; the non-None entries of `given` override each."""
    published = published_sampling(model)
    if published is not None:
        base, source = published, "the paper's settings for this released architecture"
        first = FIRST_RELEASE_SAMPLING.get((size_name(model.config), bool(model.mrar), int(model.img_size)))
        if first is not None:
            source += (" (the authors' corrected README; the first release gave cfg {}, scale_0 {}, scale_1 {})"
                       .format(*first))
    else:
        args = checkpoint_args(ckpt)
        base = {k: args[k] for k in SETTINGS if args.get(k) not in (None, "")}
        if "num_sampling_steps" in base:  # the released code stores it as a string ('100')
            base["num_sampling_steps"] = int(base["num_sampling_steps"])
        source = "the run's settings"
    settings = {**SamplingSettings().sample_kwargs(), **base}
    overridden = {k: v for k, v in (given or {}).items() if k in SETTINGS and v is not None}
    if overridden:
        source += f", overridden by {', '.join(sorted(overridden))}"
    return {**settings, **overridden}, source


def sample_images(model, tokenizer, labels, settings, seed=0, batch_size=32, dtype=None, progress=True):
    """uint8 images (N, H, W, 3) of classes `labels` (N,), image i from a generator seeded image_seed(seed, i)."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    device = model.fake_latent.device
    scale = latent_scale(tokenizer)
    out = []
    with torch.no_grad(), tqdm(total=len(labels), unit="img", desc="sampling", disable=not progress) as bar:
        for lo in range(0, len(labels), batch_size):
            idx = range(lo, min(lo + batch_size, len(labels)))
            gens = [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in idx]
            with autocast(device, dtype):
                latents = model.samples(labels[lo:lo + len(idx)].to(device), generator=gens, **settings)
                images = tokenizer.decode(latents / scale).float()
            bad = int((~torch.isfinite(images).flatten(1).all(dim=1)).sum())
            if bad:
                print(f"warning: {bad} image(s) had non-finite values; written as grey", file=sys.stderr)
            out.append(to_uint8(torch.nan_to_num(images, nan=0.0, posinf=1.0, neginf=-1.0)))
            bar.update(len(idx))
    return np.concatenate(out)


def sample_grid(model, tokenizer, classes, per_class, settings, seed=0, batch_size=32, dtype=None, progress=True,
                title=None):
    """(images, grid): `per_class` images of each of `classes` (uint8, N x H x W x 3, class-major) and the PIL
    grid with one row per class; given a `title` (util.evaluation.grid_title), each row is labelled with its class."""
    labels = torch.as_tensor(classes, dtype=torch.int64).repeat_interleave(per_class)
    images = sample_images(model, tokenizer, labels, settings, seed, batch_size, dtype, progress)
    if title is None:
        return images, grid(images, len(classes), per_class)
    return images, labelled_grid(images, classes, per_class, title)


def image_name(index, label, seed):
    return f"{index:04d}-class{label}-seed{seed}.png"


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.per_class < 1 or args.batch_size < 1:
        parser.error("--per_class and --batch_size must be at least 1")
    device = torch.device(args.device)
    try:
        model, ckpt = load_transdiff(args.resume, use_ema=not args.raw, step=args.load_step)
        tokenizer = load_tokenizer(ckpt, args.vae_path).to(device)
    except UserError as e:
        parser.error(str(e))
    set_tf32()
    model = model.to(device).eval()
    if args.compile:
        compile_model(model)
    wrong = [c for c in args.classes if not 0 <= c < model.class_num]
    if wrong:
        parser.error(f"--classes {wrong} out of range: the model has classes 0..{model.class_num - 1}")
    settings, source = sampling_settings(model, ckpt, {k: getattr(args, k) for k in SETTINGS})
    print(f"{'MRAR' if model.mrar else '1-Step'} model at {model.img_size} px, {model.class_num} classes; "
          f"{source}: {settings}")

    dtype = SamplingSettings(dtype=args.dtype).for_device(device).dtype
    print(f"sampling in {dtype or 'fp32'}")
    epochs = ckpt.get("epoch") if isinstance(ckpt, dict) else None
    title = grid_title(model.mrar, settings, epochs, not args.raw, args.seed) if args.labels else None
    images, picture = sample_grid(model, tokenizer, args.classes, args.per_class, settings, args.seed, args.batch_size,
                                  DTYPES[dtype], title=title)
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    picture.save(args.out)
    print(f"grid of {len(args.classes)} x {args.per_class} images -> {args.out}")
    if args.save_dir:
        os.makedirs(args.save_dir, exist_ok=True)
        labels = [c for c in args.classes for _ in range(args.per_class)]
        for i, (arr, c) in enumerate(zip(images, labels)):
            save_png(arr, os.path.join(args.save_dir, image_name(i, c, args.seed)))
        print(f"{len(images)} images -> {args.save_dir}")
    return images


if __name__ == "__main__":
    main()
