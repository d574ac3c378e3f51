"""Which images an evaluation may reuse: other weights never share a folder, folders are labelled with the epochs
done by --evaluate and --online_eval alike, the FID reference is read before any image is generated, Inception
runs without TF32 (flags restored), and both versions of the authors' published commands run (shrunk)."""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import write_image_folder, write_vae_checkpoint
from PIL import Image
from test_evaluation import IMG, RandomFeatures, TinyTokenizer, make_args, pngs, tiny_model

import engine_eval
import main
import sample
import util.evaluation as ev
from models.pretrained import FIRST_RELEASE_SAMPLING, PUBLISHED_SAMPLING
from models.transdiff import MODEL_SIZES
from tools.build_mrar_index import main as build_index
from util import metrics
from util.data import MRAR_INDEX_NAME
from util.errors import UserError


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def other_model():
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def image_bytes(folder):
    return {f: Path(folder, f).read_bytes() for f in pngs(folder)}


# ------------------------------------------------------------------ other weights, same settings
def test_other_weights_get_their_own_folder(tmp_path):
    """Two models of one size and mode evaluated into one --output_dir: the second generated nothing and
    reported the first one's images."""
    args = make_args(tmp_path, skip_metrics=True, num_images=4, eval_bsz=2, num_sampling_steps=2)
    first = engine_eval.run_evaluation(tiny_model(), TinyTokenizer(), args)
    second = engine_eval.run_evaluation(other_model(), TinyTokenizer(), args)
    assert second["speed"]["images_generated"] == 4 and second["folder"] != first["folder"]
    fingerprint = ev.weights_fingerprint(other_model(), TinyTokenizer())
    assert second["folder"] == f"{first['folder']}-w{fingerprint}" and second["settings"]["weights"] == fingerprint
    a, b = image_bytes(first["folder"]), image_bytes(second["folder"])
    assert a.keys() == b.keys() and all(a[f] != b[f] for f in a)
    again = engine_eval.run_evaluation(other_model(), TinyTokenizer(), args)  # its folder is found again
    assert again["folder"] == second["folder"] and again["speed"]["images_skipped"] == 4
    # a caller that names the folder gets one line naming both fingerprints
    with pytest.raises(UserError, match=f"other weights.*{first['settings']['weights']}.*{fingerprint}"):
        engine_eval.generate_images(other_model(), TinyTokenizer(), args, first["folder"])
    assert image_bytes(first["folder"]) == a


def test_fingerprint_follows_every_weight():
    model, tok = tiny_model(), TinyTokenizer()
    base = ev.weights_fingerprint(model, tok)
    assert base == ev.weights_fingerprint(tiny_model(), TinyTokenizer()) and len(base) == 16
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    assert ev.weights_fingerprint(model, tok) != base
    tok.mix.mul_(2)
    assert ev.weights_fingerprint(tiny_model(), tok) != base


# ------------------------------------------------------------------ epoch labels, through main.py
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    folder = write_image_folder(root / "imagenet", corrupt=False)
    build_index(["--data_path", str(folder), "--output", str(folder / MRAR_INDEX_NAME)])
    return SimpleNamespace(root=root, data=folder, vae=write_vae_checkpoint(root / "kl16.ckpt"))


def tiny(data, out, *extra):
    return ["--img_size", "32", "--vae_path", str(data.vae), "--model", "transdiff_tiny", "--class_num", "2",
            "--diffusion_batch_mul", "2", "--epochs", "1", "--warmup_epochs", "1", "--batch_size", "4",
            "--num_workers", "0", "--log_freq", "1", "--data_path", str(data.data), "--output_dir", str(out),
            "--num_images", "2", "--eval_bsz", "2", "--num_sampling_steps", "2", "--skip_metrics", *extra]


def eval_lines(out):
    return [json.loads(line) for line in (out / "eval_results.jsonl").read_text().splitlines()]


def test_evaluate_labels_a_checkpoint_as_online_evaluation_does(data, tmp_path):
    """--evaluate of checkpoint-1.pth wrote ...-ep0 while the online evaluation after 1 epoch wrote ...-ep1:
    now both label the epochs done, so the second finds the first's images."""
    out = tmp_path / "run"
    main.cli(tiny(data, out, "--online_eval", "--eval_freq", "1"))
    main.cli(tiny(data, out, "--evaluate", "--resume", str(out / "checkpoint-1.pth")))
    online, offline = eval_lines(out)
    assert online["folder"].endswith("-ep1") and offline["folder"] == online["folder"]
    assert offline["settings"]["epoch"] == 1 and offline["speed"]["images_skipped"] == 2
    assert offline["settings"]["weights"] == online["settings"]["weights"]


