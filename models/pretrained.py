"""Reading TransDiff checkpoints (released ones and ours) into the right model, and writing inference exports.

A checkpoint is a `checkpoint-*.pth` file holding `model`, `model_ema`, `args` (and, for our runs, more
training state); a run folder stands for its `checkpoint-last.pth`. The model's configuration is read off
the state dict itself (widths, depths, mode, resolution) and the tokenizer's geometry off the stored args, so
a checkpoint of another size, mode or resolution is refused with a message that says what it holds, never
loaded with strict=False.

An inference export (`tools/export.py`) is a `.safetensors` file of one set of weights whose metadata holds
the model's constructor arguments (`config`), the training args (`args`, JSON) and which weights they are;
it is read without unpickling anything.
"""
import argparse
import inspect
import json
import math
import os

import torch
import torch.nn.functional as F

from models.tokenizers import (
    DEFAULT_VAE_PATH,
    RUN_FINGERPRINT_KEYS,
    TOKENIZER_ARGS,
    build_tokenizer,
    fingerprint_mismatch,
    tokenizer_geometry,
    tokenizer_needs_weights,
)
from models.transdiff import MODEL_SIZES, Transdiff
from util.checkpoint import LAST, atomic_write
from util.errors import UserError

_MRAR_DEFAULTS = {k: inspect.signature(Transdiff).parameters[k].default for k in ("mrar_images", "mrar_ref_patch")}
EXPORT_SUFFIX = ".safetensors"
EXPORT_FORMAT = "transdiff-inference-1"
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The paper's sampling settings (cfg, scale_0, scale_1) of each released model, by (size, MRAR, pixels): the
# authors' corrected README (docs/evaluation.md, SPEC.md section 4). All use 100 sampler steps.
PUBLISHED_SAMPLING = {
    ("transdiff_base", False, 256): (1.30, 0.87, 0.91),
    ("transdiff_large", False, 256): (1.30, 0.89, 0.95),
    ("transdiff_huge", False, 256): (1.23, 0.87, 0.93),
    ("transdiff_base", True, 256): (1.30, 0.87, 0.91),
    ("transdiff_large", True, 256): (1.30, 0.925, 0.95),
    ("transdiff_huge", True, 256): (1.28, 0.87, 0.91),
    ("transdiff_large", False, 512): (1.30, 0.87, 0.87),
}
# What the first release's README gave where the corrected one differs.
FIRST_RELEASE_SAMPLING = {("transdiff_large", True, 256): (1.30, 0.91, 0.93)}
PUBLISHED_STEPS = 100
RELEASED_CLASS_NUM = 1000


class CheckpointError(UserError, RuntimeError):
    pass


def is_export(path):
    return str(path).endswith(EXPORT_SUFFIX)


def resolve_checkpoint_path(path, step=None):
    """File path of a checkpoint given a file or a run folder (optionally `checkpoint-<step>.pth`)."""
    if os.path.isdir(path):
        name = LAST if step in (None, "last") else f"checkpoint-{step}.pth"
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            found = sorted(f for f in os.listdir(path) if f.startswith("checkpoint") and f.endswith(".pth"))
            raise CheckpointError(f"no {name} in folder {path}" +
                                  (f" (it holds {', '.join(found)})" if found else " (it holds no checkpoint)"))
        return file
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: give a checkpoint file or a run folder "
                              f"that holds {LAST}")
    return path


