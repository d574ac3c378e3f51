"""Training data: an ImageFolder with the published augmentation, cached VAE moments, the MRAR index of
four same-class images, and a DistributedSampler that can start an epoch part-way.

Every random choice of a sample (crop, flip, which cached moments) comes from a generator seeded with
(seed, epoch, index): the data are the same whatever the worker count, and a resumed run sees exactly
what an uninterrupted one would. An unreadable file is reported with its path and replaced by the next
sample; each item carries the number of files skipped to produce it, so the count can be reduced and logged.
"""
import json
import logging
import os
import zipfile
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from util.checkpoint import atomic_write
from util.errors import UserError
from util.logger import LOGGER_NAME
from util.preemption import ignore_stop_signals

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MRAR_INDEX_NAME = "Imagenet2012_mrar_files.txt"
MAX_CONSECUTIVE_SKIPS = 50
log = logging.getLogger(LOGGER_NAME)


class DataError(UserError, ValueError):
    """The data folder or index does not fit the command: the message names the fix."""


class UnreadableFile(Exception):
    def __init__(self, path, error):
        super().__init__(f"{path}: {type(error).__name__}: {error}")
        self.path = path


# ------------------------------------------------------------------ folders
def find_mrar_index(given, data_path):
    """The MRAR index: `given` (--mrar_index), else the first of ./MRAR_INDEX_NAME, <data_path>/MRAR_INDEX_NAME
    that exists, else None."""
    if given:
        return given
    for path in (MRAR_INDEX_NAME, os.path.join(data_path, MRAR_INDEX_NAME)):
        if os.path.isfile(path):
            return path
    return None


def resolve_train_dir(data_path):
    """`<data_path>/train` when it exists (the ImageNet root, as published), else `data_path` itself."""
    train = os.path.join(data_path, "train")
    if os.path.isdir(train):
        return train
    if os.path.isdir(data_path):
        return data_path
    raise DataError(f"--data_path {data_path} does not exist: give the ImageNet root holding train/ (or an "
                    "ImageFolder)")


def find_classes(root, class_num=None):
    """Sorted class folder names (class id = position, as torchvision's ImageFolder)."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DataError(f"{root} holds no class folders (one folder of images per class): check --data_path")
    if class_num is not None and len(classes) > class_num:
        raise DataError(f"{root} holds {len(classes)} class folders but --class_num is {class_num}: pass "
                        f"--class_num {len(classes)} or point --data_path (--cached_path) at the right folder")
    return classes


def note_class_count(classes, class_num, root):
    """Fewer class folders than --class_num is legitimate (a checkpoint's label space, a subset of its classes)
    but the classes past the folders get no training samples: said once in the log."""
    if class_num is not None and len(classes) < class_num:
        log.info(f"{root} holds {len(classes)} class folders, --class_num is {class_num}: classes "
                 f"{len(classes)}..{class_num - 1} get no training samples (pass --class_num {len(classes)} "
                 f"unless the model must keep {class_num} classes)")


def check_no_empty_class(items, classes, root, what):
    """Refuse a class folder that holds no sample: its class would train on nothing, silently."""
    counts = np.bincount([label for _, label in items], minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"{len(empty)} of the {len(classes)} class folders under {root} hold no {what}, the first "
                        f"{os.path.join(root, empty[0])}: add its files (or rerun main_cache.py), or remove the "
                        f"empty folders (class ids are positions in the sorted folder list)")


def scan_folder(root, classes, extensions):
    """[(path, class id)] of the files under each class folder, in a fixed (sorted) order."""
    items = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, files in os.walk(os.path.join(root, name), followlinks=True):
            dirnames.sort()
            items += [(os.path.join(dirpath, f), label) for f in sorted(files) if f.lower().endswith(extensions)]
    return items


def read_mrar_index(path, group=4):
    """Rows of the JSON-lines MRAR index: [(synset, [file names])]."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                cate, files = row["cate"], row["files"]
                ok = isinstance(cate, str) and isinstance(files, list) and len(files) == group
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise DataError(f"MRAR index {path}, line {n}: expected {{\"cate\": \"<synset>\", \"files\": [{group} "
                                f"names]}}: rebuild it with tools/build_mrar_index.py or pass another --mrar_index")
            rows.append((cate, [str(x) for x in files]))
    if not rows:
        raise DataError(f"MRAR index {path} is empty: rebuild it with tools/build_mrar_index.py or pass another "
                        f"--mrar_index")
    return rows


def build_mrar_rows(data_path, seed=0, repeats=1, group=4):
    """MRAR index rows {"cate", "files"} for an ImageFolder: each class's images shuffled with `seed` and cut
    into groups of `group` (a smaller remainder is dropped); `repeats` passes, each with a new shuffle."""
    root = resolve_train_dir(data_path)
    classes = find_classes(root)
    rng = np.random.default_rng(seed)
    by_class = {c: [] for c in classes}
    for path, label in scan_folder(root, classes, IMG_EXTENSIONS):
        by_class[classes[label]].append(os.path.relpath(path, os.path.join(root, classes[label])))
    rows = []
    for _ in range(repeats):
        for cate in classes:
            files = [by_class[cate][i] for i in rng.permutation(len(by_class[cate]))]
            rows += [{"cate": cate, "files": files[i:i + group]} for i in range(0, len(files) - group + 1, group)]
    return rows, root


def write_mrar_index(path, rows):
    """Write the JSON-lines index atomically (a reader never sees half a file)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    atomic_write(path, write)


# ------------------------------------------------------------------ reading and augmentation
def sample_rng(seed, epoch, index):
    return np.random.default_rng((seed, epoch, index))


def load_rgb(path):
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UnreadableFile(path, e) from None


def to_tensor(img):
    """PIL RGB -> float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def random_crop_flip(img, size, rng, hflip=True):
    """The published augmentation: random square crop of side min(h, w), bicubic resize, horizontal flip
    (`hflip`: off for data whose mirror image is not a sample of the class, such as digits)."""
    w, h = img.size
    side = min(w, h)
    left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.BICUBIC)
    if hflip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def center_crop_arr(img, size):
    """ADM's centre crop (used for cached latents): BOX halving while the short side is >= 2x the target,
    BICUBIC resize of the short side to `size`, centre crop."""
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[y:y + size, x:x + size])


