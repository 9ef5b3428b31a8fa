"""Kernel tests run the Triton kernels through the interpreter on CPU (no GPU needed).

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at conftest
import time (only on machines without CUDA: on a GPU the ``gpu``-marked tests compile the real
kernels). GPU-only tests are marked ``gpu`` and skip cleanly without CUDA.
"""

import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402




@pytest.fixture(params=[0, 1])
def seed(request):
    """Varying seed: every parametrisation draws fresh random inputs."""
    s = 1234 + 7919 * request.param
    torch.manual_seed(s)
    return s


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda")


@pytest.fixture
def cpu_interp():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 (set by conftest when CUDA is absent)")
    return torch.device("cpu")


def _close(actual, expected, rtol, atol, msg=""):
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert torch.isfinite(actual.float()).all(), f"{msg}: non-finite values"
    # atol is relative to the tensor's scale: sums of large terms (GEMMs) round in proportion to it
    atol = atol * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def close():
    return _close


@pytest.fixture
def rel():
    return _rel
