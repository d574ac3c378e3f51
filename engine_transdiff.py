"""The run: build it, train it (epoch loop, steps, saves, online evaluation), evaluate a checkpoint, cache
latents; one engine for 1-Step and MRAR. main.py parses and checks the command line, then calls `train` or
`evaluate` here.

A `Run` holds what a training run is made of (models, optimizer, data, position); `build_run` makes it whole.
Progress is counted in optimizer steps and in samples (an MRAR sample is a row of four images); the lr schedule
follows the fractional epoch, so a run resumed on another world size stays on the same schedule.
"""
import argparse
import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from models.pretrained import (
    CheckpointError,
    adapt_state_dict,
    check_compatible,
    check_tokenizer,
    checkpoint_args,
    infer_config,
    mode_from_shapes,
    pick_weights,
    read_checkpoint,
    resolve_checkpoint_path,
)
from models.tokenizers import latents_from_moments, tokenizer_geometry
from models.transdiff import build_model, check_label_range, compile_model
from util import data, distributed, preemption
from util import evaluation as ev
from util.amp import autocast, training_precision
from util.checkpoint import (
    LAST,
    atomic_write,
    capture_rng,
    checkpoint_name,
    restore_rng,
    save_checkpoint,
    seed_everything,
)
from util.distributed import all_gather_object, all_reduce_sum
from util.errors import UserError
from util.evaluation import SamplingSettings
from util.logger import MetricsLog, get_logger
from util.lr_sched import adjust_learning_rate
from util.optim import EMA, WARMUP_OFFSET, build_adamw, short_run_warning

log = get_logger()


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainState:
    epoch: int = 0            # epoch in progress (= epochs completed when samples_in_epoch is 0)
    samples_in_epoch: int = 0  # samples of `epoch` consumed by all ranks together
    step: int = 0             # optimizer steps taken
    images_seen: int = 0
    train_seconds: float = 0.0  # wall time spent in optimizer steps (data loading included), summed over resumes
    epoch_loss_sum: float = 0.0  # over the optimizer steps of `epoch` so far, resumes included: the epoch's loss
    epoch_loss_steps: int = 0
    skipped_steps: int = 0    # optimizer steps that loss scaling skipped (an fp16 overflow), resumes included
    skipped_in_a_row: int = 0


@dataclass
class Run:
    args: Any
    dist: Any
    model: torch.nn.Module      # what forward goes through (DDP-wrapped when distributed)
    raw: torch.nn.Module        # the unwrapped model
    ema: Any
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: Any = None
    tokenizer: Any = None
    dataset: Any = None
    sampler: Any = None
    loader: Any = None
    state: TrainState = field(default_factory=TrainState)
    samples_per_step: int = 1   # global: batch_size * world_size * gradient_accumulation_steps
    steps_per_epoch: int = 1
    metrics: Any = None         # MetricsLog on rank 0
    writer: Any = None          # TensorBoard on rank 0
    rng_states: Any = None      # per-rank RNG states of the checkpoint resumed from
    sampling: SamplingSettings = field(default_factory=SamplingSettings)  # of its evaluations and reports
    requests: Any = field(default_factory=preemption.StepRequests)  # stop / save, agreed by the ranks each step

    @property
    def epoch_samples(self):
        return self.steps_per_epoch * self.samples_per_step


# ------------------------------------------------------------------ building the run
def model_kwargs(args):
    """Transdiff keyword arguments of the command line (the size's own on top of MODEL_SIZES)."""
    vae_stride, vae_embed_dim = tokenizer_geometry(args)
    kw = dict(img_size=args.img_size, patch_size=args.patch_size, vae_embed_dim=vae_embed_dim,
              vae_stride=vae_stride, label_drop_prob=args.label_drop_prob,
              class_num=args.class_num, attn_dropout=args.attn_dropout, proj_dropout=args.proj_dropout,
              buffer_size=args.buffer_size, diffusion_batch_mul=args.diffusion_batch_mul,
              grad_checkpointing=args.grad_checkpointing, mrar=args.mrar, decoder=args.decoder)
    if args.diffloss_w is not None:
        kw["decoder_embed_dim"] = args.diffloss_w
    if args.diffloss_d is not None:
        kw["decoder_depth"] = args.diffloss_d
    return kw


