"""Cache VAE posterior moments of an ImageFolder for --use_cached training.

    torchrun --nproc_per_node=8 main_cache.py --img_size 256 --vae_path ckpt/vae/kl16.ckpt --vae_embed_dim 16 \\
        --batch_size 128 --data_path ${IMAGENET_PATH} --cached_path ${CACHED_PATH}

Each image gets `<cached_path>/<class>/<file name>.npz` (the layout MAR uses) holding `moments` and
`moments_flip`: the float32 posterior parameters (mean || logvar, (2C, h, w)) of its ADM centre crop and
of the mirrored crop. Files are split across ranks, written atomically, and existing ones are skipped, so
an interrupted run is resumed by running the same command again.
"""
import argparse
import os

import torch

import engine_transdiff as engine
from models import tokenizers
from models.tokenizers import FINGERPRINT_NAME, add_tokenizer_args, build_tokenizer, check_tokenizer_args
from util import data, runlock
from util.cli import HelpFormatter
from util.distributed import all_reduce_sum, barrier, cleanup, init_distributed
from util.errors import OneLineParser, exit_on_user_error
from util.logger import setup_logger

PROG = os.path.basename(__file__)


def get_args_parser():
    p = OneLineParser(PROG, description="Cache VAE latents (image and mirror moments)", allow_abbrev=False,
                      formatter_class=HelpFormatter)
    a = p.add_argument_group("model").add_argument
    a("--img_size", type=int, default=256, help="image side in pixels (the training run's --img_size)")
    add_tokenizer_args(a)
    a = p.add_argument_group("data").add_argument
    a("--data_path", default="./data/imagenet", help="ImageNet root holding train/ (or an ImageFolder)")
    a("--cached_path", required=True, help="output folder: one .npz per image, the source tree's layout")
    a("--batch_size", type=int, default=128, help="images per process and batch")
    a("--num_workers", type=int, default=None, help="data loader workers per process (default: 10, at most the "
                                                    "CPU cores per process)")
    a("--pin_mem", action=argparse.BooleanOptionalAction, default=True, help="page-locked batches on CUDA")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when present")
    return p


def check_args(parser, args):
    args.workers_note = None
    if args.num_workers is None:
        args.num_workers, args.workers_note = data.default_num_workers()
    if args.batch_size < 1 or args.num_workers < 0 or args.pixel_patch < 1:
        parser.error("--batch_size and --pixel_patch must be at least 1 and --num_workers not negative")
    why = check_tokenizer_args(args)
    if why:
        parser.error(why)
    stride, _ = tokenizers.tokenizer_geometry(args)
    if args.img_size % stride:
        parser.error(f"--img_size {args.img_size} is not a multiple of the tokenizer stride {stride} (--tokenizer "
                     f"{args.tokenizer}" + (", --pixel_patch)" if args.tokenizer == "pixel" else ")"))
    if not os.path.isdir(args.data_path):
        parser.error(f"--data_path {args.data_path} is not a folder")
    if os.path.exists(args.cached_path) and not os.path.isdir(args.cached_path):
        parser.error(f"--cached_path {args.cached_path} is a file, not a folder")
    args.fingerprint = tokenizers.tokenizer_fingerprint(args)
    args.recorded, args.change = tokenizers.cache_tokenizer_change(args.cached_path, args.fingerprint)
    if args.change and not args.allow_tokenizer_change:
        parser.error(f"{args.cached_path} holds latents of another tokenizer ({args.change}): give the --tokenizer, "
                     f"--vae_path and --img_size it was made with, another --cached_path, or "
                     f"--allow_tokenizer_change to encode every image again with this one")
    return args


def main(args):
    dist = init_distributed(args.device)
    lock = None
    try:
        log = setup_logger(None, dist.rank)
        root = data.resolve_train_dir(args.data_path)
        items = data.scan_folder(root, data.find_classes(root), data.IMG_EXTENSIONS)
        outs = [os.path.join(args.cached_path, os.path.relpath(path, root) + ".npz") for path, _ in items]
        lock, notes = runlock.hold_folder(args.cached_path, "latent caching",
                                          sorted({os.path.dirname(o) for o in outs}))
        for note in notes + ([args.workers_note] if args.workers_note else []):
            log.info(note)
        mine = [i for i in range(dist.rank, len(items), dist.world_size)]
        # another tokenizer's latents are all encoded again; the fingerprint changes once they are
        todo = mine if args.change else [i for i in mine if not os.path.exists(outs[i])]
        if args.change:
            log.info(f"encoding all {len(items)} images again: the tokenizer changed ({args.change}); until this "
                     f"run ends, {FINGERPRINT_NAME} names the old one")
        elif dist.is_main:
            if args.recorded is None and len(todo) < len(mine):
                log.info(f"{args.cached_path} records no tokenizer ({FINGERPRINT_NAME}: an older main_cache.py): "
                         f"its latents are kept and it is recorded as made with this one")
            tokenizers.write_fingerprint(args.cached_path, args.fingerprint)
        for folder in sorted({os.path.dirname(outs[i]) for i in todo}):
            os.makedirs(folder, exist_ok=True)
        log.info(f"{len(items)} images under {root} -> {args.cached_path} at {args.img_size} px, --tokenizer "
                 f"{args.tokenizer}, {dist.world_size} processes")
        source = data.CacheSource([items[i][0] for i in todo], args.img_size)
        loader = torch.utils.data.DataLoader(source, batch_size=args.batch_size, num_workers=args.num_workers,
                                             pin_memory=args.pin_mem and dist.device.type == "cuda")
        tokenizer = build_tokenizer(args).to(dist.device)
        written, unreadable = engine.cache_latents(tokenizer, loader, [outs[i] for i in todo], dist.device,
                                                   show_progress=dist.is_main)
        counts = all_reduce_sum(torch.tensor([len(mine) - len(todo), written, unreadable], device=dist.device))
        present, written, unreadable = counts.tolist()
        present = 0 if args.change else present
        log.info(f"done: {written} written, {present} already cached, {unreadable} unreadable images skipped")
        barrier()
        if args.change and dist.is_main:
            tokenizers.write_fingerprint(args.cached_path, args.fingerprint)
    finally:
        runlock.release(lock)
        cleanup()


def cli(argv=None):
    parser = get_args_parser()
    args = check_args(parser, parser.parse_args(argv))
    with exit_on_user_error(PROG):
        main(args)


if __name__ == "__main__":
    cli()
