"""demo.ipynb runs headless (nbclient) on a tiny checkpoint in the digits preset's format and shows a grid."""
from pathlib import Path

import pytest
import torch

import engine_transdiff as engine
import main
from models.transdiff import build_model

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
REPO = Path(__file__).resolve().parents[1]


def preset_checkpoint(folder, data):
    """What `main.py --preset digits` saves, with the random weights of a model that never trained."""
    parser = main.get_args_parser()
    args = main.check_args(parser, main.parse_args(parser, ["--preset", "digits", "--data_path", str(data),
                                                            "--output_dir", str(folder)]))
    torch.manual_seed(0)
    sd = build_model(args.model, **engine.model_kwargs(args)).state_dict()
    folder.mkdir(parents=True)
    torch.save({"model": sd, "model_ema": sd, "epoch": 0, "args": args}, folder / "checkpoint-last.pth")
    return folder


def test_demo_notebook_executes_and_shows_a_grid(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    run = preset_checkpoint(tmp_path / "run", tmp_path / "data")
    nb = nbformat.read(REPO / "demo.ipynb", as_version=4)
    params = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    # papermill-style: a cell after the parameters cell overrides them
    nb.cells.insert(params + 1, nbformat.v4.new_code_cell(
        f"CHECKPOINT = {str(run)!r}\nCLASSES = [3, 7]\nPER_CLASS = 2\nSTEPS = 2\nCFG = 2.0"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel is one more process on a machine the tests keep busy
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any("1-Step model at 32 px, 10 classes" in o.get("text", "") for o in outputs)
