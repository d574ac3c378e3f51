"""How an evaluation is run: generate the class-balanced image set as PNGs with the model, then score it (FID,
Inception Score, precision/recall). The folder layout, per-image seeds and settings are in util/evaluation.py.

Works in one process or under torchrun: ranks share the folder (a shared filesystem across nodes), rank 0 decides
which images are missing and broadcasts it, every rank generates its share of whole batches and extracts the
Inception features of its share of the folder, and every rank scores all features (rank 0 writes the result).
Running the same command again regenerates only the batches that lack an image and writes only the missing images,
so an interrupted run completes its set with the bytes an uninterrupted run would have written.
"""
import contextlib
import os
import time

import torch
from tqdm import tqdm

from util import evaluation as ev
from util import runlock
from util.amp import autocast
from util.checkpoint import append_jsonl, save_json
from util.distributed import (
    all_gather_object,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast,
    broadcast_object,
    comm_device,
    rank,
    run_on_every_rank,
    world_size,
)

# batches of PNGs that may wait for the writer thread while the next batch is generated
PNG_QUEUE_BATCHES = 2


def _module_device(module, default=None):
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            return p.device
        for b in module.buffers():
            return b.device
    return default


def _manifest(model, tokenizer, args, sampling, out_dir, fingerprint):
    return {"model": args.model, "mrar": bool(model.mrar), "img_size": int(args.img_size),
            "class_num": int(model.class_num),
            "resume": os.path.normpath(os.path.abspath(args.resume)) if args.resume else None,
            "latent_scale": ev.latent_scale(tokenizer), ev.WEIGHTS_KEY: fingerprint,
            "num_images": int(args.num_images), "eval_bsz": int(args.eval_bsz), **sampling.record(),
            "folder": os.path.abspath(out_dir)}


def _claim(out_dir, manifest, own_folder):
    """Lock and check `out_dir` (rank 0). Other weights than the folder's get `<out_dir>-w<fingerprint>` when
    `own_folder`, else the refusal. Returns (folder, its manifest, lock)."""
    log = lambda m: print(f"[eval] {m}", flush=True)  # noqa: E731
    lock = runlock.acquire(out_dir, "image generation", log=log)
    try:
        return out_dir, ev.check_manifest(out_dir, manifest), lock
    except ev.OtherWeightsError as e:
        runlock.release(lock)
        if not own_folder:
            raise
        own = f"{out_dir}-w{manifest[ev.WEIGHTS_KEY]}"
        log(f"{e.args[0].split(': use another')[0]}; these weights get their own folder {own}")
    except BaseException:
        runlock.release(lock)
        raise
    lock = runlock.acquire(own, "image generation", log=log)
    try:
        return own, ev.check_manifest(own, {**manifest, "folder": os.path.abspath(own)}), lock
    except BaseException:
        runlock.release(lock)
        raise


def _plan(manifest, args, out_dir, device, own_folder):
    """Rank 0 locks the folder (one live run per folder), checks it and lists the missing images; every rank gets
    the folder, its batch size and that list (or the refusal). Returns (folder, batch size, missing indices,
    the lock for runlock.release)."""
    n = int(args.num_images)
    status, missing, error, lock, bsz = 0, [], None, None, int(args.eval_bsz)
    if rank() == 0:
        try:
            out_dir, folder_manifest, lock = _claim(out_dir, manifest, own_folder)
            bsz = int(folder_manifest.get("eval_bsz") or bsz)
            if bsz != int(args.eval_bsz):
                print(f"[eval] {out_dir} was started in batches of {bsz}: its missing images are generated in "
                      f"those batches (not --eval_bsz {args.eval_bsz}), so that they equal an uninterrupted run's",
                      flush=True)
            missing = ev.missing_indices(out_dir, n, args.img_size)
        except Exception as e:  # told to the other ranks below, so they do not wait forever
            status, error = 1, e
    if world_size() > 1:
        buf = torch.zeros(n + 2, dtype=torch.int64, device=comm_device(device))
        if rank() == 0:
            buf[0], buf[1] = status, bsz
            buf[2:][torch.tensor(missing, dtype=torch.int64, device=buf.device)] = 1
        buf = broadcast(buf).cpu()
        status, bsz = int(buf[0]), int(buf[1])
        missing = torch.nonzero(buf[2:]).flatten().tolist()
        out_dir = broadcast_object(out_dir)
    if error is not None:
        runlock.release(lock)
        raise error
    if status:
        raise RuntimeError(f"rank 0 could not prepare {out_dir}; see its error")
    return out_dir, bsz, missing, lock


