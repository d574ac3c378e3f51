"""FID / Inception Score (util/metrics.py) and tools/make_fid_stats.py, on CPU, offline.

The real Inception weights cannot be downloaded here, so a randomly initialised network of torch-fidelity's
InceptionV3 architecture (BatchNorm statistics calibrated on random images so that its features are not ~0) is saved
to a weights file and loaded through the same offline path (``feature_extractor_weights_path`` / ``--fid_weights``)
that the real weights take. Most tests shrink torch-fidelity's internal resize target from 299 to 75 pixels (the
network is unchanged, it is four times faster on CPU); the CLI subprocess test runs at the real 299.

FID itself is computed on torch-fidelity's 192-d Inception layer (``fid_feature="192"`` / ``--feature_layer 192``):
one scipy ``sqrtm`` of a 2048 x 2048 matrix takes 10-20 s on two CPU cores. The 2048-d statistics are still
checked (CLI output against in-process features), and the full default path (299 pixels, 2048-d FID, IS) runs in
one test marked ``slow`` (``pytest -m slow``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tfi
from PIL import Image
from scipy import linalg

from util import metrics as M

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 12  # >= 10 for the 10 Inception Score splits
SMALL_INPUT = 75  # smallest input InceptionV3 takes; torch-fidelity's is 299
BRIGHTNESS_SHIFT = 60
FEAT = "192"  # FID layer for the fast tests
_sqrtm = linalg.sqrtm  # unpatched, for the tests that patch scipy.linalg.sqrtm

# FID on a dozen 2048-d features: the covariances are singular, which scipy's sqrtm warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Matrix is singular:scipy.linalg.LinAlgWarning")


# ----------------------------------------------------------------------------------------------------------------------
# helpers and fixtures


def _small_input(size: int = SMALL_INPUT):
    return mock.patch.object(tfi.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", size)


def _smooth_images(n: int, seed: int, shift: int = 0, size: int = 32) -> np.ndarray:
    """n smooth random RGB images (bicubic-upsampled 4x4 colours plus noise), uint8 NHWC; ``shift`` brightens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), dtype=np.int32)
        out.append(np.clip(img + rng.integers(-20, 21, img.shape) + shift, 0, 255).astype(np.uint8))
    return np.stack(out)


def _write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:06d}.png")
    return folder


def _random_inception_state_dict(seed: int = 0, input_size: int = SMALL_INPUT) -> dict:
    """State dict of torch-fidelity's InceptionV3 with random weights. The BatchNorm running statistics are
    calibrated on a batch of images like the test ones, at the internal input size the tests will use, so that
    the features neither vanish nor explode (features of O(1), like the real network's)."""
    with (
        mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None),
    ):
        torch.manual_seed(seed)
        net = tfi.FeatureExtractorInceptionV3("random", ["2048", "logits_unbiased"])
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over the calibration batch
    calib = np.concatenate([_smooth_images(8, seed=100), _smooth_images(8, seed=101, shift=BRIGHTNESS_SHIFT)])
    net.train()
    with torch.no_grad(), _small_input(input_size):
        net(torch.from_numpy(calib).permute(0, 3, 1, 2).contiguous())
    return net.state_dict()


def _independent_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID via symmetric eigendecompositions: tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))."""
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


@pytest.fixture(scope="module", autouse=True)
def _single_threaded():
    """Run single-threaded: batches of a dozen small images gain nothing from threads, and on a shared or busy
    machine OpenMP / OpenBLAS threads spin and make these tests several times slower. (Also keeps float32 results
    comparable between this process and the CLI subprocess, which gets OMP_NUM_THREADS=1.)"""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional
        blas = contextlib.nullcontext()
    else:
        blas = threadpool_limits(limits=1)
    with blas:
        yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, _single_threaded) -> str:
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(_random_inception_state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def weights_full_size(tmp_path_factory, _single_threaded) -> str:
    path = tmp_path_factory.mktemp("inception299") / "random-inception-299.pth"
    torch.save(_random_inception_state_dict(input_size=tfi.FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE), path)
    return str(path)


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("images")
    a = _smooth_images(N_IMAGES, seed=1)
    b = _smooth_images(N_IMAGES, seed=1, shift=BRIGHTNESS_SHIFT)  # the same images, brighter
    return {"a": _write_pngs(root / "a", a), "b": _write_pngs(root / "b", b), "a_arr": a, "b_arr": b}


@pytest.fixture(scope="module")
def features(weights, image_sets, _single_threaded) -> dict:
    """Features of sets a and b at the small input size, extracted once."""
    names = [FEAT, M.FID_FEATURE, M.ISC_FEATURE]
    with _small_input():
        net = M.build_inception(weights, device="cpu", features=names)
        return {k: M.extract_features(image_sets[k], net, names=names, num_workers=0) for k in ("a", "b")}


@pytest.fixture
def small_input():
    with _small_input():
        yield


def _run_tool(args: list[str], env_home: Path) -> subprocess.CompletedProcess:
    """``python tools/make_fid_stats.py ARGS`` in a fresh interpreter from the repo root, with the repo taken off
    PYTHONPATH (the script must find ``util`` itself) and TORCH_HOME set to an empty folder (so only --fid_weights
    can provide the weights)."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(TORCH_HOME=str(env_home), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, "tools/make_fid_stats.py", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------------------------------------------------
