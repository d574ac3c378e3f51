"""What a GPU run takes from the review of the CUDA paths, checked wherever the tests run (`--device cuda` runs
them on a GPU): the parity fixtures in fp32 on the device at 1e-4, the label check on the host, the inference
path of models/fused.py only on CPU, DDP with its gradients in the buckets, one TF32 policy."""
import os
import sys

import pytest
import test_model
import torch
from conftest import load_fixture
from helpers import REPO

import main as entry
from engine_transdiff import build_run
from models import fused
from models.tokenizers import build_tokenizer
from models.transdiff import build_model
from util import precision
from util.distributed import DistInfo

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def fixture_model(fx, device, **kwargs):
    return test_model.fixture_model(fx, **kwargs).to(device)


def test_parity_fixtures_on_the_device(device):
    """The reference tensors (fp32, CPU) reproduced on the device in fp32 with TF32 off, to 1e-4."""
    assert not precision.tf32_enabled()
    fx = load_fixture("parity_1step_256.pt")
    model = fixture_model(fx, device)
    on = {k: fx[k].to(device) for k in ("labels", "noise")}
    with torch.no_grad():
        cond = model.forward_encoder(model.class_emb(on["labels"]))
        probe = {k: v.to(device) for k, v in fx["decoder_probe"].items()}
        v = model.diffdecoder.net(probe["x"], probe["c"], probe["t"])
    torch.testing.assert_close(cond.cpu(), fx["conditions"], atol=1e-4, rtol=0)
    torch.testing.assert_close(v.cpu(), fx["decoder_probe"]["v"], atol=1e-4, rtol=0)
    for cfg, expected in fx["samples"].items():
        out = model.samples(on["labels"], fx["num_sampling_steps"], cfg=cfg, scale_0=fx["scale_0"],
                            scale_1=fx["scale_1"], noise=on["noise"])
        torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=0)
    mx = load_fixture("parity_mrar_256.pt")
    mrar = fixture_model(mx, device, mrar=True)
    out = mrar.samples(mx["labels"].to(device), mx["num_sampling_steps"], cfg=mx["cfg"], scale_0=mx["scale_0"],
                       scale_1=mx["scale_1"], noise=mx["noise"].to(device))
    torch.testing.assert_close(out.cpu(), mx["samples"], atol=1e-4, rtol=0)


def test_out_of_range_labels_are_one_clear_error_on_the_device(device):
    """Sampling checks a host copy: on CUDA this was a device-side assert that kills the process."""
    torch.manual_seed(0)
    model = build_model("transdiff_tiny", img_size=32, class_num=10).to(device)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\); got values from 3 to 10"):
        model.samples(torch.tensor([3, 10], device=device), 2)


def test_fused_path_only_where_it_was_checked():
    """models/fused.py serves CPU inference; any other device takes the plain path until the GPU check has
    shown parity and a gain there."""
    blk = torch.nn.Linear(2, 2).eval()
    with torch.no_grad():
        assert fused.applies(blk, torch.zeros(1))
        assert not fused.applies(blk, torch.zeros(1, device="meta"))
    assert fused.DEVICES == {"cpu"}


def test_tf32_policy_is_one_switch():
    previous = precision.set_tf32(True)
    try:
        assert precision.tf32_enabled()
        with precision.tf32(False):
            assert not precision.tf32_enabled()
        assert precision.tf32_enabled()
    finally:
        precision.set_tf32(*previous[:1])
    precision.set_tf32()
    assert not precision.tf32_enabled() and precision.TF32 is False


def digits_args(root, *extra):
    """main.py's arguments of the digits preset on a small slice of its data (tests' image folder)."""
    parser = entry.get_args_parser()
    args = entry.parse_args(parser, ["--preset", "digits", "--data_path", str(root / "data"), "--output_dir",
                                     str(root / "out"), "--num_workers", "0", "--batch_size", "4",
                                     "--class_num", "2", *map(str, extra)])
    return entry.check_args(parser, args)


@pytest.fixture
def one_rank_group():
    """A process group of one rank (gloo), as torchrun would make it with more."""
    with gpu_check.one_rank_group(torch.device("cpu")):
        yield


def test_ddp_keeps_gradients_in_its_buckets(tmp_path, one_rank_group):
    from helpers import write_image_folder
    write_image_folder(tmp_path / "data", per_class=4, corrupt=False)
    args = digits_args(tmp_path, "--pixel_channels", "3", "--gradient_accumulation_steps", "2")
    dist = DistInfo(device=torch.device("cpu"))
    os.makedirs(args.output_dir)
    run = build_run(args, dist, build_tokenizer(args), None)
    assert isinstance(run.model, torch.nn.parallel.DistributedDataParallel)
    assert run.model.gradient_as_bucket_view
