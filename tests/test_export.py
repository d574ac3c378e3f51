"""tools/export.py: safetensors inference weights that load without pickle, sample the same, refuse the same."""
import pickle
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_sample import PATCH, SIDE, write_pixel_run

import sample
from models.pretrained import CheckpointError, export_inference, load_tokenizer, load_transdiff, read_export
from models.transdiff import build_model
from tools import export as export_tool


@pytest.fixture
def run(tmp_path):
    return write_pixel_run(tmp_path / "run")


def _samples(model, n=3, seed=0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    with torch.no_grad():
        return model.samples(torch.arange(n), num_sampling_steps=3, cfg=2.0, generator=gens)


def _forbid_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_export_loads_without_pickle_and_samples_identically(run, tmp_path, monkeypatch):
    out = tmp_path / "run.safetensors"
    meta = export_inference(str(run), str(out))
    assert meta["weights"] == "ema" and meta["dtype"] == "fp32"
    ema, _ = load_transdiff(str(run))
    _forbid_pickle(monkeypatch)
    with pytest.raises(CheckpointError, match="unpickling attempted"):  # the guard works: a .pth needs pickle
        load_transdiff(str(run))
    loaded, ckpt = load_transdiff(str(out))
    tok = load_tokenizer(ckpt)
    steps = sample.sampling_settings(loaded, ckpt)[0]["num_sampling_steps"]  # the run's, from the export's args
    assert (loaded.img_size, loaded.vae_stride, tok.stride, steps) == (SIDE, PATCH, PATCH, 2)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ema.state_dict().values()))
    assert torch.equal(_samples(loaded), _samples(ema))


def test_raw_export_and_cli_bf16(run, tmp_path, capsys):
    raw_out, bf16_out = tmp_path / "raw.safetensors", tmp_path / "bf16.safetensors"
    export_tool.main([str(run), str(raw_out), "--raw"])
    raw, _ = load_transdiff(str(run), use_ema=False)
    from_raw, _ = load_transdiff(str(raw_out))
    assert torch.equal(_samples(from_raw), _samples(raw))
    export_tool.main([str(run), str(bf16_out), "--dtype", "bf16"])
    assert "ema weights" in capsys.readouterr().out
    assert read_export(str(bf16_out))["model"]["class_emb.weight"].dtype == torch.bfloat16
    # half the bytes, up to the metadata
    assert abs(bf16_out.stat().st_size / raw_out.stat().st_size - 0.5) < 0.05
    ema, _ = load_transdiff(str(run))
    from_bf16, _ = load_transdiff(str(bf16_out))
    assert torch.allclose(from_bf16.class_emb.weight, ema.class_emb.weight, rtol=1e-2, atol=1e-2)
    # sample.py takes the export like any checkpoint
    images = sample.main(["--resume", str(bf16_out), "--classes", "2", "--per_class", "2",
                          "--out", str(tmp_path / "g.png")])
    assert images.shape == (2, SIDE, SIDE, 3)


@pytest.mark.parametrize("other", [{"mrar": True}, {"img_size": 64}, {"decoder_embed_dim": 64}])
def test_same_refusals_as_the_checkpoint(run, tmp_path, other):
    out = tmp_path / "run.safetensors"
    export_inference(str(run), str(out))
    kw = dict(img_size=SIDE, vae_stride=PATCH, vae_embed_dim=PATCH * PATCH, class_num=10, buffer_size=16,
              decoder_embed_dim=32)
    wrong = build_model("transdiff_tiny", **{**kw, **other})
    messages = []
    for path in (run, out):
        with pytest.raises(CheckpointError) as e:
            load_transdiff(str(path), model=wrong)
        messages.append(str(e.value).replace(str(path), "PATH"))
    assert messages[0] == messages[1] and "holds transdiff_tiny 1-Step at 32 px" in messages[0]


def test_export_refusals(run, tmp_path):
    out = tmp_path / "run.safetensors"
    export_inference(str(run), str(out))
    with pytest.raises(FileExistsError, match="--force"):
        export_inference(str(run), str(out))
    export_inference(str(run), str(out), dtype="fp16", force=True)
    with pytest.raises(ValueError, match="must end in .safetensors"):
        export_inference(str(run), str(tmp_path / "run.pth"))
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_inference(str(run), str(tmp_path / "x.safetensors"), dtype="int8")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a TransDiff inference export"):
        load_transdiff(str(tmp_path / "foreign.safetensors"))
    data = out.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape("cannot read")):
        load_transdiff(str(tmp_path / "cut.safetensors"))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left
    assert np.isfinite(read_export(str(out))["model"]["fake_latent"].float().numpy()).all()


def test_main_evaluate_takes_an_export(run, tmp_path):
    """main.py's loader reads exports too: --evaluate generates the same images from the export as from the run."""
    import main

    out = tmp_path / "run.safetensors"
    export_inference(str(run), str(out))
    common = ["--preset", "digits", "--evaluate", "--skip_metrics", "--diffloss_w", "32", "--num_images", "10",
              "--eval_bsz", "10", "--num_sampling_steps", "2", "--data_path", str(tmp_path / "data")]
    for name, src in (("a", run), ("b", out)):
        main.cli(common + ["--resume", str(src), "--output_dir", str(tmp_path / name)])
    a, b = (sorted((tmp_path / name / "eval").glob("*/*.png")) for name in "ab")
    assert len(a) == len(b) == 10
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
