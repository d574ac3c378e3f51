"""util/evaluation.py: class-balanced labels, per-image seeds, world-size / batch-size invariance, resuming a
killed run, MRAR sampling, and the metrics / JSON / TensorBoard reporting (random-weights feature extractor)."""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import engine_eval
import util.evaluation as ev
from models.transdiff import build_model
from util.metrics import InceptionWeightsNotFoundError, extract_features, features_to_stats, save_stats

TESTS = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("eval_worker", TESTS / "eval_worker.py")
eval_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_worker)
TinyTokenizer = eval_worker.TinyTokenizer

N, CLASSES, IMG = 12, 4, 32
MODEL_KW = dict(img_size=IMG, class_num=CLASSES)


def tiny_model(mrar=False):
    torch.manual_seed(0)
    model = build_model("transdiff_tiny", mrar=mrar, **MODEL_KW)
    # The default init leaves parts of the decoder at zero; perturb every weight so that the images depend on the
    # label, the conditions and the noise.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def make_args(output_dir, **kw):
    base = dict(output_dir=str(output_dir), num_images=N, eval_bsz=5, cfg=1.5, scale_0=0.9, scale_1=0.9,
                sampler="maruyama", num_sampling_steps=4, seed=7, class_num=CLASSES, img_size=IMG, mrar=False,
                eval_wo_ema=False, eval_dtype=None, fid_stats=None, fid_ref_dir=None, fid_weights=None,
                fid_batch_size=100, skip_metrics=False, resume=None, model="transdiff_tiny")
    base.update(kw)
    return argparse.Namespace(**base)


def pngs(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".png"))


def assert_same_images(dir_a, dir_b):
    """Same names and same pixels. Batches of other shapes run other kernels, whose float results may differ in the
    last bits (~1e-7 here), which can flip the rounding of a rare pixel: allow that, nothing more."""
    names = pngs(dir_a)
    assert names == pngs(dir_b) == [f"{i:05d}.png" for i in range(N)]
    flipped = 0
    for name in names:
        a = np.asarray(Image.open(os.path.join(dir_a, name)), dtype=np.int16)
        b = np.asarray(Image.open(os.path.join(dir_b, name)), dtype=np.int16)
        assert a.shape == b.shape == (IMG, IMG, 3)
        assert np.abs(a - b).max() <= 1, name
        flipped += int((a != b).sum())
    assert flipped <= 1e-3 * N * IMG * IMG * 3


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model):
    """The set generated in one process with eval_bsz 5."""
    args = make_args(tmp_path_factory.mktemp("ref"))
    out = ev.eval_dir(args, None, model)
    speed = engine_eval.generate_images(model, TinyTokenizer(), args, out)
    return args, out, speed