# ------------------------------------------------------------------ the reference, before any image
def test_unreadable_reference_image_fails_before_generating(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(3):
        Image.fromarray(np.full((IMG, IMG, 3), 40 * i, np.uint8)).save(ref / f"{i}.png")
    (ref / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not a whole png")
    args = make_args(tmp_path / "run", fid_ref_dir=str(ref))
    with pytest.raises(UserError, match=f"{ref / '1.png'} in --fid_ref_dir .* cannot be read"):
        engine_eval.run_evaluation(tiny_model(), TinyTokenizer(), args, feature_extractor=RandomFeatures())
    assert not (tmp_path / "run" / "eval").exists()
    stats = tmp_path / "stats.npz"
    stats.write_bytes(b"PK\x03\x04 not an npz")
    args = make_args(tmp_path / "run", fid_stats=str(stats))
    with pytest.raises(ValueError, match="Could not read FID statistics"):
        engine_eval.run_evaluation(tiny_model(), TinyTokenizer(), args, feature_extractor=RandomFeatures())
    assert not (tmp_path / "run" / "eval").exists()


# ------------------------------------------------------------------ Inception precision
def test_tf32_off_while_extracting_and_restored(tmp_path):
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(tmp_path / f"{i}.png")
    seen = []

    def extractor(batch):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return {"2048": batch.float().flatten(1)[:, :3]}

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        metrics.extract_features(tmp_path, extractor, names=["2048"], batch_size=2, num_workers=0)
        assert seen == [(False, False)] * 2
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
        metrics.extract_features(tmp_path, extractor, names=["2048"], batch_size=4, num_workers=0, tf32=True)
        assert seen[-1] == (True, True)
        with pytest.raises(KeyError):  # restored when extraction fails too
            metrics.extract_features(tmp_path, extractor, names=["absent"], num_workers=0)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ------------------------------------------------------------------ the authors' commands, both versions
TINY_WIDTH = str(MODEL_SIZES["transdiff_tiny"]["decoder_embed_dim"])
# L-MRAR's evaluation settings, first release and corrected
L_MRAR = {"first": FIRST_RELEASE_SAMPLING[("transdiff_large", True, 256)],
          "corrected": PUBLISHED_SAMPLING[("transdiff_large", True, 256)]}


def published(version, mrar):
    """The size flags of a published command, shrunk (transdiff_large -> tiny, 256 px -> 64): the first release
    passes --patch_size 1 and --diffloss_w 1024 (the width of L: here the tiny width) everywhere; the corrected
    README passes --patch_size 2 in the MRAR commands and no --diffloss_w."""
    if version == "first":
        return ["--patch_size", "1", "--diffloss_w", TINY_WIDTH]
    return ["--patch_size", "2" if mrar else "1"]


@pytest.mark.slow
@pytest.mark.parametrize("version", ["first", "corrected"])
def test_published_commands_of_both_versions_run(data, tmp_path, version):
    one = tmp_path / "one_step"
    # 64 px: MRAR's reference patches then make a mask block of 4 tokens, as at 256 px
    common = ["--img_size", "64", "--vae_path", str(data.vae), "--vae_embed_dim", "16", "--model", "transdiff_tiny",
              "--class_num", "2", "--num_workers", "0", "--data_path", str(data.data), "--max_train_steps", "1"]
    main.cli(common + published(version, False) + ["--diffusion_batch_mul", "4", "--epochs", "800", "--warmup_epochs",
                                                   "100", "--blr", "1.0e-4", "--batch_size", "4", "--output_dir",
                                                   str(one), "--resume", str(one)])
    mrar = tmp_path / "mrar"
    main.cli(common + published(version, True) + ["--mrar", "--bf16", "--diffusion_batch_mul", "2", "--epochs", "40",
                                                  "--warmup_epochs", "10", "--lr", "5.0e-5", "--batch_size", "1",
                                                  "--gradient_accumulation_steps", "2", "--output_dir", str(mrar),
                                                  "--resume", str(one)])
    cfg, s0, s1 = L_MRAR[version]
    evaluation = tmp_path / "eval"
    main.cli(common[:-2] + published(version, True) + [
        "--output_dir", str(evaluation), "--resume", str(mrar), "--evaluate", "--eval_bsz", "2", "--num_images", "2",
        "--num_sampling_steps", "2", "--cfg", str(cfg), "--scale_0", str(s0), "--scale_1", str(s1),
        "--skip_metrics"])
    (result,) = eval_lines(evaluation)
    assert result["settings"]["mrar"] and (result["settings"]["scale_0"], result["settings"]["scale_1"]) == (s0, s1)
    assert len(pngs(result["folder"])) == 2
    assert os.path.basename(result["folder"]).startswith("transdiff_tiny-mrar-res64-steps2")


def test_sample_defaults_to_the_corrected_l_mrar_settings():
    l_mrar = SimpleNamespace(config={**MODEL_SIZES["transdiff_large"], "class_num": 1000, "decoder": "transformer"},
                             mrar=True, img_size=256)
    settings, source = sample.sampling_settings(l_mrar, {})
    assert (settings["cfg"], settings["scale_0"], settings["scale_1"]) == (1.30, 0.925, 0.95)
    assert "first release gave cfg 1.3, scale_0 0.91, scale_1 0.93" in source


def test_sampling_dtype_defaults_to_bf16_on_cuda_only():
    """Evaluation and sample.py sampled in fp32 everywhere by default; on CUDA now under bf16 autocast, recorded in
    the folder name. An explicit choice stays."""
    args = make_args("/out", num_images=4)
    cuda = ev.SamplingSettings.from_args(args).for_device(torch.device("cuda", 0))
    assert cuda.dtype == "bf16" and cuda.autocast_dtype == torch.bfloat16
    assert ev.eval_folder_name(args, sampling=cuda).endswith("-ema-bf16")
    assert ev.SamplingSettings.from_args(args).for_device("cpu").dtype is None
    args.eval_dtype = "fp32"
    assert ev.SamplingSettings.from_args(args).for_device("cuda").autocast_dtype is None
    assert sample.get_args_parser().parse_args(["--resume", "r", "--classes", "1"]).dtype is None
