"""Training, evaluation and latent caching: one engine for 1-Step and MRAR.

A `Run` holds what a training run is made of (models, optimizer, data, position). Progress is counted in
optimizer steps and in samples (an MRAR sample is a row of four images); the lr schedule follows the
fractional epoch, so a run resumed on another world size stays on the same schedule.
"""
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
    pick_weights,
    read_checkpoint,
    resolve_checkpoint_path,
)
from models.tokenizers import latents_from_moments
from util.checkpoint import LAST, atomic_write, capture_rng, checkpoint_name, restore_rng, save_checkpoint
from util.distributed import all_gather_object, all_reduce_sum
from util.logger import get_logger
from util.lr_sched import adjust_learning_rate

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

    @property
    def epoch_samples(self):
        return self.steps_per_epoch * self.samples_per_step


# ------------------------------------------------------------------ set-up helpers
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
    """bf16 autocast with --bf16; fp16 autocast + loss scaling by default on CUDA; fp32 elsewhere."""
    if args.bf16:
        return torch.bfloat16, torch.amp.GradScaler(device.type, enabled=False)
    if device.type == "cuda":
        return torch.float16, torch.amp.GradScaler("cuda")
    return None, torch.amp.GradScaler(device.type, enabled=False)


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def to_latents(x, tokenizer, use_cached):
    """Scaled latents for images (..., 3, H, W) or cached moments (..., 2C, h, w); leading dims kept."""
    lead, flat = x.shape[:-3], x.reshape(-1, *x.shape[-3:])
    if use_cached:
        z = latents_from_moments(flat.float(), tokenizer.scale_factor)
    else:
        z = tokenizer.encode(flat).sample() * tokenizer.scale_factor
    return z.reshape(*lead, *z.shape[1:])


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


def load_start(run, path, ckpt=None):
    """Load the start checkpoint into `run`: a full resume when it fits the model exactly, else a fine-tuning
    start (1-Step -> MRAR, 256 -> 512 px) from its EMA weights with a fresh optimizer at epoch 0."""
    args, raw = run.args, run.raw
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    own = _same_path(os.path.dirname(os.path.abspath(path)), args.output_dir)
    try:
        check_compatible(raw, ckpt["model"], source=f"checkpoint {path}")
    except CheckpointError as e:
        if own:
            raise CheckpointError(f"{e} --output_dir already holds a run of another configuration; use a new "
                                  f"--output_dir") from None
        sd, notes = adapt_state_dict(pick_weights(ckpt, use_ema=True), raw)
        raw.load_state_dict(sd, strict=True)
        run.ema.load_state_dict(sd)
        which = "EMA weights (model_ema)" if isinstance(ckpt.get("model_ema"), dict) else "weights (model)"
        log.info(f"fine-tuning start from the {which} of {path}, for both model and EMA; fresh optimizer, epoch 0")
        for note in notes:
            log.info(f"  adapted: {note}")
        return
    raw.load_state_dict(ckpt["model"], strict=True)
    if isinstance(ckpt.get("model_ema"), dict):
        check_compatible(raw, ckpt["model_ema"], source=f"model_ema of {path}")
        run.ema.load_state_dict(ckpt["model_ema"])
    else:
        log.info(f"{path} holds no model_ema: the EMA restarts from the model weights")
        run.ema.load_state_dict(ckpt["model"])
    if "optimizer" in ckpt:
        try:
            run.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:
            raise CheckpointError(f"the optimizer state in {path} does not fit this run's parameter groups ({e}); "
                                  f"was --only_train_diff changed?") from None
    if run.scaler.is_enabled() and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    ts = ckpt.get("train_state")
    if ts:
        run.state = TrainState(**{k: ts.get(k, v) for k, v in asdict(TrainState()).items()})
    else:  # a released checkpoint: `epoch` is the last completed epoch
        epoch = int(ckpt.get("epoch", -1)) + 1
        run.state = TrainState(epoch=epoch, step=epoch * run.steps_per_epoch,
                               images_seen=epoch * run.steps_per_epoch * run.samples_per_step)
    run.rng_states = ckpt.get("rng")
    log.info(f"resumed from {path}: epoch {run.state.epoch}, {run.state.samples_in_epoch} samples into it, "
             f"optimizer step {run.state.step}, {run.state.images_seen / 1000:.1f} kimg seen")


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
    raises the same error on all of them. Returns (loss averaged over ranks, gradient norm)."""
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
    loss, bad_loss, bad_grad = all_reduce_sum(flags).tolist()
    if bad_loss or bad_grad:
        what = f"non-finite loss on {int(bad_loss)} of {run.dist.world_size} ranks" if bad_loss else \
            "non-finite gradient norm"
        raise NonFiniteLossError(f"{what} at epoch {run.state.epoch}, optimizer step {run.state.step + 1}: "
                                 f"training stopped on every rank; the checkpoints on disk are untouched")
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.ema.update(run.raw)
    return loss / run.dist.world_size, float(grad_norm)


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

    def micro_batches():
        nonlocal skipped
        for _ in range(accum):
            x, y, n_skipped = next(batches)
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
        window.append(loss)
        st.epoch_loss_sum += loss
        st.epoch_loss_steps += 1
        bar.update(1)
        if st.step % args.log_freq == 0 or st.step == 1:
            dt = max(time.time() - t_window, 1e-9)
            row = {"step": st.step, "epoch": epoch + st.samples_in_epoch / run.epoch_samples,
                   "loss": float(np.mean(window)), "lr": lr, "grad_norm": grad_norm,
                   "images_per_sec": len(window) * run.samples_per_step * per_image / dt,
                   "kimg": st.images_seen / 1000}
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
            if run.dist.is_main:
                run.metrics.write(row)
                for k in ("loss", "lr", "grad_norm", "images_per_sec"):
                    run.writer.add_scalar(f"train/{k}", row[k], st.step)
            window, t_window = [], time.time()
        if args.save_every_steps and st.step % args.save_every_steps == 0:
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


def evaluate(raw, ema, tokenizer, args, epoch=None, writer=None):
    """The evaluation of util.evaluation on the EMA weights (the model's own with --eval_wo_ema), under a
    forked RNG so that training draws the same numbers whether or not it evaluates."""
    from util.evaluation import run_evaluation  # not needed by a run without evaluation

    device = next(raw.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if args.eval_wo_ema or ema is None:
            return run_evaluation(raw, tokenizer, args, epoch=epoch, log_writer=writer)
        with ema.swapped_in(raw):
            return run_evaluation(raw, tokenizer, args, epoch=epoch, log_writer=writer)


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