def generate_images(model, tokenizer, args, out_dir, sampling=None, fingerprint=None, own_folder=False):
    """Write the PNGs of `out_dir` that are still missing, this rank's share of them; returns speed statistics
    reduced over ranks (identical on every rank), and under "folder" the folder written. `sampling` defaults to
    the settings of `args` (with the device's default dtype); `fingerprint` to that of the model's and
    tokenizer's weights. A folder holding other weights is refused, or with `own_folder` this model's images go
    to `<out_dir>-w<fingerprint>`."""
    device = _module_device(model, torch.device("cpu"))
    sampling = (sampling or ev.SamplingSettings.from_args(args)).for_device(device)
    n, bsz = int(args.num_images), int(args.eval_bsz)
    if bsz <= 0:
        raise ValueError(f"--eval_bsz must be positive, got {bsz}")
    if int(args.class_num) != model.class_num:
        raise ValueError(f"args.class_num={args.class_num} but the model has {model.class_num} classes")
    if int(args.img_size) != model.img_size:
        raise ValueError(f"--img_size {args.img_size} but the model generates {model.img_size} px images")
    ev.labels_for(n, model.class_num)  # refuses an unbalanced count before the folder is touched
    fingerprint = fingerprint or ev.weights_fingerprint(model, tokenizer)
    manifest = _manifest(model, tokenizer, args, sampling, out_dir, fingerprint)
    out_dir, bsz, missing, lock = _plan(manifest, args, out_dir, device, own_folder)
    try:
        return {**_generate(model, tokenizer, args, sampling, out_dir, bsz, missing, device), "folder": out_dir}
    finally:
        runlock.release(lock)


def _generate(model, tokenizer, args, sampling, out_dir, bsz, missing, device):
    n, world = int(args.num_images), world_size()
    labels = ev.labels_for(n, model.class_num)
    tok_device = _module_device(tokenizer, device)
    scale = ev.latent_scale(tokenizer)
    wanted = set(missing)
    # whole batches of the plan, dealt round-robin: shares differ by at most one batch
    mine = ev.planned_batches(missing, n, bsz)[rank()::world]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    modes = [(m, m.training) for m in (model, tokenizer) if isinstance(m, torch.nn.Module)]
    for m, _ in modes:
        m.eval()
    done, sampled, timed_images, nonfinite = 0, 0, 0, 0
    start = time.perf_counter()
    timed_start = None
    writer = ev.PngWriter(max_pending=PNG_QUEUE_BATCHES * bsz)
    try:
        with torch.no_grad(), tqdm(total=sum(len(wanted.intersection(b)) for b in mine), unit="img",
                                   desc=f"generating {os.path.basename(out_dir)}", disable=rank() != 0,
                                   dynamic_ncols=True) as bar:
            for batch in mine:
                idx = list(batch)
                gens = [torch.Generator(device=device).manual_seed(ev.image_seed(sampling.seed, i)) for i in idx]
                with autocast(device, sampling.autocast_dtype):
                    latents = model.samples(labels[idx].to(device), generator=gens, **sampling.sample_kwargs())
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
                written = 0
                for i, arr in zip(idx, ev.to_uint8(images)):
                    if i in wanted:  # the others of the batch are on disk already
                        writer.put(arr, ev.image_path(out_dir, i, n))
                        written += 1
                done += written
                sampled += len(idx)
                bar.update(written)
                if timed_start is None:
                    timed_start = time.perf_counter()  # the first batch pays for warm-up and allocations
                else:
                    timed_images += len(idx)
        writer.close()
    except BaseException:
        with contextlib.suppress(BaseException):  # the error that stopped generating is the one to report
            writer.close()
        raise
    finally:
        for m, was_training in modes:
            m.train(was_training)
    end = time.perf_counter()
    peak, peak_kind = ev.peak_memory(device)
    barrier()

    comm = comm_device(device)
    counts = all_reduce_sum(torch.tensor([done, sampled, timed_images, nonfinite], dtype=torch.int64,
                                         device=comm)).tolist()
    times = all_reduce_max(torch.tensor(
        [end - start, (end - timed_start) if timed_start is not None and timed_images else 0.0,
         float(peak if peak is not None else -1)], dtype=torch.float64, device=comm)).tolist()
    generated, sampled, timed_images, nonfinite = counts
    wall, timed_wall, peak = times
    return {
        "images_total": n,
        "images_generated": generated,
        # images of regenerated batches already on disk: sampled again, not written
        "images_resampled": sampled - generated,
        "images_skipped": n - len(missing),
        "world_size": world,
        "eval_bsz": bsz,
        # byte-identical across world sizes and resumes; other batch sizes and thread counts move a few pixels
        # by 1/255 (docs/evaluation.md)
        "threads_per_rank": torch.get_num_threads(),
        "generation_wall_s": wall,
        # sampled images per second; first batch of every rank excluded; None when no rank ran a second batch
        "images_per_s": timed_images / timed_wall if timed_images and timed_wall > 0 else None,
        "s_per_image": timed_wall / timed_images if timed_images and timed_wall > 0 else None,
        "timed_images": timed_images,
        "peak_memory_bytes": int(peak) if peak >= 0 else None,
        "peak_memory_kind": peak_kind,
        "nonfinite_images": nonfinite,
    }


