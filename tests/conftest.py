"""Test setup: without a GPU the Triton kernels run in Triton's interpreter.

TRITON_INTERPRET must be set before Triton kernels are imported, so it is set here, before any
test module imports ditflow. Every session draws a fresh seed (printed in the header);
DITFLOW_TEST_SEED=<n> replays one.
"""

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

SEED = int(os.environ.get("DITFLOW_TEST_SEED", random.SystemRandom().randrange(2**31)))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_report_header(config):
    return f"ditflow: device={DEVICE}, DITFLOW_TEST_SEED={SEED}"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and DEVICE.type != "cuda":
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SEED + sum(map(ord, request.node.nodeid)))


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="session")
def testbed_editor():
    """The trained testbed editor (FluxKontextPipeline), progress bars off."""
    return _testbed("editor")


@pytest.fixture(scope="session")
def testbed_t2i():
    """The trained testbed text-to-image model (FluxPipeline), progress bars off."""
    return _testbed("t2i")


def _testbed(kind: str):
    pytest.importorskip("diffusers")
    from ditflow.testbed.models import testbed_pipeline

    pipe = testbed_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe
