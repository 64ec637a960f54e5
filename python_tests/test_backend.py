import os
import subprocess
import sys

import pytest
import torch

import mmkernels
from mmkernels import backend, ops


def test_auto_on_cpu_is_reference():
    assert backend.select("rms_norm", torch.device("cpu")) == "reference"


def test_use_backend_forces_and_restores():
    with mmkernels.use_backend("triton"):
        assert backend.select("rms_norm", torch.device("cpu")) == "triton"
        with mmkernels.use_backend("reference"):
            assert backend.select("rms_norm", torch.device("cpu")) == "reference"
        assert backend.select("rms_norm", torch.device("cpu")) == "triton"
    assert backend.forced_backend() is None


def test_forcing_unavailable_backend_is_an_error():
    x, w = torch.randn(2, 8), torch.ones(8)
    with mmkernels.use_backend("cuda"):
        with pytest.raises(mmkernels.BackendUnavailableError, match="backend 'cuda' was forced for op 'rms_norm'"):
            ops.rms_norm(x, w)
    # swiglu has no csrc kernel at all: the message says so.
    with mmkernels.use_backend("cuda"):
        with pytest.raises(mmkernels.BackendUnavailableError, match="has no cuda implementation"):
            ops.swiglu(x, x)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = backend.availability("triton", "rms_norm", torch.device("cpu"))
    assert not ok and "TRITON_INTERPRET=1" in why


def test_env_variable(monkeypatch):
    monkeypatch.setenv("MMK_BACKEND", "triton")
    assert backend.forced_backend() == "triton"
    monkeypatch.setenv("MMK_BACKEND", "auto")
    assert backend.forced_backend() is None
    monkeypatch.setenv("MMK_BACKEND", "fastest")
    with pytest.raises(ValueError, match="MMK_BACKEND: unknown backend 'fastest'"):
        backend.forced_backend()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="use_backend: unknown backend 'cudnn'"):
        with mmkernels.use_backend("cudnn"):
            pass


def test_register_op_validates():
    with pytest.raises(ValueError, match="needs a 'reference' backend"):
        backend.register_op("bogus", ("triton",))
    with pytest.raises(ValueError, match="unknown backends"):
        backend.register_op("bogus", ("reference", "metal"))


def test_report_lists_every_op():
    rep = backend.report(torch.device("cpu"))
    for op in ("rms_norm", "rope", "swiglu", "attention"):
        assert op in rep and rep[op]["selected"] == "reference"
        assert rep[op]["reference"].startswith("yes")
        assert rep[op]["cuda"].startswith("no")


def test_env_backend_reaches_ops_in_subprocess():
    """MMK_BACKEND set before the process starts is honoured by the ops."""
    code = (
        "import torch, mmkernels\n"
        "from mmkernels import backend\n"
        "print(backend.select('swiglu', torch.device('cpu')))\n"
    )
    env = dict(os.environ, MMK_BACKEND="triton", TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "triton"
