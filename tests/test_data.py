"""Training data: augmentation, unreadable files, the resumable sampler, the MRAR index, cached latents."""
import json
import logging
import os

import numpy as np
import pytest
import torch
from helpers import CLASSES, write_image_folder, write_vae_checkpoint
from PIL import Image
from torch.utils.data import DistributedSampler

import main_cache
from tools.build_mrar_index import main as build_index
from util import data


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imagenet"))


def test_published_augmentation_is_seeded_per_sample(folder):
    ds, classes = data.image_folder(folder, 32, class_num=10, seed=3)
    assert classes == list(CLASSES) and len(ds) == 13
    x, label, skipped = ds[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert label == 0 and skipped == 0
    assert torch.equal(ds[1][0], x)  # the same (seed, epoch, index) gives the same crop and flip
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i][0], data.image_folder(folder, 32, 10, 3)[0][i][0]) for i in range(1, 6))


def test_random_square_crop_covers_the_short_side():
    img = Image.fromarray(np.arange(60 * 90 * 3, dtype=np.uint8).reshape(60, 90, 3) % 251)
    out = data.random_crop_flip(img, 60, np.random.default_rng(0))
    assert out.size == (60, 60)
    rows = np.asarray(img)
    crop = np.asarray(out)
    matches = [np.array_equal(crop, rows[:, x:x + 60]) or np.array_equal(crop, rows[:, x:x + 60][:, ::-1])
               for x in range(31)]
    assert any(matches)


def test_unreadable_image_is_reported_and_skipped(folder, caplog):
    ds, _ = data.image_folder(folder, 32, 10)
    broken = [i for i, (p, _) in enumerate(ds.items) if p.endswith("broken.png")][0]
    logger = logging.getLogger("transdiff")  # does not propagate once a run has set it up
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="transdiff"):
            x, label, skipped = ds[broken]
    finally:
        logger.removeHandler(caplog.handler)
    assert skipped == 1 and label == 0
    assert torch.equal(x, ds[broken + 1][0])  # deterministic replacement: the next sample
    assert "broken.png" in caplog.text


def test_more_classes_than_class_num_is_refused(folder):
    with pytest.raises(ValueError, match="2 class folders but --class_num is 1"):
        data.image_folder(folder, 32, class_num=1)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_starts_mid_epoch_on_any_world_size(world):
    n, start = 13, 6
    plain = [list(DistributedSampler(range(n), world, r, seed=5)) for r in range(world)]
    order = [i for step in zip(*plain) for i in step]  # the epoch's global order
    mine = [data.ResumableDistributedSampler(range(n), world, r, seed=5) for r in range(world)]
    for r, s in enumerate(mine):
        s.set_epoch(0)
        assert list(s) == plain[r]
        s.set_epoch(0, start)
        assert len(s) == len(list(s))
    rest = [i for step in zip(*[list(s) for s in mine]) for i in step]
    assert rest == order[start - start % world:]


