"""Resuming an evaluation gives back the bytes an uninterrupted run writes: missing images are regenerated in
their planned batches, whatever --eval_bsz the rerun passes; the PNG writer thread keeps the queue bounded and
stops at its first error."""
import threading
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from helpers import write_vae_checkpoint
from test_evaluation import make_args, pngs, tiny_model

import engine_eval
import util.evaluation as ev
from models.tokenizers import build_tokenizer

SMALL = dict(num_images=8, eval_bsz=4, num_sampling_steps=2)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """The KL-16 VAE (random weights): its convolutions turn the last-bit differences of another batch shape into
    1/255 steps of some pixels, as the released VAE does."""
    path = write_vae_checkpoint(tmp_path_factory.mktemp("vae") / "kl16.ckpt")
    return build_tokenizer(Namespace(tokenizer="kl16", vae_path=str(path), vae_embed_dim=16, vae_unsafe_load=False))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model, vae):
    args = make_args(tmp_path_factory.mktemp("whole"), **SMALL)
    out = ev.eval_dir(args, None, model)
    engine_eval.generate_images(model, vae, args, out)
    return {f: Path(out, f).read_bytes() for f in pngs(out)}


def test_killed_run_resumes_byte_exact(tmp_path, model, vae, uninterrupted, monkeypatch):
    """Killed after 5 of 8 images (batches of 4), one more lost, rerun with --eval_bsz 1: the images regenerated
    in batches of another shape differed by 1/255 in places (3 of the 4 here); now their planned batches are
    sampled again whole."""
    args = make_args(tmp_path, **SMALL)
    out = ev.eval_dir(args, None, model)
    real_save, calls = ev.save_png, []

    def dying_save(array, path):
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        calls.append(path)
        real_save(array, path)

    monkeypatch.setattr(ev, "save_png", dying_save)
    with pytest.raises(KeyboardInterrupt):
        engine_eval.generate_images(model, vae, args, out)
    monkeypatch.setattr(ev, "save_png", real_save)
    assert pngs(out) == [f"{i:05d}.png" for i in range(5)]
    Path(out, "00001.png").unlink()  # a lost image in the first batch too

    args.eval_bsz = 1
    speed = engine_eval.generate_images(model, vae, args, out)
    assert speed["eval_bsz"] == 4 and speed["images_generated"] == 4 and speed["images_resampled"] == 4
    assert {f: Path(out, f).read_bytes() for f in pngs(out)} == uninterrupted


def test_batch_plan():
    assert [list(b) for b in ev.planned_batches([3, 7, 8, 11], 12, 5)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9],
                                                                            [10, 11]]
    assert ev.planned_batches([], 12, 5) == []


def test_png_writer_bounded_and_stops_at_first_error(tmp_path, monkeypatch):
    release, written = threading.Event(), []

    def slow_save(array, path):
        release.wait(10)
        if Path(path).name == "bad.png":
            raise OSError("disk full")
        written.append(Path(path).name)

    monkeypatch.setattr(ev, "save_png", slow_save)
    writer = ev.PngWriter(max_pending=2)
    img = np.zeros((4, 4, 3), np.uint8)
    for name in ("a.png", "b.png", "c.png"):  # the thread holds a, the queue b and c
        writer.put(img, str(tmp_path / name))
    blocked = threading.Thread(target=writer.put, args=(img, str(tmp_path / "bad.png")))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # a full queue makes the producer wait
    release.set()
    blocked.join(10)
    writer.put(img, str(tmp_path / "after.png"))  # queued before the error is seen, never written
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert written == ["a.png", "b.png", "c.png"]