class DecodedImages:
    """`load_rgb` that decodes each file once per process and keeps the decoded image: for data sets small enough
    to hold in memory (the digits: 3,000 images, 7 MB), read without loader processes (--num_workers 0). The
    augmentation still runs on every read, so the samples are those of `load_rgb`."""

    def __init__(self):
        self.images = {}

    def __call__(self, path):
        img = self.images.get(path)
        if img is None:
            img = self.images[path] = load_rgb(path)
        return img


def read_image(path, rng, size, hflip=True, load=load_rgb):
    return to_tensor(random_crop_flip(load(path), size, rng, hflip))


def read_moments(path, rng, hflip=True):
    """Cached posterior parameters of the image or (with `hflip`) of its mirror, picked at random."""
    key = "moments_flip" if hflip and rng.random() >= 0.5 else "moments"
    try:
        with np.load(path) as data:
            return torch.from_numpy(np.asarray(data[key], dtype=np.float32))
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise UnreadableFile(path, e) from None


# ------------------------------------------------------------------ datasets
class TrainSamples(Dataset):
    """Items (path or list of paths, label) -> (tensor, label, files skipped); a list (an MRAR row) is read
    into a stacked tensor (K, ...). `set_epoch` must be called before each epoch's iterator is made."""

    def __init__(self, items, read, seed=0, what="samples"):
        if not items:
            raise DataError(f"no {what} found: check --data_path (or --cached_path, --mrar_index)")
        self.items, self.read, self.seed, self.epoch, self.what = items, read, seed, 0, what
        self._reported = set()

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        n = len(self.items)
        for skipped in range(min(n, MAX_CONSECUTIVE_SKIPS)):
            i = (index + skipped) % n
            paths, label = self.items[i]
            rng = sample_rng(self.seed, self.epoch, i)
            try:
                if isinstance(paths, str):
                    return self.read(paths, rng), label, skipped
                return torch.stack([self.read(p, rng) for p in paths]), label, skipped
            except UnreadableFile as e:
                if e.path not in self._reported:
                    self._reported.add(e.path)
                    log.warning(f"unreadable file skipped: {e}")
        raise RuntimeError(f"{MAX_CONSECUTIVE_SKIPS} consecutive {self.what} from index {index} are unreadable; "
                           f"check the data folder")


def image_loader(in_memory):
    return DecodedImages() if in_memory else load_rgb