def _gather_features(features):
    """Every rank's share of the features (dict of (n_r, D) CPU tensors, empty for an empty share), concatenated
    in rank order on every rank."""
    shares = [s for s in all_gather_object(features) if s]
    return {k: torch.cat([s[k] for s in shares]) for k in shares[0]} if shares else {}


def run_evaluation(model, tokenizer, args, epoch=None, log_writer=None, feature_extractor=None, sampling=None):
    """Generate ``args.num_images`` images with `model` (already holding the weights to evaluate) and score them.

    Collective: every rank calls it. Returns the result dict on rank 0 and None elsewhere. `sampling` defaults to
    the settings of `args`; `feature_extractor` replaces the Inception network (tests; see
    ``util.metrics.compute_metrics``). With ``args.skip_metrics`` only the images and the speed report are made.
    `epoch` labels the folder: the epochs done. Every rank extracts the Inception features of its share of the
    images; all ranks compute the metrics from all features, so none waits on another, and rank 0 writes them.
    """
    from util import metrics as metrics_lib  # torch-fidelity is only imported when evaluating

    model = getattr(model, "module", model)  # tolerate a DDP wrapper
    device = _module_device(model, torch.device("cpu"))
    sampling = (sampling or ev.SamplingSettings.from_args(args)).for_device(device)
    weights = args.fid_weights
    ref_stats = ref_dir = None
    isc_unavailable = None  # why there is no Inception Score, when the weights cannot give one

    def check_references():
        # Before generating, so that a missing or unreadable file fails in seconds rather than after hours.
        nonlocal ref_stats, ref_dir, isc_unavailable
        ref_stats, ref_dir = ev.resolve_fid_reference(args)
        if ref_stats is not None:
            metrics_lib.load_stats(ref_stats)
        elif rank() == 0:  # one reader suffices: the ranks share the folder or hold copies of it
            ev.check_reference_images(ref_dir, metrics_lib.list_images(ref_dir))
        if feature_extractor is None and not metrics_lib.inception_weights_have_logits(weights):
            isc_unavailable = (f"{metrics_lib.resolve_inception_weights(weights)} has no logits head (made by "
                               "tools/fid_weights.py); the Inception Score needs torch-fidelity's own "
                               f"{metrics_lib.INCEPTION_WEIGHTS_FILENAME}")
            if rank() == 0:
                print(f"[eval] no Inception Score: {isc_unavailable}; scoring FID"
                      f"{' and precision/recall' if ref_dir else ''} only", flush=True)

    if not args.skip_metrics:
        # every rank extracts features: each needs the files
        run_on_every_rank(check_references, device, "another rank could not read the FID references; see its error")

    fingerprint = ev.weights_fingerprint(model, tokenizer)
    out_dir = ev.eval_dir(args, epoch, model, sampling)
    speed = generate_images(model, tokenizer, args, out_dir, sampling, fingerprint=fingerprint, own_folder=True)
    out_dir = speed.pop("folder")

    n = int(args.num_images)
    scores = {"fid": None, "inception_score_mean": None, "inception_score_std": None, "precision": None,
              "recall": None, "num_images": n}
    ev.check_folder(out_dir, n)  # on every rank, before any waits for the others' features
    if not args.skip_metrics:
        # precision/recall need reference samples: only with a reference folder
        scores = metrics_lib.compute_metrics(
            out_dir, ref_stats=ref_stats, ref_dir=ref_dir, feature_extractor_weights_path=weights, device=device,
            batch_size=int(args.fid_batch_size), isc=isc_unavailable is None, prc=ref_dir is not None,
            feature_extractor=feature_extractor, shard=(rank(), world_size()), gather=_gather_features)
    result = None
    if rank() == 0:
        settings = {"model": args.model, "mrar": bool(model.mrar), "img_size": int(args.img_size),
                    "num_images": n, "class_num": int(model.class_num), **sampling.record(), "epoch": epoch,
                    "resume": args.resume, ev.WEIGHTS_KEY: fingerprint}
        result = {**scores, "inception_score_unavailable": isc_unavailable, "metrics_skipped": args.skip_metrics,
                  "fid_reference": ref_stats or ref_dir, "folder": os.path.abspath(out_dir),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "settings": settings, "speed": speed}
        save_json(os.path.join(out_dir, "metrics.json"), result)
        append_jsonl(os.path.join(args.output_dir, "eval_results.jsonl"), result)
        ev.report(result, log_writer, epoch)
    barrier()
    return result