def read_checkpoint(path, step=None, map_location="cpu", mmap=True):
    """Load a checkpoint dict from a file or run folder, with one clear error for unreadable files. An export
    (`.safetensors`) reads as a dict of its one set of weights under `model`, without pickle (`read_export`).
    `mmap`: map the file rather than read it into memory (`_load_mapped`)."""
    if is_export(path):
        return read_export(path)
    file = resolve_checkpoint_path(path, step)
    if os.path.getsize(file) == 0:
        raise CheckpointError(f"checkpoint {file} is empty (0 bytes; an interrupted copy or a full disk): copy it "
                              f"again, or give another checkpoint (a checkpoint-<epoch>.pth of the run, --resume)")
    try:
        # Released checkpoints pickle their argparse.Namespace of arguments; allow exactly that.
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = _load_mapped(file, map_location, mmap)
    except Exception as e:  # truncated file, not a torch file, foreign pickled objects
        why = (str(e).strip().splitlines() or ["no message"])[0]
        raise CheckpointError(f"cannot read checkpoint {file}: {type(e).__name__}: {why} "
                              f"(the file may be truncated by an interrupted download or copy, or not be a "
                              f"TransDiff checkpoint)") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{file} is not a TransDiff checkpoint: expected a dict with a 'model' state dict")
    return ckpt


def _load_mapped(file, map_location, mmap=True):
    """torch.load with mmap: the tensors stay pages of the file until copied into the model and optimizer, so
    the ranks of a node share one copy in the page cache instead of each reading the whole file into its own
    memory. A file in the pre-zip format (torch < 1.6) cannot be mapped and is read whole."""
    try:
        return torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if "_use_new_zipfile_serialization" not in str(e):
            raise
        return torch.load(file, map_location=map_location, weights_only=True)


def checkpoint_args(ckpt):
    """The training arguments stored in a checkpoint, as a dict (empty if none)."""
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def _count(sd, prefix):
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def mode_from_shapes(sd):
    """True (MRAR) or False (1-Step) where the shapes of `sd` tell, else None. The MRAR mask block holds one
    token per reference token, which is a single token at 32 px with KL-16 like the 1-Step mask: then the
    condition count (images x mask tokens) and `z_proj`'s input (a reference patch of latents, vs one decoder
    token in 1-Step) decide."""
    mask = sd["mask_token"].shape[1]
    if mask > 1:
        return True
    if sd["diffusion_pos_embed_learned"].shape[1] != _MRAR_DEFAULTS["mrar_images"] * mask:
        return False
    token_dim = sd["diffdecoder.net.input_proj.weight"].shape[1]
    z_in = sd["z_proj.weight"].shape[1] if "z_proj.weight" in sd else None
    if z_in == token_dim:
        return False
    if z_in == token_dim * _MRAR_DEFAULTS["mrar_ref_patch"] ** 2:
        return True
    return None


