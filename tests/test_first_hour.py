"""What a new user meets first: every entry point's --help gives each flag a line of help and its default,
tools/fid.py shows progress and saves statistics, and sample grids say what they show."""
import argparse
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_sample import write_pixel_run

import sample
from diffusion.samplers import SAMPLERS
from models.tokenizers import DEFAULT_VAE_PATH
from tools import fid as fid_tool
from util import metrics as M
from util.evaluation import grid, grid_title, labelled_grid

ENTRY_POINTS = ["main.py", "main_cache.py", "sample.py", "tools/build_mrar_index.py", "tools/export.py",
                "tools/fid.py", "tools/fid_weights.py", "tools/make_fid_stats.py", "tools/prepare_digits.py",
                "benchmarks/benchmark.py", "benchmarks/decoder_ablation.py", "benchmarks/digits_cfg_sweep.py",
                "benchmarks/digits_quality.py"]


class _Parsed(Exception):
    pass


def parser_of(script, monkeypatch):
    """The parser that `python <script> --help` prints: run the script as __main__ and stop it at parsing."""
    def stop(self, args=None, namespace=None):
        raise _Parsed(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_known_args", stop)
        m.setattr(sys, "argv", [script, "--help"])
        with pytest.raises(_Parsed) as got:
            runpy.run_path(script, run_name="__main__")
    return got.value.args[0]


def flag_help(parser):
    """{option: its --help entry on one line} for every option but -h."""
    fmt = parser._get_formatter()
    return {a.option_strings[0]: " ".join(fmt._format_action(a).split()) for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)}


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_gives_every_flag_a_line_and_its_default(script, monkeypatch):
    parser = parser_of(script, monkeypatch)
    entries = flag_help(parser)
    actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.option_strings[0] in entries}
    assert entries
    for flag, entry in entries.items():
        action = actions[flag]
        assert action.help, f"{script} {flag} has no help"
        if not action.required:
            assert "default" in entry, f"{script} {flag}: {entry}"
        if action.default not in (None, False, argparse.SUPPRESS) and "(default:" in entry:
            assert f"(default: {action.default}" in entry or "default: " in action.help, f"{script} {flag}: {entry}"


def test_main_groups_flags_as_users_think_and_one_vae_default(monkeypatch):
    parser = parser_of("main.py", monkeypatch)
    titles = [g.title for g in parser._action_groups]
    for title in ("model", "data", "training", "sampling", "scoring", "run and logging"):
        assert any(t.startswith(title) for t in titles), (title, titles)
    group_of = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}
    assert group_of["cfg"].startswith("sampling") and group_of["epochs"] == "training"
    assert group_of["fid_stats"].startswith("scoring") and group_of["vae_path"] == "model"
    for script in ("main.py", "main_cache.py"):
        assert parser_of(script, monkeypatch).get_default("vae_path") == DEFAULT_VAE_PATH == "ckpt/vae/kl16.ckpt"
    sampler = next(a for a in parser_of("sample.py", monkeypatch)._actions if a.dest == "sampler")
    assert tuple(sampler.choices) == SAMPLERS


# ----------------------------------------------------------------------------------------------------------------------
# tools/fid.py, with a small deterministic feature extractor in place of Inception (the real network is
# tests/test_fid_real.py's): what is tested here is the tool around it


def fake_features(batch):
    """uint8 (B, 3, H, W) -> 8 features: each channel's mean and spread, and two quadrant means."""
    x = batch.float() / 255
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    cols = [x.mean((2, 3)), x.std((2, 3)), x[:, :1, :h, :w].mean((2, 3)), x[:, :1, h:, w:].mean((2, 3))]
    return {M.FID_FEATURE: torch.cat(cols, dim=1)}


@pytest.fixture
def fid_setup(tmp_path, monkeypatch):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"stand-in weights")
    monkeypatch.setattr(fid_tool, "build_inception", lambda *a, **k: fake_features)
    monkeypatch.setattr(fid_tool, "resolve_inception_weights", lambda w: str(weights))
    rng = np.random.default_rng(0)
    folders = {}
    for side, (n, shift) in {"a": (7, 0), "b": (5, 60)}.items():
        folder = tmp_path / side / "nested"
        folder.mkdir(parents=True)
        for i in range(n):
            img = np.clip(rng.integers(0, 196, (24, 24, 3)) + shift, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i}.png")
        folders[side] = tmp_path / side
    return folders


def run_tool(capsys, *argv):
    assert fid_tool.main([str(a) for a in argv]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0]), captured.err