# FID / IS maths


def test_frechet_distance_matches_independent_scipy(features):
    fa, fb = features["a"][FEAT], features["b"][FEAT]
    assert fa.shape == (N_IMAGES, int(FEAT)) and features["a"][M.FID_FEATURE].shape == (N_IMAGES, 2048)
    sa, sb = M.features_to_stats(fa), M.features_to_stats(fb)
    assert np.trace(sa[1]) > 1.0, "random-network features collapsed; the test would be vacuous"

    ours = M.frechet_distance(*sa, *sb)
    assert ours == pytest.approx(_independent_fid(fa.numpy(), fb.numpy()), rel=1e-6)
    self_fid = M.frechet_distance(*sa, *sa)
    assert abs(self_fid) < 1e-3
    assert ours > 1.0 and ours > 1e3 * abs(self_fid)
    # symmetric; float32 / list inputs give the same float64 result
    assert M.frechet_distance(*sb, *sa) == pytest.approx(ours, rel=1e-6)
    assert M.frechet_distance(sa[0].astype(np.float32).tolist(), sa[1], *sb) == pytest.approx(ours, rel=1e-5)


def test_frechet_distance_full_rank_and_regularised_retry():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((400, 32)), 1.5 * rng.standard_normal((400, 32)) + 0.3
    sx, sy = M.features_to_stats(x), M.features_to_stats(y)
    expected = _independent_fid(x, y)
    assert M.frechet_distance(*sx, *sy) == pytest.approx(expected, rel=1e-9)

    # sqrtm of a singular product can come back non-finite or with a large imaginary part (pytorch-fid / ADM raise
    # on the latter): then both covariances get eps * I and sqrtm runs again
    eps = 1e-6
    for bad in (lambda r: r + 1j, lambda r: np.full_like(r, np.nan)):
        args = []

        def flaky_sqrtm(a, bad=bad, args=args):
            args.append(a)
            r = _sqrtm(a)
            return bad(r) if len(args) == 1 else r

        with mock.patch.object(M.linalg, "sqrtm", flaky_sqrtm):
            got = M.frechet_distance(*sx, *sy, eps=eps)
        assert len(args) == 2
        np.testing.assert_allclose(args[1], (sx[1] + eps * np.eye(32)) @ (sy[1] + eps * np.eye(32)))
        assert got == pytest.approx(expected, rel=2e-5)  # the regularisation moves it by O(d * eps)

    with mock.patch.object(M.linalg, "sqrtm", lambda a: _sqrtm(a) + 1j), pytest.raises(ValueError, match="imag"):
        M.frechet_distance(*sx, *sy)


def test_inception_score_from_logits(features):
    logits = features["a"][M.ISC_FEATURE]
    assert logits.shape == (N_IMAGES, 1008)
    mean, std = M.inception_score(logits)
    assert mean >= 1.0 and std >= 0.0
    # independent: exp(mean KL(p(y|x) || p(y))) per split, without torch-fidelity's shuffle
    p = torch.softmax(logits.double(), 1).numpy()
    scores = []
    for i in range(10):
        chunk = p[i * N_IMAGES // 10 : (i + 1) * N_IMAGES // 10]
        q = chunk.mean(0, keepdims=True)
        scores.append(np.exp((chunk * (np.log(chunk) - np.log(q))).sum(1).mean()))
    assert M.inception_score(logits, shuffle=False) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-9)
    # uniform predictions score exactly 1
    assert M.inception_score(torch.zeros(20, 1008))[0] == pytest.approx(1.0)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="Covariances"):
        M.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    assert M.frechet_distance(np.zeros(3), np.eye(3), np.ones(3), 4 * np.eye(3)) == pytest.approx(3 + 3 + 12 - 12)


