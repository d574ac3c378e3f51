"""A small CNN digit classifier that judges generated digits: trained on held-out real digits the
generator never saw, it reports how often a generated image is read as the class it was asked for, and, in
its penultimate features, how far the generated digits lie from real ones (Fréchet distance, precision and
recall) next to the same numbers for real digits it never saw (the floor).

Real digits reach it by the path the generator's training data takes (resized to the run's image size by
the data pipeline), generated ones come at that size: both are then brought to the classifier's input
side the same way, so its accuracy on real digits is the yardstick for its accuracy on generated ones.
"""
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from util.checkpoint import atomic_write
from util.cli import shown_path
from util.data import IMG_EXTENSIONS, center_crop_arr
from util.metrics import features_to_stats, frechet_distance, precision_recall

INPUT_SIDE = 28  # MNIST's own resolution
TRAINING = dict(epochs=10, batch_size=64, lr=2e-3, seed=0)


class DigitClassifier(nn.Sequential):
    def __init__(self, num_classes=10):
        super().__init__(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * (INPUT_SIDE // 4) ** 2, 128), nn.ReLU(),
            nn.Linear(128, num_classes))


def to_classifier_input(images):
    """Images (N, C, H, W) in [-1, 1] (RGB or grey, any size) -> (N, 1, 28, 28) grey in [-1, 1]."""
    x = images.float().mean(dim=1, keepdim=True)
    if x.shape[-2:] != (INPUT_SIDE, INPUT_SIDE):
        x = F.interpolate(x, size=(INPUT_SIDE, INPUT_SIDE), mode="bilinear", antialias=True, align_corners=False)
    return x


def load_image_folder(folder, size=None):
    """All images of a class-per-folder tree as (N, 1, H, W) in [-1, 1] and their labels (sorted class
    order); with `size`, each is first brought to size x size as the training data pipeline does."""
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted(os.listdir(os.path.join(folder, name))):
            if not file.lower().endswith(IMG_EXTENSIONS):
                continue
            with Image.open(os.path.join(folder, name, file)) as im:
                im = im.convert("L")
                images.append(np.asarray(center_crop_arr(im, size) if size else im, dtype=np.float32))
            labels.append(label)
    x = torch.from_numpy(np.stack(images))[:, None] / 127.5 - 1.0
    return x, torch.tensor(labels)


def _shift(x, generator, max_shift=2):
    """Random translation by up to `max_shift` pixels: cheap augmentation for a small training set."""
    dx, dy = (torch.randint(-max_shift, max_shift + 1, (2,), generator=generator)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_digit_classifier(images, labels, epochs, batch_size, lr, seed=0, log=None):
    """Train on (N, C, H, W) images in [-1, 1]; deterministic for a seed, whatever the caller's thread count.
    `log` (a print-like function) hears of each epoch."""
    g = torch.Generator().manual_seed(seed)
    # dropout draws from the global RNG: leave the caller's stream alone; a caller sampling under no_grad (a
    # report on a fresh data folder) still trains the judge
    threads = torch.get_num_threads()
    # on one thread: CPU sums split by thread round differently, and the judge is the yardstick of every report
    # on this data folder, whichever run (one thread or two) trains it first
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(), torch.enable_grad():
            torch.manual_seed(seed)
            x, y = to_classifier_input(images), labels
            model = DigitClassifier(int(labels.max()) + 1)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            t0 = time.time()
            for epoch in range(epochs):
                model.train()
                order = torch.randperm(len(x), generator=g)
                loss_sum = torch.zeros(())
                for i in range(0, len(x), batch_size):
                    idx = order[i:i + batch_size]
                    loss = F.cross_entropy(model(_shift(x[idx], g)), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    loss_sum += loss.detach() * len(idx)
                if log:
                    log(f"digit classifier epoch {epoch + 1}/{epochs}: loss {loss_sum.item() / len(x):.4f} "
                        f"({time.time() - t0:.0f}s)")
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@torch.no_grad()
def accuracy_report(model, images, labels, batch_size=512):
    """{'accuracy': overall, 'per_class': {class: accuracy}, 'num_images': N} of the classifier on images."""
    pred = torch.cat([model(to_classifier_input(images[i:i + batch_size])).argmax(1)
                      for i in range(0, len(images), batch_size)])
    correct = (pred == labels).float()
    per_class = {int(c): round(correct[labels == c].mean().item(), 4) for c in labels.unique()}
    return {"accuracy": round(correct.mean().item(), 4), "per_class": per_class, "num_images": len(labels)}


def load_or_train(data_root, img_size, log=print):
    """The judge for digits of `img_size` px: trained on <data_root>/heldout, checked on <data_root>/train (the
    generator's real data), cached as <data_root>/classifier_<img_size>px.pt. Returns (model, summary)."""
    path = os.path.join(data_root, f"classifier_{img_size}px.pt")
    key = {"img_size": int(img_size), "input_side": INPUT_SIDE, **TRAINING, "threads": 1}  # older judges: retrained
    if os.path.isfile(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            model = DigitClassifier(saved["num_classes"])
            model.load_state_dict(saved["model"])
            return model.eval(), saved["summary"]
    x, y = load_image_folder(os.path.join(data_root, "heldout"), img_size)
    log(f"training the digit classifier (the judge) on {len(y)} held-out real digits, {TRAINING['epochs']} epochs; "
        f"cached for later reports as {path}")
    model = train_digit_classifier(x, y, **TRAINING, log=log)
    real = accuracy_report(model, *load_image_folder(os.path.join(data_root, "train"), img_size))
    summary = {"trained_on": len(y), "real_accuracy": real["accuracy"], "real_per_class": real["per_class"],
               "real_images": real["num_images"], "file": shown_path(path)}
    log(f"trained the digit classifier on {len(y)} held-out real digits: it reads {real['accuracy']:.1%} of the "
        f"{real['num_images']} real training digits right")
    payload = {"key": key, "num_classes": int(y.max()) + 1, "model": model.state_dict(), "summary": summary}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return model, summary


@torch.no_grad()
def features(model, images, batch_size=512):
    """The classifier's penultimate activations (N, 128) of images (N, C, H, W) in [-1, 1]."""
    body = nn.Sequential(*list(model)[:-1])  # all but the final class layer
    return torch.cat([body(to_classifier_input(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


def split_real(images, labels, per_class, seed=0):
    """Two disjoint, class-balanced sets of `per_class` real images per class (a seeded draw): the reference
    that generated digits are measured against, and the floor's other set. Returns ((ref, ref_labels),
    (floor, floor_labels))."""
    g = torch.Generator().manual_seed(seed)
    ref, other = [], []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < 2 * per_class:
            raise ValueError(f"class {int(c)} has {len(idx)} real digits, fewer than the 2 x {per_class} that a "
                             f"reference set and a disjoint floor set of {per_class} each need; lower "
                             f"--report_per_class")
        idx = idx[torch.randperm(len(idx), generator=g)]
        ref.append(idx[:per_class])
        other.append(idx[per_class:2 * per_class])
    ref, other = torch.cat(ref), torch.cat(other)
    return (images[ref], labels[ref]), (images[other], labels[other])


def distance(gen_features, ref_features, ref_stats=None):
    """{'fd', 'precision', 'recall'} of (N, D) generated vs (M, D) reference features; `ref_stats` = the
    reference's (mean, covariance) when already computed."""
    mu, sigma = ref_stats if ref_stats is not None else features_to_stats(ref_features)
    precision, recall = precision_recall(gen_features, ref_features)
    return {"fd": round(frechet_distance(*features_to_stats(gen_features), mu, sigma), 3),
            "precision": round(float(precision), 4), "recall": round(float(recall), 4)}


def diversity(model, images, real_images, real_labels, per_class, seed=0):
    """Generated digits (N = per_class x classes) against `per_class` real digits per class, and, as the floor,
    as many other real digits (disjoint from those) against the same reference: FD, precision and recall
    (k = 3) in the classifier's penultimate features. The real digits should be ones the classifier never saw
    (the generator's training digits): held-out ones flatter the floor."""
    (ref, _), (floor, _) = split_real(real_images, real_labels, per_class, seed)
    ref_f = features(model, ref)
    ref_stats = features_to_stats(ref_f)
    return {"generated": distance(features(model, images), ref_f, ref_stats),
            "real_floor": distance(features(model, floor), ref_f, ref_stats),
            "num_reference": len(ref), "num_floor": len(floor), "num_generated": len(images),
            "features": f"classifier penultimate layer ({ref_f.shape[1]})", "seed": seed}


def diversity_line(div):
    g, f = div["generated"], div["real_floor"]
    return (f"in the classifier's features, generated vs {div['num_reference']} real training digits: FD "
            f"{g['fd']:.1f}, precision {g['precision']:.2f}, recall {g['recall']:.2f} (the floor, "
            f"{div['num_floor']} other real digits: FD {f['fd']:.1f}, precision {f['precision']:.2f}, recall "
            f"{f['recall']:.2f})")