def test_fid_tool_saves_statistics_and_shows_progress(fid_setup, tmp_path, capsys):
    out = tmp_path / "a_stats.npz"
    record, err = run_tool(capsys, fid_setup["a"], "--save_stats", out, "--batch_size", "3", "--num_workers", "0")
    assert record["saved_stats"] == str(out) and record["fid"] is None and record["num_images_a"] == 7
    # the statistics file: loadable, the mean and covariance of the features, its image count
    feats = torch.cat([fake_features(torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None])
                       [M.FID_FEATURE] for p in sorted((fid_setup["a"] / "nested").iterdir())]).numpy()
    mu, sigma = M.load_stats(out)
    np.testing.assert_allclose(mu, feats.mean(0), atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), atol=1e-6)
    assert M.stats_num_images(out) == 7
    # it talks: a progress bar for the side, a line when it is done, the small-sample warning
    assert "A a:" in err and "/7" in err and "img" in err
    assert "fid.py: A = " in err and "7 images" in err
    assert "fid.py: warning: side A has 7 images, fewer than the 2048 feature dimensions" in err

    # the saved statistics stand in for the folder: the same FID against B
    both, err = run_tool(capsys, fid_setup["a"], fid_setup["b"], "--prc", "--num_workers", "0")
    via_stats, _ = run_tool(capsys, out, fid_setup["b"], "--num_workers", "0", "--quiet")
    assert both["fid"] > 0 and via_stats["fid"] == pytest.approx(both["fid"], rel=1e-6)
    assert "B b:" in err and "side B has 5 images" in err
    assert 0 <= both["precision"] <= 1 and (both["num_images_a"], both["num_images_b"]) == (7, 5)


def test_fid_tool_errors_name_the_tool(fid_setup, tmp_path, capsys):
    out = tmp_path / "s.npz"
    out.write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^fid\.py: error: --save_stats .* exists: pass --force"):
        fid_tool.main([str(fid_setup["a"]), "--save_stats", str(out)])
    with pytest.raises(SystemExit, match=r"^fid\.py: error: give two sides A B, or one folder A with --save_stats"):
        fid_tool.main([str(fid_setup["a"])])
    with pytest.raises(SystemExit, match=r"^fid\.py: error: .* is neither an image folder nor"):
        fid_tool.main([str(tmp_path / "absent"), str(fid_setup["b"])])


# ----------------------------------------------------------------------------------------------------------------------
# labelled grids


def grid_offset(picture, plain):
    """(top, left) where the unlabelled grid `plain` sits, whole and unchanged, at the bottom of `picture`."""
    h, w = plain.shape[:2]
    top = picture.shape[0] - h
    lefts = [x for x in range(picture.shape[1] - w + 1) if np.array_equal(picture[top:, x:x + w], plain)]
    assert lefts, "the grid is not inside the labelled picture"
    return top, lefts[0]


def test_labelled_grid_keeps_the_grid_and_writes_labels_and_title():
    images = np.full((6, 32, 32, 3), 200, dtype=np.uint8)
    plain = np.asarray(grid(images, 2, 3))
    title = grid_title(False, {"cfg": 1.5, "num_sampling_steps": 30, "sampler": "maruyama"}, epoch=119, seed=0)
    assert title == "class per row; 1-Step, cfg 1.5, 30 maruyama steps, 120 epochs, EMA weights, seed 0"
    assert grid_title(True, {"cfg": [1.0, 1.5, 2.0, 2.5], "num_sampling_steps": 4, "sampler": "euler"},
                      ema=False) == "class per row; MRAR, cfg 1,1.5,2,2.5, 4 euler steps, raw weights"
    picture = np.asarray(labelled_grid(images, [3, 7], 3, title))
    top, left = grid_offset(picture, plain)
    assert top > 0 and left > 0
    # the grid, unchanged, in the lower part; the title band above it and the label column beside it are ink
    assert (picture[:top] < 128).any()
    pitch = 32 + 2
    for r in range(2):
        assert (picture[top + 2 + r * pitch:top + 2 + r * pitch + 32, :left] < 128).any(), f"row {r} has no label"


def test_sample_labels_flag_writes_a_labelled_grid(tmp_path):
    run = write_pixel_run(tmp_path / "run")
    plain, labelled = tmp_path / "plain.png", tmp_path / "labelled.png"
    a = sample.main(["--resume", str(run), "--classes", "3", "7", "--per_class", "2", "--out", str(plain)])
    b = sample.main(["--resume", str(run), "--classes", "3", "7", "--per_class", "2", "--labels", "--out",
                     str(labelled)])
    assert np.array_equal(a, b)
    with Image.open(plain) as p, Image.open(labelled) as q:
        top, left = grid_offset(np.asarray(q), np.asarray(p))
        assert top > 0 and left > 0


def test_demo_notebook_is_stored_with_a_labelled_grid_and_no_warning():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(str(Path(__file__).resolve().parents[1] / "demo.ipynb"), as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "demo.ipynb is stored without its grid"
    assert not [o for o in outputs if o.output_type == "error" or o.get("name") == "stderr"], "a warning or error"
    assert any("1-Step model at 32 px, 10 classes" in o.get("text", "") for o in outputs)
