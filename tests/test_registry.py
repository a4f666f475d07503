"""The backend registry: auto falls back silently, explicit backends raise with reasons."""

import pytest
import torch

from fastvl.ops.registry import BackendNotSupportedError, Op, register_op


def _op():
    op = Op("toy")
    op.implement("torch", lambda x: "torch")
    op.implement("cuda", lambda x: "cuda", lambda x: [] if x.dtype == torch.float16 else ["x must be fp16"])
    return op


def test_auto_falls_back_and_explicit_raises_with_reasons(monkeypatch):
    from fastvl.ops import registry

    op = _op()
    cuda = torch.device("cuda")
    # Pretend the cuda backend is present on this device; only the call's reasons matter.
    monkeypatch.setattr(registry, "backend_device_reasons", lambda backend, device: [])
    x16, x32 = torch.ones(1, dtype=torch.float16), torch.ones(1)
    assert op.select("auto", cuda, x16)(x16) == "cuda"
    assert op.select("auto", cuda, x32)(x32) == "torch"
    with pytest.raises(BackendNotSupportedError) as info:
        op.select("cuda", cuda, x32)
    assert info.value.reasons == ["x must be fp16"]
    assert "toy: backend 'cuda' cannot serve this call:\n  - x must be fp16" in str(info.value)


def test_missing_implementation_is_a_reason():
    op = _op()
    assert op.not_supported_reasons("triton", torch.device("cpu")) == ["toy has no triton implementation"]
    with pytest.raises(BackendNotSupportedError, match="toy has no triton implementation"):
        op.select("triton", torch.device("cpu"), torch.ones(1))


def test_bad_names():
    with pytest.raises(ValueError, match="unknown backend 'opencl'"):
        _op().implement("opencl", lambda x: x)
    with pytest.raises(ValueError, match="already registered"):
        register_op("gather_tokens")