def test_loader_is_the_same_with_workers(folder):
    def batches(workers):
        ds, _ = data.image_folder(folder, 32, 10, seed=1)
        sampler = data.ResumableDistributedSampler(ds, 1, 0, seed=1)
        ds.set_epoch(2)
        sampler.set_epoch(2)
        return [b for b in data.build_loader(ds, sampler, 4, num_workers=workers, seed=1)]
    for (x0, y0, s0), (x1, y1, s1) in zip(batches(0), batches(2), strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(s0, s1)


def test_images_in_memory_give_the_same_samples_and_decode_once(folder, monkeypatch):
    plain, _ = data.image_folder(folder, 32, 10, seed=1)
    kept, _ = data.image_folder(folder, 32, 10, seed=1, in_memory=True)
    decoded = []
    load = data.load_rgb
    monkeypatch.setattr(data, "load_rgb", lambda path: decoded.append(path) or load(path))
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        kept.set_epoch(epoch)
        for i in range(len(kept)):  # the augmentation runs on every read: epoch 1 crops and flips anew
            a, b = plain[i], kept[i]
            assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    readable = len(kept) - 1  # the broken file is reported and skipped, and never kept
    assert len(kept.read.keywords["load"].images) == readable
    assert len(decoded) == readable + 2  # each readable file once; the broken one at its read in each epoch


def test_mrar_index_builder_and_dataset(folder, tmp_path):
    out = tmp_path / "index.txt"
    build_index(["--data_path", str(folder), "--output", str(out), "--seed", "7", "--repeats", "2"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4  # per class 6 (or 7) images: one group of four, in each of 2 passes
    for row in rows:
        assert row["cate"] in CLASSES and len(set(row["files"])) == 4
        assert all((folder / "train" / row["cate"] / f).exists() for f in row["files"])
    again = tmp_path / "again.txt"
    build_index(["--data_path", str(folder), "--output", str(again), "--seed", "7", "--repeats", "2"])
    assert again.read_text() == out.read_text()
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*tmp"))
    ds, classes = data.mrar_dataset(out, data.resolve_train_dir(folder), 10, img_size=32)
    good = next(i for i, r in enumerate(rows) if "broken.png" not in r["files"])
    x, label, skipped = ds[good]
    assert x.shape == (4, 3, 32, 32) and label == classes.index(rows[good]["cate"]) and skipped == 0
    bad = next(i for i, r in enumerate(rows) if "broken.png" in r["files"])
    assert ds[bad][2] >= 1  # a row with an unreadable image is skipped whole
    (tmp_path / "bad.txt").write_text('{"cate": "n01440764", "files": ["a"]}\n')
    with pytest.raises(ValueError, match="line 1"):
        data.mrar_dataset(tmp_path / "bad.txt", data.resolve_train_dir(folder), 10, img_size=32)


def test_cached_moments_pick_image_or_mirror(tmp_path):
    for c in CLASSES:
        (tmp_path / c).mkdir()
        np.savez(tmp_path / c / "a.png.npz", moments=np.zeros((32, 2, 2), np.float32),
                 moments_flip=np.ones((32, 2, 2), np.float32))
    ds, _ = data.cached_folder(tmp_path, 10)
    picks = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        picks.add(float(ds[0][0].mean()))
    assert picks == {0.0, 1.0}


def test_main_cache_writes_mirror_moments_and_resumes(folder, tmp_path, monkeypatch):
    vae = write_vae_checkpoint(tmp_path / "kl16.ckpt")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--img_size", "32", "--vae_path", str(vae), "--vae_embed_dim", "16", "--batch_size", "5",  # as published
            "--data_path", str(folder), "--cached_path", str(tmp_path / "cache"), "--num_workers", "0"]
    parser = main_cache.get_args_parser()
    main_cache.main(main_cache.check_args(parser, parser.parse_args(argv)))
    files = sorted((tmp_path / "cache").glob("*/*.npz"))
    assert len(files) == 12 and not list((tmp_path / "cache").glob("*/.*"))
    with np.load(files[0]) as f:
        moments, flipped = f["moments"], f["moments_flip"]
    assert moments.shape == flipped.shape == (32, 2, 2) and moments.dtype == np.float32
    from models.vae import load_vae
    img = data.to_tensor(data.center_crop_arr(data.load_rgb(
        folder / "train" / files[0].parent.name / files[0].name[:-4]), 32))[None]
    with torch.no_grad():
        model = load_vae(vae)
        np.testing.assert_allclose(moments, model.encode(img).parameters[0].numpy(), atol=1e-4)
        np.testing.assert_allclose(flipped, model.encode(img.flip(3)).parameters[0].numpy(), atol=1e-4)
    stamp = os.stat(files[0]).st_mtime_ns
    main_cache.main(main_cache.check_args(parser, parser.parse_args(argv)))
    assert os.stat(files[0]).st_mtime_ns == stamp  # existing files are kept, not recomputed