def condition_count(args, sd):
    """A 1-Step encoder keeps the condition count it was trained with (256 at 256 and at 512 px)."""
    if args.mrar:
        return {}
    return {"num_conditions": infer_config(sd, args.vae_embed_dim, mrar=False).get("num_conditions")}


def set_trainable(model, args):
    """Freeze what must not train; returns the names to keep out of the optimizer.

    `z_proj` is unused in 1-Step and `fake_latent` without label dropout: frozen, DDP needs no search for
    unused parameters. --only_train_diff freezes everything outside the diffusion decoder."""
    excluded = set()
    for name, p in model.named_parameters():
        encoder_side = not name.startswith("diffdecoder.")
        if args.only_train_diff and encoder_side:
            p.requires_grad_(False)
            excluded.add(name)
        elif (name.startswith("z_proj.") and not model.mrar) or (name == "fake_latent" and args.label_drop_prob <= 0):
            p.requires_grad_(False)
    return excluded


def amp_settings(args, device):
    """--amp (--bf16 is --amp bf16); by default fp16 autocast + loss scaling on CUDA, fp32 elsewhere."""
    return training_precision(args.amp, device)


@torch.no_grad()
def to_latents(x, tokenizer, use_cached):
    """Scaled latents for images (..., 3, H, W) or cached moments (..., 2C, h, w); leading dims kept."""
    lead, flat = x.shape[:-3], x.reshape(-1, *x.shape[-3:])
    if use_cached:
        z = latents_from_moments(flat.float(), tokenizer.scale_factor)
    else:
        z = tokenizer.encode(flat).sample() * tokenizer.scale_factor
    return z.reshape(*lead, *z.shape[1:])