def test_precision_recall_on_features():
    """k-NN manifolds (k=3): a generated set covering half of the reference's spread has precision 1 and recall
    ~half; swapping the roles swaps the two. Checked against a direct count on the same points."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 8))
    gen = ref[:100] * 0.5
    p, r = M.precision_recall(gen, ref)
    dist = lambda x, y: np.linalg.norm(x[:, None] - y[None], axis=-1)  # noqa: E731
    radius_ref, radius_gen = np.sort(dist(ref, ref), 1)[:, 3], np.sort(dist(gen, gen), 1)[:, 3]
    assert p == pytest.approx((dist(gen, ref) <= radius_ref).any(1).mean(), abs=1e-6)  # a float32 mean
    assert r == pytest.approx((dist(ref, gen) <= radius_gen).any(1).mean(), abs=1e-6)
    assert p > 0.95 and r < 0.8
    assert M.precision_recall(ref, gen) == pytest.approx((r, p), abs=1e-6)
    assert M.precision_recall(torch.from_numpy(ref), ref) == (1.0, 1.0)
    with pytest.raises(ValueError, match="more than 3 samples"):
        M.precision_recall(ref[:3], ref)
    with pytest.raises(ValueError, match=r"\(N, D\) and \(M, D\)"):
        M.precision_recall(ref, ref[:, :4])


# ----------------------------------------------------------------------------------------------------------------------
# compute_metrics end to end (offline weights path)


def test_compute_metrics_self_and_shifted(weights, image_sets, features, small_input):
    kw = dict(feature_extractor_weights_path=weights, device="cpu", batch_size=5, num_workers=0, fid_feature=FEAT)
    same = M.compute_metrics(image_sets["a"], ref_dir=image_sets["a"], **kw)
    assert set(same) == {"fid", "inception_score_mean", "inception_score_std", "precision", "recall", "num_images",
                         "num_ref_images", "inception_weights", "inception_weights_sha256"}
    assert same["num_images"] == same["num_ref_images"] == N_IMAGES and same["precision"] is None
    assert same["inception_weights"] == weights and same["inception_weights_sha256"] == M.file_sha256(weights)
    assert abs(same["fid"]) < 1e-3
    assert same["inception_score_mean"] == pytest.approx(M.inception_score(features["a"][M.ISC_FEATURE])[0], rel=1e-5)

    shifted = M.compute_metrics(image_sets["a"], ref_dir=image_sets["b"], isc=False, prc=True, **kw)
    assert shifted["inception_score_mean"] is None and shifted["inception_score_std"] is None
    assert (shifted["precision"], shifted["recall"]) == M.precision_recall(features["a"][FEAT], features["b"][FEAT])
    expected = M.frechet_distance(*M.features_to_stats(features["a"][FEAT]), *M.features_to_stats(features["b"][FEAT]))
    assert shifted["fid"] == pytest.approx(expected, rel=1e-4)
    assert shifted["fid"] > 1.0 and shifted["fid"] > 1e3 * abs(same["fid"])


def test_compute_metrics_injected_extractors(weights, image_sets, features, small_input, tmp_path):
    # a torch-fidelity FeatureExtractorBase instance
    net = M.build_inception(weights, device="cpu", features=[M.ISC_FEATURE])
    out = M.compute_metrics(image_sets["a"], feature_extractor=net, fid=False, num_workers=0)
    assert out["fid"] is None
    assert out["inception_score_mean"] == pytest.approx(M.inception_score(features["a"][M.ISC_FEATURE])[0], rel=1e-5)

    # any callable batch -> dict of features (here: per-channel pixel means)
    def pixel_means(batch):
        m = batch.float().mean(dim=(2, 3))
        return {M.FID_FEATURE: m, M.ISC_FEATURE: m}

    got = M.compute_metrics(image_sets["a"], ref_dir=image_sets["b"], feature_extractor=pixel_means, num_workers=0)
    fa = image_sets["a_arr"].astype(np.float64).mean(axis=(1, 2))
    fb = image_sets["b_arr"].astype(np.float64).mean(axis=(1, 2))
    assert got["fid"] == pytest.approx(_independent_fid(fa, fb), rel=1e-6)

    # the generated folder is flat (the evaluation writes 00000.png ...): subfolders are not searched
    sub = _write_pngs(tmp_path / "gen", image_sets["a_arr"][:10])
    _write_pngs(sub / "previews", image_sets["b_arr"][:3])
    assert M.compute_metrics(sub, fid=False, feature_extractor=pixel_means, num_workers=0)["num_images"] == 10

    with pytest.raises(KeyError, match="missing"):
        M.compute_metrics(image_sets["a"], feature_extractor=lambda b: {"x": b.float()}, fid=False, num_workers=0)


# ----------------------------------------------------------------------------------------------------------------------
# tools/make_fid_stats.py


def test_make_fid_stats_folder_roundtrip(weights, image_sets, tmp_path):
    """Stats written by the CLI (a fresh interpreter, real 299-pixel input) give the same FID as the reference folder
    they were made from. The 192-d layer keeps this cheap: the network stops after its stem."""
    out = tmp_path / "stats" / "a_stats.npz"
    args = [str(image_sets["a"]), str(out), "--fid_weights", weights, "--feature_layer", FEAT, "--num_workers", "0"]
    res = _run_tool([*args, "--quiet"], env_home=tmp_path / "torch_home")
    assert res.returncode == 0, res.stderr
    assert f"{N_IMAGES} images" in res.stdout
    with np.load(out) as d:
        assert set(d.files) == {"mu", "sigma", "num_images"}
        assert int(d["num_images"]) == N_IMAGES
        assert d["mu"].dtype == np.float64 and d["sigma"].shape == (int(FEAT), int(FEAT))
    assert [p.name for p in out.parent.iterdir()] == [out.name], "temporary file left behind"

    net = M.build_inception(weights, device="cpu", features=[FEAT])
    feats_a = M.extract_features(image_sets["a"], net, names=[FEAT], num_workers=0)[FEAT]
    mu, sigma = M.load_stats(out)
    ref_mu, ref_sigma = M.features_to_stats(feats_a)
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-4, atol=1e-7)

    kw = dict(feature_extractor_weights_path=weights, device="cpu", isc=False, num_workers=0, fid_feature=FEAT)
    via_stats = M.compute_metrics(image_sets["b"], ref_stats=out, **kw)["fid"]
    via_dir = M.compute_metrics(image_sets["b"], ref_dir=image_sets["a"], **kw)["fid"]
    assert via_stats > 1.0
    assert via_stats == pytest.approx(via_dir, rel=1e-5)


def test_make_fid_stats_main_2048_and_overwrite(weights, image_sets, features, small_input, tmp_path):
    from tools.make_fid_stats import main

    out = tmp_path / "a2048.npz"
    common = ["--fid_weights", weights, "--num_workers", "0", "--quiet"]
    assert main([str(image_sets["a"]), str(out), *common]) == 0
    mu, sigma = M.load_stats(out)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    ref_mu, ref_sigma = M.features_to_stats(features["a"][M.FID_FEATURE])
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-4, atol=1e-6)

    # refuses to overwrite without --force (before any work); overwrites with it
    before = out.read_bytes()
    with pytest.raises(SystemExit, match="--force"):
        main([str(image_sets["b"]), str(out), *common])
    assert out.read_bytes() == before
    assert main([str(image_sets["b"]), str(out), *common, "--feature_layer", FEAT, "--force"]) == 0
    np.testing.assert_allclose(M.load_stats(out)[0], M.features_to_stats(features["b"][FEAT])[0], rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a2048.npz"]

    with pytest.raises(SystemExit, match="neither a folder nor an .npz"):
        main([str(tmp_path / "nothing"), str(tmp_path / "x.npz"), *common])
    with pytest.raises(SystemExit, match="must end with .npz"):
        main([str(image_sets["a"]), str(tmp_path / "x.npy"), *common])


def test_make_fid_stats_adm_batch(weights, image_sets, features, small_input, tmp_path):
    """ADM reference batch input: uint8 NHWC images under arr_0 (plus labels in arr_1, as in *_labeled.npz)."""
    from tools.make_fid_stats import main

    batch = tmp_path / "VIRTUAL_fake.npz"
    np.savez(batch, arr_0=image_sets["a_arr"], arr_1=np.arange(N_IMAGES))
    out = tmp_path / "fake_stats.npz"
    assert main([str(batch), str(out), "--fid_weights", weights, "--num_workers", "0", "--quiet"]) == 0
    mu, sigma = M.load_stats(out)
    ref_mu, ref_sigma = M.features_to_stats(features["a"][M.FID_FEATURE])  # the same images, from PNGs
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-4, atol=1e-6)
    with np.load(out) as d:
        assert int(d["num_images"]) == N_IMAGES


def test_make_fid_stats_copy_batch_stats(tmp_path):
    """--copy_batch_stats: ADM's precomputed (whole training set) mu/sigma into a small file, no weights needed."""
    from tools.make_fid_stats import main

    batch = tmp_path / "VIRTUAL_like.npz"
    mu, sigma = np.arange(5.0), np.diag(np.arange(1.0, 6.0))
    np.savez(batch, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))
    out = tmp_path / "adm_stats.npz"
    assert main([str(batch), str(out), "--copy_batch_stats"]) == 0
    with np.load(out) as d:
        assert set(d.files) == {"mu", "sigma", "num_images"} and int(d["num_images"]) == -1
        np.testing.assert_array_equal(d["mu"], mu)
        np.testing.assert_array_equal(d["sigma"], sigma)
    np.savez(tmp_path / "images_only.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match="'mu', 'sigma'"):
        main([str(tmp_path / "images_only.npz"), str(tmp_path / "o.npz"), "--copy_batch_stats"])


def test_adm_batch_loading_and_crop(tmp_path):
    rng = np.random.default_rng(4)
    imgs = rng.integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    np.savez(tmp_path / "stored.npz", arr_0=imgs)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=imgs)
    stored = M.load_adm_images(tmp_path / "stored.npz")
    assert isinstance(stored, np.memmap)
    np.testing.assert_array_equal(stored, imgs)
    np.testing.assert_array_equal(M.load_adm_images(tmp_path / "compressed.npz"), imgs)

    # pickled (DataLoader workers under spawn) as a reference to the file, not as a copy of the images
    blob = pickle.dumps(M.ArrayImageDataset(stored))
    assert len(blob) < imgs.nbytes
    again = pickle.loads(blob)
    assert isinstance(again.images, np.memmap)
    np.testing.assert_array_equal(again[2].permute(1, 2, 0).numpy(), imgs[2])

    ds = M.ArrayImageDataset(stored, img_size=16)
    x = ds[1]
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16)
    # ADM centre crop: 40x56 (h x w) -> BOX halving (40 >= 2*16) to 20x28 -> BICUBIC short side 16 -> 16x22 -> crop
    half = Image.fromarray(imgs[1]).resize((28, 20), Image.BOX).resize((22, 16), Image.BICUBIC)
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), np.asarray(half)[:, 3:19])

    np.savez(tmp_path / "floats.npz", arr_0=imgs.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        M.load_adm_images(tmp_path / "floats.npz")
    np.savez(tmp_path / "nokey.npz", images=imgs)
    with pytest.raises(KeyError, match="arr_0"):
        M.load_adm_images(tmp_path / "nokey.npz")


# ----------------------------------------------------------------------------------------------------------------------
# errors


def test_load_stats_errors_and_formats(tmp_path):
    missing = tmp_path / "nope" / "adm_in256_stats.npz"
    with pytest.raises(FileNotFoundError, match="adm_in256_stats.npz.*'mu'.*'sigma'"):
        M.load_stats(missing)

    bad = tmp_path / "batch_only.npz"
    np.savez(bad, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(KeyError, match=r"batch_only\.npz.*\['mu', 'sigma'\].*arr_0"):
        M.load_stats(bad)

    not_npz = tmp_path / "junk.npz"
    not_npz.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        M.load_stats(not_npz)

    # an ADM reference batch carries mu/sigma next to its images (and mu_s/sigma_s): accepted
    adm = tmp_path / "VIRTUAL_like.npz"
    mu, sigma = np.arange(4.0, dtype=np.float32), np.eye(4, dtype=np.float32)
    np.savez(adm, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=sigma, mu_s=np.zeros(7), sigma_s=np.eye(7))
    got_mu, got_sigma = M.load_stats(adm)
    assert got_mu.dtype == np.float64
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)

    wrong = tmp_path / "wrong_shapes.npz"
    np.savez(wrong, mu=np.zeros(4), sigma=np.eye(3))
    with pytest.raises(ValueError, match="wrong_shapes.npz"):
        M.load_stats(wrong)


def test_compute_metrics_fails_fast_on_bad_reference(image_sets, tmp_path):
    def boom(batch):  # extraction must not even start
        raise AssertionError("features extracted before the reference was checked")

    with pytest.raises(FileNotFoundError, match="missing.npz"):
        M.compute_metrics(image_sets["a"], ref_stats=tmp_path / "missing.npz", feature_extractor=boom)
    with pytest.raises(ValueError, match="exactly one reference"):
        M.compute_metrics(image_sets["a"], feature_extractor=boom)
    with pytest.raises(ValueError, match="exactly one reference"):
        M.compute_metrics(
            image_sets["a"], ref_dir=image_sets["b"], ref_stats=tmp_path / "x.npz", feature_extractor=boom
        )
    with pytest.raises(ValueError, match="Precision/recall need reference images"):
        M.compute_metrics(image_sets["a"], ref_stats=tmp_path / "x.npz", prc=True, feature_extractor=boom)
    with pytest.raises(FileNotFoundError, match="No images"):
        (tmp_path / "empty").mkdir()
        M.compute_metrics(tmp_path / "empty", fid=False, feature_extractor=boom)

    stats = tmp_path / "small_dim.npz"
    M.save_stats(stats, np.zeros(3), np.eye(3), num_images=10)
    with pytest.raises(ValueError, match="dimension 3"):
        M.compute_metrics(
            image_sets["a"],
            ref_stats=stats,
            isc=False,
            num_workers=0,
            feature_extractor=lambda b: {M.FID_FEATURE: b.float().mean(dim=(2, 3)).repeat(1, 2)},
        )


def test_no_weights_offline(monkeypatch, tmp_path, weights, image_sets):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case something called torch.hub.set_dir
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert M.default_inception_weights_path() == str(cached)

    with pytest.raises(M.InceptionWeightsNotFoundError) as err:
        M.resolve_inception_weights(None)
    msg = str(err.value)
    for part in ("internet", M.INCEPTION_WEIGHTS_URL, "--fid_weights", str(cached)):
        assert part in msg
    stats = tmp_path / "s.npz"
    M.save_stats(stats, np.zeros(2048), np.eye(2048), num_images=2)
    with pytest.raises(M.InceptionWeightsNotFoundError, match="internet"):
        M.compute_metrics(image_sets["a"], ref_stats=stats, device="cpu")
    with pytest.raises(M.InceptionWeightsNotFoundError, match="does not exist"):
        M.resolve_inception_weights(tmp_path / "typo.pth")

    # once the file sits in torch-fidelity's cache it is used without being named
    cached.parent.mkdir(parents=True)
    os.symlink(weights, cached)
    assert M.resolve_inception_weights(None) == str(cached)
    assert M.resolve_inception_weights(weights) == weights


def test_save_stats_atomic_and_no_overwrite(tmp_path):
    path = tmp_path / "s.npz"
    M.save_stats(path, np.ones(3), np.eye(3), num_images=5)
    with pytest.raises(FileExistsError, match="force"):
        M.save_stats(path, np.zeros(3), np.eye(3), num_images=6)
    assert M.load_stats(path)[0].tolist() == [1.0, 1.0, 1.0]
    M.save_stats(path, np.zeros(3), np.eye(3), num_images=6, force=True)
    assert M.load_stats(path)[0].tolist() == [0.0, 0.0, 0.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


@pytest.mark.slow
def test_full_default_path_slow(weights_full_size, image_sets, tmp_path):
    """The defaults end to end: 299-pixel input, 2048-d FID, IS; reference stats from the plain CLI. A few minutes:
    each 2048 x 2048 sqrtm takes 10-30 s on two CPU cores."""
    weights = weights_full_size
    out = tmp_path / "b_stats.npz"
    res = _run_tool(
        [str(image_sets["b"]), str(out), "--fid_weights", weights, "--num_workers", "0", "--quiet"],
        env_home=tmp_path / "torch_home",
    )
    assert res.returncode == 0, res.stderr
    kw = dict(feature_extractor_weights_path=weights, device="cpu", num_workers=0)
    via_stats = M.compute_metrics(image_sets["a"], ref_stats=out, **kw)
    via_dir = M.compute_metrics(image_sets["a"], ref_dir=image_sets["b"], isc=False, **kw)
    assert via_stats["num_images"] == N_IMAGES and via_stats["inception_score_mean"] >= 1.0
    assert via_stats["fid"] > 1.0
    assert via_stats["fid"] == pytest.approx(via_dir["fid"], rel=1e-5)