# ------------------------------------------------------------------------------------------------ small pieces
def test_labels_for():
    assert ev.labels_for(12, 4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert ev.labels_for(50000, 1000).bincount().tolist() == [50] * 1000
    with pytest.raises(ValueError, match="not a multiple of the 1000 classes.*49000 or 50000"):
        ev.labels_for(49999, 1000)


def test_image_seed():
    seeds = [ev.image_seed(s, i) for s in range(3) for i in range(1000)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2 ** 63 for s in seeds)
    assert ev.image_seed(0, 1) != ev.image_seed(1, 0)
    assert ev.image_seed(5, 17) == ev.image_seed(5, 17)


def test_folder_name(model):
    args = make_args("/out", num_images=50000, cfg=1.3, scale_0=0.89, scale_1=0.95, seed=1, model="transdiff_large")
    assert ev.eval_folder_name(args, 799, model) == \
        "transdiff_large-res32-steps4-maruyama-cfg1.3-s00.89-s10.95-n50000-seed1-ema-ep799"
    args.eval_wo_ema, args.cfg, args.num_sampling_steps, args.eval_dtype = True, [1.0, 1.3, 1.3, 1.3], "50", "bf16"
    assert ev.eval_dir(args) == "/out/eval/transdiff_large-res32-steps50-maruyama-cfg1_1.3_1.3_1.3-s00.89-s10.95-" \
                                "n50000-seed1-noema-bf16"


def test_png_check_and_rounding(tmp_path):
    arr = ev.to_uint8(torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5))
    assert arr[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
    path = str(tmp_path / "00000.png")
    ev.save_png(np.zeros((8, 8, 3), np.uint8), path)
    assert ev.is_complete_png(path, 8) and not ev.is_complete_png(path, 16)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    assert not ev.is_complete_png(path, 8)
    assert not ev.is_complete_png(str(tmp_path / "absent.png"))
    assert os.listdir(tmp_path) == ["00000.png"]


# ------------------------------------------------------------------------------------------------ generation
def test_generation_single_process(reference):
    args, out, speed = reference
    assert pngs(out) == [f"{i:05d}.png" for i in range(N)]
    assert speed["images_generated"] == N and speed["images_skipped"] == 0 and speed["nonfinite_images"] == 0
    assert speed["timed_images"] == N - 5 and speed["images_per_s"] > 0 and speed["peak_memory_bytes"] > 0
    images = [np.asarray(Image.open(os.path.join(out, f))) for f in pngs(out)]
    assert len({im.tobytes() for im in images}) == N  # every image has its own noise
    manifest = json.loads(Path(out, "generation.json").read_text())
    assert manifest["num_images"] == N and manifest["mrar"] is False


def test_two_ranks_equal_one_rank(tmp_path, reference, model):
    ref_args, ref_dir, _ = reference
    state = tmp_path / "model.pt"
    torch.save(model.state_dict(), state)
    args = {**vars(ref_args), "output_dir": str(tmp_path / "run"), "eval_bsz": 4, "skip_metrics": True}
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model_name": "transdiff_tiny", "model_kwargs": MODEL_KW, "state_dict": str(state),
                               "args": args}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(TESTS / "eval_worker.py"), str(cfg)], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["speed"]["world_size"] == 2 and result["speed"]["images_generated"] == N
    assert result["metrics_skipped"] and result["fid"] is None
    out = ev.eval_dir(argparse.Namespace(**args), None, model)
    assert result["folder"] == os.path.abspath(out)
    assert_same_images(ref_dir, out)
    lines = Path(tmp_path, "run", "eval_results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["folder"] == out


def test_killed_run_resumes(tmp_path, reference, model, monkeypatch):
    _, ref_dir, _ = reference
    args = make_args(tmp_path)
    out = ev.eval_dir(args, None, model)
    real_save, calls = ev.save_png, []

    def dying_save(array, path):
        if len(calls) == 7:
            raise KeyboardInterrupt("killed")  # as a signal would, between two images of the second batch
        calls.append(path)
        real_save(array, path)

    monkeypatch.setattr(ev, "save_png", dying_save)
    with pytest.raises(KeyboardInterrupt):
        engine_eval.generate_images(model, TinyTokenizer(), args, out)
    monkeypatch.setattr(ev, "save_png", real_save)
    assert pngs(out) == [f"{i:05d}.png" for i in range(7)]
    # what a kill inside a write (stale temporary file) or a crash of the machine (truncated PNG) leaves behind
    Path(out, ".00008.png.4242.tmp").write_bytes(b"\x89PNG\r\n\x1a\npartial")
    whole = Path(ref_dir, "00010.png").read_bytes()
    Path(out, "00010.png").write_bytes(whole[: len(whole) // 2])
    before = {f: (Path(out, f).read_bytes(), os.stat(os.path.join(out, f)).st_mtime_ns) for f in pngs(out)[:7]}

    args.eval_bsz = 3
    speed = engine_eval.generate_images(model, TinyTokenizer(), args, out)
    assert speed["images_skipped"] == 7 and speed["images_generated"] == N - 7
    assert sorted(os.listdir(out)) == [f"{i:05d}.png" for i in range(N)] + ["generation.json"]
    for f, (data, mtime) in before.items():
        assert Path(out, f).read_bytes() == data and os.stat(os.path.join(out, f)).st_mtime_ns == mtime
    assert all(ev.is_complete_png(os.path.join(out, f), IMG) for f in pngs(out))
    assert_same_images(ref_dir, out)

    speed = engine_eval.generate_images(model, TinyTokenizer(), args, out)  # a complete set: nothing to do
    assert speed["images_generated"] == 0 and speed["images_skipped"] == N and speed["images_per_s"] is None


def test_mrar_cfg_list_and_bf16(tmp_path):
    model = tiny_model(mrar=True)
    args = make_args(tmp_path, num_images=4, eval_bsz=3, cfg=[1.0, 1.5, 2.0, 1.2], skip_metrics=True)
    result = engine_eval.run_evaluation(model, TinyTokenizer(), args, epoch=3)
    assert "-mrar-" in result["folder"] and "cfg1_1.5_2_1.2" in result["folder"] and result["folder"].endswith("-ep3")
    assert pngs(result["folder"]) == [f"{i:05d}.png" for i in range(4)]
    assert result["settings"]["cfg"] == [1.0, 1.5, 2.0, 1.2] and result["settings"]["mrar"] is True

    args = make_args(tmp_path, num_images=4, eval_bsz=4, eval_dtype="bf16", skip_metrics=True)
    result = engine_eval.run_evaluation(tiny_model(), TinyTokenizer(), args)
    assert result["folder"].endswith("-bf16") and len(pngs(result["folder"])) == 4


def test_refuses_folder_of_another_model(tmp_path, model):
    args = make_args(tmp_path, skip_metrics=True)
    out = ev.eval_dir(args, None, model)
    os.makedirs(out)
    Path(out, "generation.json").write_text(json.dumps({"model": "transdiff_tiny", "mrar": False, "img_size": IMG,
                                                        "class_num": CLASSES, "latent_scale": 1.0}))
    with pytest.raises(RuntimeError, match="another model.*latent_scale"):
        engine_eval.run_evaluation(model, TinyTokenizer(), args)
    assert pngs(out) == []


# ------------------------------------------------------------------------------------------------ metrics
class RandomFeatures:
    """Random-weights stand-in for Inception: pooled pixels through fixed random projections."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.w_pool = torch.randn(3 * 4 * 4, 6, generator=g)
        self.w_logits = torch.randn(3 * 4 * 4, 10, generator=g)

    def __call__(self, batch):
        x = F.adaptive_avg_pool2d(batch.float() / 255, 4).flatten(1)
        return {"2048": x @ self.w_pool, "logits_unbiased": x @ self.w_logits}


class RecordingWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_metrics_written_and_logged(tmp_path, reference, model):
    _, ref_dir, _ = reference
    extractor = RandomFeatures()
    stats = str(tmp_path / "ref_stats.npz")
    save_stats(stats, *features_to_stats(extract_features(ref_dir, extractor, names=["2048"], num_workers=0)["2048"]),
               num_images=N)
    writer = RecordingWriter()
    args = make_args(tmp_path / "run", fid_stats=stats, eval_bsz=6)
    result = engine_eval.run_evaluation(model, TinyTokenizer(), args, epoch=5, log_writer=writer,
                                        feature_extractor=extractor)
    # the same set as the reference, so FID ~ 0
    assert result["num_images"] == N and abs(result["fid"]) < 1e-3 and result["inception_score_mean"] > 0
    assert result["fid_reference"] == stats and result["settings"]["epoch"] == 5
    assert json.loads(Path(result["folder"], "metrics.json").read_text())["fid"] == result["fid"]
    assert {t for t, _, s in writer.scalars if s == 5} == {"eval/fid", "eval/inception_score", "eval/images_per_s"}

    # a second evaluation against a reference image folder appends a second line; the images are kept
    args.fid_stats, args.fid_ref_dir = None, ref_dir
    again = engine_eval.run_evaluation(model, TinyTokenizer(), args, epoch=5, feature_extractor=extractor)
    assert abs(again["fid"]) < 1e-3 and again["speed"]["images_skipped"] == N
    # a reference folder also gives precision/recall; the same set covers itself fully
    assert (again["precision"], again["recall"]) == (1.0, 1.0) and result["precision"] is None
    lines = Path(tmp_path, "run", "eval_results.jsonl").read_text().splitlines()
    assert [json.loads(x)["fid_reference"] for x in lines] == [stats, ref_dir]
    assert len(pngs(result["folder"])) == N


def test_missing_references_fail_before_generating(tmp_path, model, monkeypatch):
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match="no default FID reference at img_size 32"):
        engine_eval.run_evaluation(model, TinyTokenizer(), args)
    args.fid_stats = str(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError, match="absent.npz.*fid_stats/README.md"):
        engine_eval.run_evaluation(model, TinyTokenizer(), args)
    stats = str(tmp_path / "stats.npz")
    save_stats(stats, np.zeros(6), np.eye(6), num_images=1)
    args.fid_stats = stats
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty torch-fidelity cache
    with pytest.raises(InceptionWeightsNotFoundError, match="--fid_weights"):
        engine_eval.run_evaluation(model, TinyTokenizer(), args)
    assert not (tmp_path / "eval").exists()