def build_data(args, dist):
    """(dataset, resumable sampler, loader, class names) of the training data."""
    seed = args.seed
    if args.mrar:
        root = args.cached_path if args.use_cached else data.resolve_train_dir(args.data_path)
        dataset, classes = data.mrar_dataset(args.mrar_index, root, args.class_num, seed, args.img_size,
                                             cached=args.use_cached, hflip=args.hflip,
                                             in_memory=getattr(args, "images_in_memory", False))
    elif args.use_cached:
        dataset, classes = data.cached_folder(args.cached_path, args.class_num, seed, hflip=args.hflip)
    else:
        dataset, classes = data.image_folder(args.data_path, args.img_size, args.class_num, seed, hflip=args.hflip,
                                             in_memory=getattr(args, "images_in_memory", False))
    if args.use_cached:  # a cache of another resolution or tokenizer must not train silently
        x = dataset[0][0]
        stride, embed_dim = tokenizer_geometry(args)
        want = (2 * embed_dim, args.img_size // stride, args.img_size // stride)
        if tuple(x.shape[-3:]) != want:
            raise UserError(f"cached latents in {args.cached_path} have shape {tuple(x.shape[-3:])}, --img_size "
                            f"{args.img_size} needs {want}: run main_cache.py with this --img_size")
    try:  # on the host, once: in the model a device-side check would cost a sync per step
        check_label_range([label for _, label in dataset.items], args.class_num)
    except ValueError as e:
        raise UserError(f"the training data of {args.cached_path if args.use_cached else args.data_path}: {e}; "
                        f"raise --class_num") from None
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


def build_run(args, dist, tokenizer, writer):
    """The whole run: the model (from the start checkpoint when there is one), EMA, optimizer, data, position."""
    start = find_start_checkpoint(args)
    if len(set(all_gather_object(start))) > 1:
        raise CheckpointError("the processes do not agree on the checkpoint to start from: --output_dir and "
                              "--resume must be on a filesystem that every node sees")
    ckpt = read_checkpoint(start) if start else None
    if ckpt is not None and getattr(args, "tokenizer_fingerprint", None):
        check_tokenizer(ckpt, args.tokenizer_fingerprint, start, args.allow_tokenizer_change, log=log.info)
    kw = {**model_kwargs(args), **(condition_count(args, ckpt["model"]) if ckpt else {})}
    model = build_model(args.model, **kw).to(dist.device)
    excluded = set_trainable(model, args)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"{args.model}{' MRAR' if args.mrar else ''} at {args.img_size} px: "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {n_train / 1e6:.2f} M trained")
    if args.mrar and args.patch_size != 1:
        log.info(f"--patch_size {args.patch_size}: MRAR decodes single latent cells (patch 1), as released")
    amp_dtype, scaler = amp_settings(args, dist.device)
    ema = EMA(model, args.ema_rate, args.ema_warmup and args.ema_warmup_offset)
    optimizer = build_adamw(model, args.lr, args.weight_decay, excluded)
    dataset, sampler, loader, classes = build_data(args, dist)
    steps_per_epoch = len(loader) // args.gradient_accumulation_steps
    log.info(f"{len(dataset)} {'MRAR rows' if args.mrar else 'samples'} of {len(classes)} classes; "
             f"{steps_per_epoch} optimizer steps of {args.eff_batch_size} per epoch; lr {args.lr:.3g}; "
             f"{'bf16' if amp_dtype == torch.bfloat16 else 'fp16' if amp_dtype else 'fp32'} on {dist.device}")
    state, rng_states = TrainState(), None
    if ckpt is not None:
        state, rng_states = load_start(args, start, ckpt, model, ema, optimizer, scaler, steps_per_epoch,
                                       args.eff_batch_size)
    if args.compile:  # the whole training forward, in place: parameter names (and checkpoints) stay as they are
        model.compile()
    wrapped = model
    if distributed.is_initialized():
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        # gradients live in DDP's communication buckets: one copy of them less (2.7 GB at L in fp32)
        wrapped = DDP(model, device_ids=ids, output_device=ids[0] if ids else None, forward_sync_buffers=False,
                      gradient_as_bucket_view=True)
    return Run(args=args, dist=dist, model=wrapped, raw=model, ema=ema, optimizer=optimizer, scaler=scaler,
               amp_dtype=amp_dtype, tokenizer=tokenizer, dataset=dataset, sampler=sampler, loader=loader, state=state,
               samples_per_step=args.eff_batch_size, steps_per_epoch=steps_per_epoch,
               metrics=MetricsLog(args.output_dir, resume_step=state.step) if dist.is_main else None,
               writer=writer if dist.is_main else None, rng_states=rng_states,
               sampling=SamplingSettings.from_args(args), requests=preemption.StepRequests(args.save_every_minutes))


# ------------------------------------------------------------------ checkpoints
def find_start_checkpoint(args):
    """Which checkpoint a training run starts from (None: from scratch), by the rules in README.md."""
    own = os.path.join(args.output_dir, LAST)
    if args.load_step is not None:
        return resolve_checkpoint_path(args.resume, args.load_step)
    if os.path.isfile(own):
        if args.resume and not _same_path(args.resume, args.output_dir):
            log.info(f"--output_dir holds {LAST}: continuing this run (--resume {args.resume} only starts a new one)")
        return own
    if args.resume:
        if not os.path.exists(args.resume):
            raise CheckpointError(f"--resume {args.resume} does not exist")
        if os.path.isdir(args.resume) and _same_path(args.resume, args.output_dir):
            log.info(f"no checkpoint in {args.output_dir} yet: starting from scratch")
            return None
        return resolve_checkpoint_path(args.resume)
    return None


def _same_path(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def load_start(args, path, ckpt, raw, ema, optimizer, scaler, steps_per_epoch, samples_per_step):
    """Load the start checkpoint into the run's parts: a full resume when it fits the model exactly, else a
    fine-tuning start (1-Step -> MRAR, 256 -> 512 px) from its EMA weights with a fresh optimizer at epoch 0.
    Returns (TrainState, the per-rank RNG states to restore or None)."""
    own = _same_path(os.path.dirname(os.path.abspath(path)), args.output_dir)
    try:
        check_compatible(raw, ckpt["model"], source=f"checkpoint {path}")
    except CheckpointError as e:
        if own:
            raise CheckpointError(f"{e} --output_dir already holds a run of another configuration; use a new "
                                  f"--output_dir") from None
        sd, notes = adapt_state_dict(pick_weights(ckpt, use_ema=True), raw)
        raw.load_state_dict(sd, strict=True)
        ema.load_state_dict(sd)
        which = "EMA weights (model_ema)" if isinstance(ckpt.get("model_ema"), dict) else "weights (model)"
        log.info(f"fine-tuning start from the {which} of {path}, for both model and EMA; fresh optimizer, epoch 0")
        for note in notes:
            log.info(f"  adapted: {note}")
        return TrainState(), None
    raw.load_state_dict(ckpt["model"], strict=True)
    # the run goes on with the EMA warm-up it started with (off for runs older than the flag): exact resume
    planned = checkpoint_args(ckpt)
    started_with = bool(planned.get("ema_warmup", False)), float(planned.get("ema_warmup_offset", WARMUP_OFFSET))
    if started_with[0] != args.ema_warmup or (args.ema_warmup and started_with[1] != args.ema_warmup_offset):
        how = f"on (offset {started_with[1]:g})" if started_with[0] else "off"
        log.info(f"{path}: the run started with the EMA warm-up {how} and goes on so (a new --output_dir starts a "
                 f"run with the --ema_warmup and --ema_warmup_offset given)")
    args.ema_warmup, args.ema_warmup_offset = started_with
    ema.warmup = args.ema_warmup and args.ema_warmup_offset
    plan = (planned.get("epochs"), planned.get("lr_cooldown", 0.0))
    if (plan[1] or args.lr_cooldown) and plan != (args.epochs, args.lr_cooldown):
        log.info(f"{path}: the run planned --epochs {plan[0]} with --lr_cooldown {plan[1]}; its learning rate "
                 f"now follows --epochs {args.epochs} with --lr_cooldown {args.lr_cooldown} (the cool-down is "
                 f"the last part of the new plan)")
    if isinstance(ckpt.get("model_ema"), dict):
        check_compatible(raw, ckpt["model_ema"], source=f"model_ema of {path}")
        ema.load_state_dict(ckpt["model_ema"])
    else:
        log.info(f"{path} holds no model_ema: the EMA restarts from the model weights")
        ema.load_state_dict(ckpt["model"])
    if "optimizer" in ckpt:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:
            raise CheckpointError(f"the optimizer state in {path} does not fit this run's parameter groups ({e}); "
                                  f"was --only_train_diff changed?") from None
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    ts = ckpt.get("train_state")
    if ts:
        state = TrainState(**{k: ts.get(k, v) for k, v in asdict(TrainState()).items()})
    else:  # a released checkpoint: `epoch` is the last completed epoch
        epoch = int(ckpt.get("epoch", -1)) + 1
        state = TrainState(epoch=epoch, step=epoch * steps_per_epoch,
                           images_seen=epoch * steps_per_epoch * samples_per_step)
    ema.updates = state.step
    log.info(f"resumed from {path}: epoch {state.epoch}, {state.samples_in_epoch} samples into it, "
             f"optimizer step {state.step}, {state.images_seen / 1000:.1f} kimg seen")
    return state, ckpt.get("rng")


def restore_rng_states(run):
    """Per-rank RNG of the checkpoint, when it was written by the same world size."""
    states = run.rng_states
    if not states:
        return
    if len(states) != run.dist.world_size:
        log.warning(f"the checkpoint's RNG states are of {len(states)} ranks, this run has "
                    f"{run.dist.world_size}: random draws differ from an uninterrupted run")
        return
    restore_rng(states[run.dist.rank], run.dist.device)


def save(run, epochs_done=None):
    """checkpoint-last.pth (and checkpoint-<epochs_done>.pth); collective: every rank must call it."""
    rng = all_gather_object(capture_rng(run.dist.device))
    run.requests.saved()
    if not run.dist.is_main:
        return
    st = run.state
    payload = {"model": run.raw.state_dict(), "model_ema": run.ema.state_dict(run.raw),
               "optimizer": run.optimizer.state_dict(), "epoch": st.epoch - 1, "args": run.args,
               "scaler": run.scaler.state_dict(),
               "train_state": {**asdict(st), "world_size": run.dist.world_size}, "rng": rng}
    names = [LAST] + ([checkpoint_name(epochs_done)] if epochs_done is not None else [])
    for name in names:
        save_checkpoint(os.path.join(run.args.output_dir, name), payload)
    log.info(f"saved {', '.join(names)} (epoch {st.epoch}, step {st.step})")


# ------------------------------------------------------------------ training
def train_step(run, micro_batches):
    """One optimizer step over `gradient_accumulation_steps` micro-batches of (latents, labels).

    Each loss is divided by the step count and DDP syncs gradients only on the last backward, so the update
    equals one step on the whole batch. Every rank agrees on finiteness before the update; a non-finite loss
    raises the same error on all of them, except under loss scaling (fp16), where the step is skipped
    (`skip_overflowed_step`). The same all-reduce carries the ranks' stop and save requests (run.requests).
    Returns (loss averaged over ranks, NaN for a skipped step; gradient norm)."""
    args, accum = run.args, run.args.gradient_accumulation_steps
    device = run.dist.device
    loss_sum = torch.zeros((), device=device)
    for m, (latents, labels) in enumerate(micro_batches):
        no_sync = isinstance(run.model, DDP) and m < accum - 1
        with run.model.no_sync() if no_sync else contextlib.nullcontext():
            with autocast(device, run.amp_dtype):
                loss = run.model(latents, labels)
            run.scaler.scale(loss / accum).backward()
        loss_sum += loss.detach().float()
    run.scaler.unscale_(run.optimizer)
    params = [p for p in run.raw.parameters() if p.grad is not None]
    clip = args.grad_clip if args.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.zeros((), device=device)
    flags = torch.stack([loss_sum / accum, (~torch.isfinite(loss_sum)).float(),
                         (~torch.isfinite(grad_norm)).float() * (not run.scaler.is_enabled())])
    flags = torch.cat([flags, run.requests.local(device)])
    loss, bad_loss, bad_grad, *asked = all_reduce_sum(flags).tolist()
    run.requests.agree(asked)
    if bad_loss and run.scaler.is_enabled():
        skip_overflowed_step(run, int(bad_loss))
        return math.nan, float(grad_norm)
    if bad_loss or bad_grad:
        what = f"non-finite loss on {int(bad_loss)} of {run.dist.world_size} ranks" if bad_loss else \
            "non-finite gradient norm"
        raise NonFiniteLossError(f"{what} at epoch {run.state.epoch}, optimizer step {run.state.step + 1}: "
                                 f"training stopped on every rank; the checkpoints on disk are untouched")
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if scale is not None and run.scaler.get_scale() < scale:  # the scaler skipped it: gradients overflowed
        count_skipped_step(run, "non-finite gradients")
        return loss / run.dist.world_size, float(grad_norm)
    run.state.skipped_in_a_row = 0
    run.ema.update(run.raw)
    return loss / run.dist.world_size, float(grad_norm)


def skip_overflowed_step(run, ranks):
    """A non-finite loss under loss scaling: the forward pass overflowed in fp16. Skip the update and lower the
    scale on every rank, as the scaler does for an overflow in the gradients."""
    scaler = run.scaler
    scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
    scaler.load_state_dict({**scaler.state_dict(), "_growth_tracker": 0})  # growth counts from here, as after
    run.optimizer.zero_grad(set_to_none=True)                               # any other skipped step
    count_skipped_step(run, f"non-finite loss on {ranks} of {run.dist.world_size} ranks")


def count_skipped_step(run, why):
    """Count a step that loss scaling skipped; --max_skipped_steps of them in a row stop the run."""
    st, limit = run.state, run.args.max_skipped_steps
    st.skipped_steps += 1
    st.skipped_in_a_row += 1
    log.warning(f"optimizer step {st.step + 1} skipped ({why}): loss scale now {run.scaler.get_scale():g}, "
                f"{st.skipped_in_a_row} skipped in a row, {st.skipped_steps} in all")
    if st.skipped_in_a_row >= limit:
        raise NonFiniteLossError(f"{st.skipped_in_a_row} optimizer steps in a row skipped under fp16 loss scaling "
                                 f"(--max_skipped_steps {limit}), the last for {why}, at epoch {st.epoch}, optimizer "
                                 f"step {st.step + 1}: the model overflows fp16; train with --bf16 (or --amp fp32). "
                                 f"The checkpoints on disk are untouched")


def train_one_epoch(run, epoch):
    """Train (the rest of) `epoch`. Returns False when --max_train_steps stopped the run."""
    args, st, dev = run.args, run.state, run.dist.device
    accum, per_image = args.gradient_accumulation_steps, 4 if args.mrar else 1
    if args.max_train_steps and st.step >= args.max_train_steps:  # the same command run again: nothing to add
        log.info(f"--max_train_steps {args.max_train_steps} already reached (step {st.step}): not training")
        return False
    run.dataset.set_epoch(epoch)
    run.sampler.set_epoch(epoch, st.samples_in_epoch)
    steps = len(run.loader) // accum
    run.model.train()
    batches = iter(run.loader)
    skipped = torch.zeros((), dtype=torch.long)
    data_wait = 0.0  # seconds waiting for the loader in the current log window

    def micro_batches():
        nonlocal skipped, data_wait
        for _ in range(accum):
            t_data = time.time()
            x, y, n_skipped = next(batches)
            data_wait += time.time() - t_data
            skipped += n_skipped.sum()
            yield to_latents(x.to(dev, non_blocking=True), run.tokenizer, args.use_cached), y.to(dev, non_blocking=True)

    bar = tqdm(total=run.steps_per_epoch, initial=run.steps_per_epoch - steps, desc=f"epoch {epoch}",
               disable=not run.dist.is_main, dynamic_ncols=True)
    window, t_window, t_epoch = [], time.time(), time.time()
    for _ in range(steps):
        lr = adjust_learning_rate(run.optimizer, epoch + st.samples_in_epoch / run.epoch_samples, args)
        t_step = time.time()
        loss, grad_norm = train_step(run, micro_batches())
        st.train_seconds += time.time() - t_step
        st.step += 1
        st.samples_in_epoch += run.samples_per_step
        st.images_seen += run.samples_per_step * per_image
        if math.isfinite(loss):  # a step skipped for an fp16 overflow has no loss to average
            window.append(loss)
            st.epoch_loss_sum += loss
            st.epoch_loss_steps += 1
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)  # host values: no device sync
        bar.update(1)
        if st.step % args.log_freq == 0 or st.step == 1:
            dt = max(time.time() - t_window, 1e-9)
            row = {"step": st.step, "epoch": epoch + st.samples_in_epoch / run.epoch_samples,
                   "loss": float(np.mean(window)) if window else None, "lr": lr, "grad_norm": grad_norm,
                   "images_per_sec": len(window) * run.samples_per_step * per_image / dt,
                   "kimg": st.images_seen / 1000, "data_wait_share": min(data_wait / dt, 1.0),
                   "peak_memory_gib": (ev.peak_memory(dev)[0] or 0) / 2**30}
            if run.scaler.is_enabled():
                row.update(loss_scale=run.scaler.get_scale(), skipped_steps=st.skipped_steps)
            if run.dist.is_main:
                run.metrics.write(row)
                for k in ("loss", "lr", "grad_norm", "images_per_sec", "data_wait_share", "peak_memory_gib",
                          "loss_scale", "skipped_steps"):
                    if row.get(k) is not None:
                        run.writer.add_scalar(f"train/{k}", row[k], st.step)
            window, t_window, data_wait = [], time.time(), 0.0
        if run.requests.stop:
            bar.close()
            log.info(f"stop requested ({preemption.stop_reason()}): saving after optimizer step {st.step}")
            save(run)
            return False
        if (args.save_every_steps and st.step % args.save_every_steps == 0) or run.requests.save:
            save(run)
        if args.max_train_steps and st.step >= args.max_train_steps:
            bar.close()
            log.info(f"--max_train_steps {args.max_train_steps} reached: stopping")
            save(run)
            return False
    bar.close()
    skipped = int(all_reduce_sum(skipped.to(dev)).item())
    # each step's loss is already global; the steps before a resume count too (an epoch may end on one)
    epoch_loss = st.epoch_loss_sum / st.epoch_loss_steps if st.epoch_loss_steps else None  # None: an older
    # checkpoint written at the epoch's end, which did not keep the sum
    dt = time.time() - t_epoch
    images = steps * run.samples_per_step * per_image
    shown = "n/a" if epoch_loss is None else f"{epoch_loss:.4f}"
    log.info(f"epoch {epoch} done: loss {shown}, {images} images in {dt:.0f}s "
             f"({images / max(dt, 1e-9):.1f} images/s), {skipped} unreadable files skipped, "
             f"{st.images_seen / 1000:.1f} kimg in total")
    if run.dist.is_main:
        if epoch_loss is not None:
            run.writer.add_scalar("epoch/loss", epoch_loss, epoch)
        run.writer.add_scalar("epoch/unreadable_files", skipped, epoch)
        run.writer.flush()
    st.epoch, st.samples_in_epoch, st.epoch_loss_sum, st.epoch_loss_steps = epoch + 1, 0, 0.0, 0
    return True


def train(args, dist, tokenizer, writer):
    """Train from the start checkpoint (or scratch) to --epochs or --max_train_steps: each epoch, then the
    checkpoints it is due (checkpoint-last.pth is never older than another), then its online evaluation."""
    run = build_run(args, dist, tokenizer, writer)
    planned = args.epochs * run.steps_per_epoch
    warning = short_run_warning(args.ema_rate, run.ema.warmup, min(planned, args.max_train_steps or planned))
    if warning and run.state.step < planned and dist.is_main:
        log.warning(f"warning: {warning}")
    seed_everything(args.seed + dist.rank)  # the model was made alike on every rank; the draws now differ
    restore_rng_states(run)
    if run.state.epoch >= args.epochs:
        log.info(f"nothing to do: the checkpoint is at epoch {run.state.epoch} (step {run.state.step}), which "
                 f"--epochs {args.epochs} does not pass; give --epochs above {run.state.epoch} to train on")
    for epoch in range(run.state.epoch, args.epochs):
        if not train_one_epoch(run, epoch):
            break
        done = epoch + 1
        eval_epoch = done % args.eval_freq == 0 or done == args.epochs
        if done % args.save_last_freq == 0 or eval_epoch:
            save(run, epochs_done=done if eval_epoch else None)
        if eval_epoch and args.online_eval:
            n = args.online_num_images or args.num_images
            eval_args = argparse.Namespace(**{**vars(args), "num_images": n})
            metrics = evaluate_weights(run.raw, run.ema, tokenizer, eval_args, run.sampling, epoch=done,
                                       writer=writer if n == args.num_images else _CountTagged(writer, n))
            if metrics:
                log.info(f"epoch {done} evaluation: FID {metrics.get('fid')}, "
                         f"IS {metrics.get('inception_score_mean')} ({n} images)")
        if args.sample_grid_freq and done % args.sample_grid_freq == 0 and run.dist.is_main:
            write_sample_grid(run, done)
    if run.metrics:
        run.metrics.close()
    if run.requests.stop:
        note = (f"stopped by {preemption.stop_reason()} after saving {LAST} at optimizer step {run.state.step}: "
                f"run the same command again to continue")
        log.info(note)
        raise preemption.Preempted(note)
    return run


# ------------------------------------------------------------------ watching a run
GRID_CLASSES, GRID_SEEDS = 10, 4  # the in-training sample grid: classes spread over the labels x fixed seeds


class _CountTagged:
    """The writer of an in-training evaluation of fewer images than --num_images: its tags name the count
    (eval_n1000/fid), since a FID of few images lies above the FID of many."""

    def __init__(self, writer, n):
        self.writer, self.n = writer, n

    def add_scalar(self, tag, *a, **kw):
        if self.writer is not None:
            self.writer.add_scalar(tag.replace("eval/", f"eval_n{self.n}/", 1), *a, **kw)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()


@torch.no_grad()
def write_sample_grid(run, epoch):
    """Rank 0: a grid of the EMA weights' samples (the run's sampling settings, the same seeds every time; a row
    per class) as samples/epoch-<epoch>.png and TensorBoard image `samples`. Under a forked RNG and with its own
    generators, so that training draws the same numbers with or without it."""
    raw, sampling, device = run.raw, run.sampling, run.dist.device
    classes = torch.linspace(0, raw.class_num - 1, min(GRID_CLASSES, raw.class_num)).round().long()
    labels = classes.repeat_interleave(GRID_SEEDS)
    t0, images, bsz = time.time(), [], run.args.eval_bsz
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        with contextlib.nullcontext() if not sampling.ema else run.ema.swapped_in(raw):
            raw.eval()
            try:
                for lo in range(0, len(labels), bsz):
                    gens = [torch.Generator(device=device).manual_seed(ev.image_seed(run.args.seed, i))
                            for i in range(lo, min(lo + bsz, len(labels)))]
                    with autocast(device, sampling.autocast_dtype):
                        z = raw.samples(labels[lo:lo + bsz].to(device), generator=gens, **sampling.sample_kwargs())
                        images.append(ev.to_uint8(run.tokenizer.decode(z / ev.latent_scale(run.tokenizer)).float()))
            finally:
                raw.train()
    picture = ev.grid(np.concatenate(images), len(classes), GRID_SEEDS)
    path = os.path.join(run.args.output_dir, "samples", f"epoch-{epoch:04d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
    if run.writer is not None:
        arr = np.asarray(picture)
        run.writer.add_image("samples", arr, epoch, dataformats="HW" if arr.ndim == 2 else "HWC")
        run.writer.flush()
    log.info(f"epoch {epoch}: sample grid of classes {classes.tolist()} ({'EMA' if sampling.ema else 'raw'} "
             f"weights) in {time.time() - t0:.1f}s: {path}")


# ------------------------------------------------------------------ evaluation
def evaluate_weights(raw, ema, tokenizer, args, sampling, epoch=None, writer=None):
    """engine_eval's evaluation of the EMA weights (the model's own with --eval_wo_ema), under a forked RNG so
    that training draws the same numbers whether or not it evaluates. Collective."""
    from engine_eval import run_evaluation  # not needed by a run without evaluation

    device = next(raw.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        with contextlib.nullcontext() if not sampling.ema or ema is None else ema.swapped_in(raw):
            return run_evaluation(raw, tokenizer, args, epoch=epoch, log_writer=writer, sampling=sampling)


def evaluate(args, dist, tokenizer, writer):
    """--evaluate: the checkpoint of --resume (or --output_dir), built as the mode it holds, evaluated."""
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
    if args.compile:
        compile_model(model)
    log.info(f"evaluating the {'raw' if args.eval_wo_ema else 'EMA'} weights of {path}")
    # checkpoints store the last epoch completed (counted from 0): the folder is labelled with the epochs done,
    # as online evaluation labels it
    done = int(ckpt["epoch"]) + 1 if ckpt.get("epoch") is not None else None
    metrics = evaluate_weights(model, None, tokenizer, args, SamplingSettings.from_args(args), epoch=done,
                               writer=writer)
    if metrics:
        log.info(f"evaluation: FID {metrics.get('fid')}, IS {metrics.get('inception_score_mean')}")
    return metrics


# ------------------------------------------------------------------ latent caching
def _write_npz(path, **arrays):
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a temporary name
        np.savez(f, **arrays)


@torch.no_grad()
def cache_latents(tokenizer, loader, out_paths, device, show_progress=True):
    """Write moments of each image and of its mirror (float32) to out_paths[index] (.npz, atomically).
    Returns (written, unreadable) counts of this rank."""
    written = unreadable = 0
    for x, ok, index in tqdm(loader, disable=not show_progress, dynamic_ncols=True, desc="caching"):
        x = x.to(device, non_blocking=True)
        moments = tokenizer.encode(x).parameters.float().cpu().numpy()
        flipped = tokenizer.encode(x.flip(dims=[3])).parameters.float().cpu().numpy()
        for j, i in enumerate(index.tolist()):
            if not ok[j]:
                unreadable += 1
                continue

            atomic_write(out_paths[i], partial(_write_npz, moments=moments[j], moments_flip=flipped[j]))
            written += 1
    return written, unreadable