def image_folder(data_path, img_size, class_num=None, seed=0, hflip=True, in_memory=False):
    root = resolve_train_dir(data_path)
    classes = find_classes(root, class_num)
    items = scan_folder(root, classes, IMG_EXTENSIONS)
    check_no_empty_class(items, classes, root, "images")
    note_class_count(classes, class_num, root)
    read = partial(read_image, size=img_size, hflip=hflip, load=image_loader(in_memory))
    return TrainSamples(items, read, seed, f"images under {root}"), classes


def cached_folder(cached_path, class_num=None, seed=0, hflip=True):
    classes = find_classes(cached_path, class_num)
    items = scan_folder(cached_path, classes, (".npz",))
    check_no_empty_class(items, classes, cached_path, "cached latents (.npz)")
    note_class_count(classes, class_num, cached_path)
    read = partial(read_moments, hflip=hflip)
    return TrainSamples(items, read, seed, f"cached latents (.npz) under {cached_path}"), classes


def mrar_dataset(index_file, root, class_num=None, seed=0, img_size=None, cached=False, hflip=True,
                 in_memory=False):
    """Rows of four same-class images (or their cached moments, `<root>/<synset>/<name>.npz`)."""
    classes = find_classes(root, class_num)
    class_id = {c: i for i, c in enumerate(classes)}
    items = []
    for n, (cate, files) in enumerate(read_mrar_index(index_file), 1):
        if cate not in class_id:
            raise DataError(f"MRAR index {index_file}, row {n}: class {cate} is not a folder of {root}: pass the "
                            f"--data_path (or --cached_path) the index was built for, or another --mrar_index")
        items.append(([os.path.join(root, cate, f + (".npz" if cached else "")) for f in files], class_id[cate]))
    check_index_files(index_file, items, root)
    note_class_count(classes, class_num, root)
    read = partial(read_moments, hflip=hflip) if cached else partial(read_image, size=img_size, hflip=hflip,
                                                                     load=image_loader(in_memory))
    return TrainSamples(items, read, seed, f"MRAR rows of {index_file}"), classes


def check_index_files(index_file, items, root):
    """Refuse an index naming files that are not there, before training: else every rank fails mid-epoch. One
    listing per class folder, not one stat per file (ImageNet: 1000 listings instead of 1.28 M stats)."""
    listed, missing, total = {}, [], 0
    for paths, _ in items:
        for path in paths:
            total += 1
            folder, name = os.path.split(path)
            if folder not in listed:
                listed[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
            if name not in listed[folder] and not os.path.isfile(path):
                missing.append(path)
    if missing:
        raise DataError(f"MRAR index {index_file}: {len(missing)} of the {total} files it names are missing under "
                        f"{root}, the first {missing[0]}: pass the --data_path (or --cached_path) it was built for, "
                        f"cache the missing latents (main_cache.py), or rebuild it (tools/build_mrar_index.py)")


def default_num_workers(released=10):
    """(loader workers per process, note or None): the released 10, capped to this node's CPU cores shared by
    its processes (torchrun's LOCAL_WORLD_SIZE), which the DataLoader would otherwise warn about on every rank."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    n = min(released, cores // local)
    if n == released:
        return n, None
    return n, (f"--num_workers {n} per process: the default {released} capped to the {cores} CPU cores shared by "
               f"{local} process(es) on this node (give --num_workers to choose)")


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, padded so every rank gets as many samples, rank r takes
    positions r, r+W, ...) that can start after the first `start` positions of the epoch's global order:
    the samples all ranks together already consumed. The position is global, hence world-size free."""

    def __init__(self, dataset, num_replicas=1, rank=0, shuffle=True, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        self.start = start - start % self.num_replicas

    def __iter__(self):
        return iter(list(super().__iter__())[self.start // self.num_replicas:])

    def __len__(self):
        return self.num_samples - self.start // self.num_replicas


def build_loader(dataset, sampler, batch_size, num_workers=0, pin_memory=False, seed=0):
    # own generator: making an iterator then draws nothing from the global RNG, which a resume restores
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=ignore_stop_signals)


class CacheSource(Dataset):
    """Images to cache (ADM centre crop, no flip) -> (image, readable, index); unreadable ones are reported
    and come back as zeros with readable=False."""

    def __init__(self, paths, img_size):
        self.paths, self.img_size = paths, img_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return to_tensor(center_crop_arr(load_rgb(self.paths[index]), self.img_size)), True, index
        except UnreadableFile as e:
            log.warning(f"unreadable image not cached: {e}")
            return torch.zeros(3, self.img_size, self.img_size), False, index