def infer_config(sd, vae_embed_dim=16, vae_stride=16, mrar=None):
    """Transdiff keyword arguments that reproduce the architecture of state dict `sd` (heads excepted). `mrar`:
    the mode as the checkpoint's args record it; None reads it off the shapes where they tell."""
    try:
        d = sd["class_emb.weight"].shape[1]
        token_dim = sd["diffdecoder.net.input_proj.weight"].shape[1]
        num_conditions = sd["diffusion_pos_embed_learned"].shape[1]
        mrar = mode_from_shapes(sd) if mrar is None else bool(mrar)
        if mrar is None:
            raise CheckpointError("the checkpoint records no mode and its shapes fit both MRAR and 1-Step: pass "
                                  "--mrar for an MRAR model, leave it out for 1-Step")
        decoder = "mlp" if "diffdecoder.net.res_blocks.0.in_ln.weight" in sd else "transformer"
        # the MLP head has no position embedding to read its token count from: it equals the condition count
        # up to 256 px; load_transdiff takes img_size from the checkpoint's args when they hold it
        seq_len = (sd["diffdecoder.net.diffusion_pos_embed_learned"].shape[1] if decoder == "transformer"
                   else num_conditions)
        arch = dict(
            encoder_embed_dim=d, encoder_depth=_count(sd, "encoder_blocks.") // 2,
            decoder_embed_dim=sd["diffdecoder.net.input_proj.weight"].shape[0],
            decoder_depth=_count(sd, "diffdecoder.net.res_blocks."),
            class_num=sd["class_emb.weight"].shape[0], vae_embed_dim=vae_embed_dim,
            buffer_size=sd["encoder_pos_embed_learned"].shape[1] - num_conditions, mrar=mrar, decoder=decoder,
            mlp_ratio=sd["encoder_blocks.0.mlp.fc1.weight"].shape[0] / d)
    except KeyError as e:
        raise CheckpointError(f"state dict is not a TransDiff model: missing {e}") from None
    patch = math.isqrt(token_dim // vae_embed_dim)
    arch["patch_size"] = patch
    arch["img_size"] = math.isqrt(seq_len) * patch * vae_stride
    if not mrar:
        arch["num_conditions"] = num_conditions
    return arch


def size_name(arch):
    """Registered size whose widths and depths match `arch`, or None."""
    for name, size in MODEL_SIZES.items():
        if all(arch.get(k) == size[k] for k in ("encoder_embed_dim", "encoder_depth", "decoder_depth")):
            return name
    return None


def describe(arch):
    name = size_name(arch) or (f"a custom model (width {arch['encoder_embed_dim']}, "
                              f"{arch['encoder_depth']}/{arch['decoder_depth']} encoder/decoder depth)")
    w = arch["decoder_embed_dim"]
    width = "" if w == arch["encoder_embed_dim"] else f", decoder width {w}"
    head = ", MLP head" if arch.get("decoder") == "mlp" else ""
    return (f"{name} {'MRAR' if arch['mrar'] else '1-Step'} at {arch['img_size']} px{width}{head}, "
            f"{arch['class_num']} classes")


def check_compatible(model, sd, source="checkpoint"):
    """Raise CheckpointError naming both architectures when `sd` does not fit `model` exactly."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return
    try:
        theirs = describe(infer_config(sd, model.vae_embed_dim, model.vae_stride,
                                       mrar=model.mrar if mode_from_shapes(sd) is None else None))
    except (CheckpointError, KeyError):
        theirs = "not a TransDiff state dict"
    detail = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                       for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
                       if keys)
    ours = describe(infer_config(own, model.vae_embed_dim, model.vae_stride, mrar=model.mrar))
    raise CheckpointError(f"{source} holds {theirs}, but the model is {ours} "
                          f"({detail}). Choose --model, --img_size, --mrar, --diffloss_w, --diffloss_d and "
                          f"--decoder to match the checkpoint, or give the checkpoint of the model you meant.")


def pick_weights(ckpt, use_ema=True):
    """EMA weights when asked for and present; says so when it falls back to the raw weights."""
    if "weights" in ckpt:  # an export holds one set, named there
        if use_ema != (ckpt["weights"] == "ema"):
            print(f"note: the export holds the {ckpt['weights']} weights only; using them")
        return ckpt["model"]
    if use_ema:
        if isinstance(ckpt.get("model_ema"), dict):
            return ckpt["model_ema"]
        print("note: the checkpoint holds no EMA weights ('model_ema'); using the raw weights")
    return ckpt["model"]


def check_tokenizer(ckpt, fingerprint, path, allow_change=False, log=print):
    """Refuse to continue or fine-tune the run of checkpoint `ckpt` with another tokenizer than it trained with
    (its latents would mean something else), unless `allow_change`."""
    recorded = checkpoint_args(ckpt).get("tokenizer_fingerprint")
    if not recorded:
        log(f"{path} records no tokenizer fingerprint (an older or released checkpoint): its tokenizer is not checked")
        return
    why = fingerprint_mismatch(recorded, fingerprint, RUN_FINGERPRINT_KEYS)
    if why and not allow_change:
        raise CheckpointError(f"checkpoint {path} was trained with another tokenizer ({why}): give the --tokenizer "
                              f"and --vae_path it was trained with, or --allow_tokenizer_change to switch on purpose")
    if why:
        log(f"tokenizer changed from the checkpoint's ({why}): --allow_tokenizer_change")


def tokenizer_settings(args):
    """The tokenizer arguments stored in `args` (a dict); checkpoints that predate --tokenizer used KL-16."""
    return {"tokenizer": "kl16", **{k: args[k] for k in TOKENIZER_ARGS if args.get(k) is not None}}


def model_config(ckpt, sd, path, overrides=None):
    """Transdiff keyword arguments that rebuild the model of checkpoint `ckpt` holding weights `sd`."""
    overrides = dict(overrides or {})
    if "config" in ckpt:  # an export: the constructor arguments themselves (older exports also stored the
        # sampler's step count, a sampling setting that the model no longer takes)
        return {**{k: v for k, v in ckpt["config"].items() if k != "num_sampling_steps"}, **overrides}
    args = checkpoint_args(ckpt)
    stride, embed_dim = tokenizer_geometry(argparse.Namespace(**tokenizer_settings(args)))
    stride, embed_dim = overrides.get("vae_stride", stride), overrides.get("vae_embed_dim", embed_dim)
    arch = infer_config(sd, embed_dim, stride, mrar=args.get("mrar"))
    arch["vae_stride"] = stride
    if arch["decoder"] == "mlp" and "img_size" in args:
        arch["img_size"] = args["img_size"]
    # main.py builds the registered size that --model names (with --diffloss_w/_d on top): its heads
    name = args.get("model") if args.get("model") in MODEL_SIZES else size_name(arch)
    heads = MODEL_SIZES[name] if name else {}
    for key in ("encoder_num_heads", "decoder_num_heads"):
        if key in args:
            arch[key] = args[key]
        elif key in heads:
            arch[key] = heads[key]
        elif key not in overrides:
            raise CheckpointError(f"cannot tell {key} of the custom model in {path}; pass it explicitly")
    arch.update(overrides)
    return arch


def load_transdiff(path, model=None, use_ema=True, step=None, map_location="cpu", **overrides):
    """Load a TransDiff checkpoint (file, run folder or `.safetensors` export) strictly.

    With `model`, its architecture must match the checkpoint's. Without, the model is built from the
    checkpoint alone: an export's stored constructor arguments, or the architecture read off the state dict
    with the tokenizer geometry and heads from the stored args; `overrides` on top (e.g. num_conditions).
    Returns (model, checkpoint dict); `checkpoint_args` of it gives the run's arguments either way.
    """
    ckpt = read_checkpoint(path, step, map_location)
    sd = pick_weights(ckpt, use_ema)
    if model is None:
        model = Transdiff(**model_config(ckpt, sd, path, overrides))
    check_compatible(model, sd, source=f"checkpoint {path}")
    model.load_state_dict(sd, strict=True)
    return model, ckpt


def load_tokenizer(ckpt, vae_path=None):
    """The frozen tokenizer that the checkpoint's model was trained with, rebuilt from its stored settings.
    The KL-16 VAE's weights come from `vae_path`, else the path the run used, else DEFAULT_VAE_PATH."""
    args = checkpoint_args(ckpt)
    settings = tokenizer_settings(args)
    name = settings["tokenizer"]
    if tokenizer_needs_weights(name):
        tried = [vae_path] if vae_path else [p for p in (args.get("vae_path"), DEFAULT_VAE_PATH) if p]
        found = [p for p in tried if os.path.isfile(p)]
        if not found:
            raise CheckpointError(f"the model decodes with the {name} tokenizer, whose weights are not at "
                                  f"{' or '.join(tried)}: pass --vae_path PATH/kl16.ckpt")
        settings["vae_path"] = found[0]
    return build_tokenizer(argparse.Namespace(**settings))


def published_sampling(model):
    """The paper's sampler settings when `model` has a released model's architecture, else None."""
    c = model.config
    key = (size_name(c), bool(model.mrar), int(model.img_size))
    if key not in PUBLISHED_SAMPLING or c["class_num"] != RELEASED_CLASS_NUM or \
            c["decoder_embed_dim"] != c["encoder_embed_dim"] or c.get("decoder", "transformer") != "transformer":
        return None
    cfg, scale_0, scale_1 = PUBLISHED_SAMPLING[key]
    return dict(cfg=cfg, scale_0=scale_0, scale_1=scale_1, num_sampling_steps=PUBLISHED_STEPS, sampler="maruyama")


# ------------------------------------------------------------------ inference export
def _jsonable(args):
    out = {}
    for k, v in args.items():
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def read_export(path):
    """An export as a checkpoint-like dict: `model` (state dict), `config`, `args`, `weights`; no pickle."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"export {path} does not exist")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or not a safetensors file
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0]} (the file may be "
                              f"truncated, or not be a safetensors file)") from e
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is not a TransDiff inference export (its metadata has format "
                              f"{meta.get('format')!r}, expected {EXPORT_FORMAT!r}); write one with tools/export.py")
    return {"model": sd, "config": json.loads(meta["config"]), "args": json.loads(meta["args"]),
            "weights": meta["weights"], "dtype": meta.get("dtype")}


def export_inference(src, out, dtype="fp32", use_ema=True, step=None, force=False):
    """Write the weights of checkpoint `src` (EMA, or raw when not `use_ema`) as a `.safetensors` file at `out`
    whose metadata rebuilds model and tokenizer. Returns the metadata."""
    if not is_export(out):
        raise ValueError(f"the export {out} must end in {EXPORT_SUFFIX}")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} exists; choose another name or pass --force to overwrite it")
    from safetensors.torch import save_file

    model, ckpt = load_transdiff(src, use_ema=use_ema, step=step)
    if is_export(src):
        weights = ckpt["weights"]
    else:
        weights = "ema" if use_ema and isinstance(ckpt.get("model_ema"), dict) else "raw"
    tensors = {k: v.detach().to(EXPORT_DTYPES[dtype] if v.is_floating_point() else v.dtype).contiguous()
               for k, v in model.state_dict().items()}
    meta = {"format": EXPORT_FORMAT, "config": json.dumps(model.config),
            "args": json.dumps(_jsonable(checkpoint_args(ckpt))), "weights": weights, "dtype": dtype}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return meta


def adapt_state_dict(sd, model):
    """State dict `sd` of a related model turned into one that loads strictly into `model`, for the
    published fine-tuning starts. Returns (state dict, list of notes on what was adapted).

    - 1-Step -> MRAR: the (1, 1, D) mask token is broadcast to the model's mask block; `z_proj`, which
      1-Step never used, keeps the model's fresh initialisation.
    - 256 -> 512 px: the decoder's position embedding is resized on its 2-D grid (bicubic).
    Anything else that differs is an error.
    """
    own = model.state_dict()
    out, notes = dict(sd), []
    if sd.get("mask_token") is not None and sd["mask_token"].shape[1] == 1 and own["mask_token"].shape[1] > 1:
        out["mask_token"] = sd["mask_token"].expand_as(own["mask_token"]).clone()
        notes.append(f"mask_token broadcast from {tuple(sd['mask_token'].shape)} to {tuple(own['mask_token'].shape)}")
        for k in ("z_proj.weight", "z_proj.bias"):
            if k in sd and sd[k].shape != own[k].shape:
                out[k] = own[k].clone()
                notes.append(f"{k} freshly initialised {tuple(own[k].shape)} (1-Step checkpoints do not use it)")
    key = "diffdecoder.net.diffusion_pos_embed_learned"
    if key in sd and sd[key].shape != own[key].shape and sd[key].shape[2] == own[key].shape[2]:
        src, dst = math.isqrt(sd[key].shape[1]), math.isqrt(own[key].shape[1])
        grid = sd[key].reshape(1, src, src, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
        out[key] = grid.permute(0, 2, 3, 1).reshape(1, dst * dst, -1).to(sd[key].dtype)
        notes.append(f"{key} resized bicubically from a {src}x{src} to a {dst}x{dst} grid")
    check_compatible(model, out, source="the starting checkpoint")
    return out, notes
