"""Shared test helpers: the reference fixtures and their deterministic weights."""
import importlib.util
import json
import os

import pytest
import torch

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _load_synth():
    spec = importlib.util.spec_from_file_location("synth", os.path.join(FIXTURES, "synth.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.synth_state_dict


synth_state_dict = _load_synth()


def load_fixture(name):
    return torch.load(os.path.join(FIXTURES, name), map_location="cpu", weights_only=False)


@pytest.fixture(scope="session")
def manifests():
    with open(os.path.join(FIXTURES, "official_state_dicts.json")) as f:
        return json.load(f)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device of the tests that take one (`device` fixture): cpu or "
                                                     "cuda; fp32 there runs with TF32 off, as util/precision says")


@pytest.fixture(scope="session")
def device(request):
    """torch.device of --device; a test that asks for it runs there (skipped when that device is absent)."""
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda, but no CUDA device is visible")
    from util.precision import set_tf32
    set_tf32(False)  # parity at 1e-4 in fp32 needs fp32 matrix products
    return dev
