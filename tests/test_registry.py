"""The op registry: declared capabilities, generated reasons, the dispatch table, auto."""

import json

import pytest
import torch

import fastvl
from fastvl.ops import registry
from fastvl.ops.registry import (
    ALL, BackendNotSupportedError, Call, Op, Supports, check_backend_name, register_op,
)

FEATURES = {"bias": "a bias", "lse": "the lse output"}


def _describe(x, bias=None, lse=False):
    features = (("bias",) if bias is not None else ()) + (("lse",) if lse else ())
    return Call(x.device, x.dtype, features, (("width", x.shape[-1]),))


def _op():
    op = Op("toy", FEATURES, {"width": "row width"}, _describe)
    op.implement("torch", lambda *a, **k: "torch", Supports(features=ALL, dtype_of="x"))
    op.implement("cuda", lambda *a, **k: "cuda", Supports(
        dtypes=(torch.float16,), dtype_of="x", features=frozenset({"bias"}),
        max_sizes={"width": 8},
    ))
    op.implement("sdpa", lambda *a, **k: "sdpa", Supports(
        dtype_of="x", features_on={"cpu": frozenset({"bias"})},
    ))
    return op


@pytest.fixture
def gpu_everywhere(monkeypatch):
    """Every backend's device check passes; only the declared capabilities decide."""
    monkeypatch.setattr(registry, "backend_device_reasons", lambda backend, device: [])


def test_reasons_are_generated_from_declarations(gpu_everywhere):
    op = _op()
    x = torch.ones(2, 16)  # float32, width 16
    reasons = op.not_supported_reasons("cuda", x.device, x, None, True)
    assert reasons == [
        "x has dtype torch.float32; cuda supports float16",
        "row width 16 is above cuda's maximum 8",
        "the lse output: not supported by cuda",
    ]
    assert op.not_supported_reasons("torch", x.device, x, x, True) == []
    # A feature served on one device type only says where.
    cuda_call = Call(torch.device("cuda"), torch.float32, ("bias",))
    assert op.call_reasons("sdpa", cuda_call) == ["a bias: not supported by sdpa (only on cpu)"]
    assert op.call_reasons("sdpa", cuda_call._replace(device=torch.device("cpu"))) == []


def test_explicit_backend_raises_with_reasons(gpu_everywhere):
    op = _op()
    x = torch.ones(2, 4)
    with pytest.raises(BackendNotSupportedError) as info:
        op.select("cuda", x.device, x)
    assert info.value.reasons == ["x has dtype torch.float32; cuda supports float16"]
    assert "toy: backend 'cuda' cannot serve this call:\n  - x has dtype" in str(info.value)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        op.select("opencl", x.device, x)


def test_auto_follows_the_dispatch_table_and_falls_back(gpu_everywhere, monkeypatch):
    op = _op()
    table = {"devices": {"cuda": {"toy": ["cuda", "sdpa", "torch"]}, "cpu": {"*": ["sdpa"]}}}
    monkeypatch.setattr(registry, "DISPATCH_TABLE", table)
    cuda = torch.device("cuda")
    monkeypatch.setattr(registry, "device_kind", lambda device: device.type)
    x16, x32 = torch.ones(2, 4, dtype=torch.float16), torch.ones(2, 4)
    # describe() reads the device off the tensors; pretend they live on the GPU.
    op.describe = lambda x, *a: _describe(x, *a)._replace(device=cuda)
    assert op.select("auto", cuda, x16)() == "cuda"
    assert op.select("auto", cuda, x32)() == "sdpa"  # cuda is fp16 only
    assert op.select("auto", cuda, x32, None, True)() == "torch"  # lse: torch only
    # Backends the table leaves out are tried after the listed ones.
    assert registry.dispatch_order(op, "cpu") == ("sdpa", "cuda", "torch")


def test_auto_error_lists_every_implementation(gpu_everywhere):
    op = Op("strict", FEATURES, {}, _describe)
    op.implement("torch", lambda *a: "torch", Supports(dtypes=(torch.float64,), dtype_of="x"))
    op.implement("sdpa", lambda *a: "sdpa", Supports(dtype_of="x"))
    x = torch.ones(2, 4)
    with pytest.raises(BackendNotSupportedError) as info:
        op.select("auto", x.device, x, x)
    assert info.value.backend == "auto"
    assert sorted(info.value.reasons) == sorted([
        "torch: x has dtype torch.float32; torch supports float64",
        "torch: a bias: not supported by torch",
        "sdpa: a bias: not supported by sdpa",
    ])
    assert str(info.value).startswith("strict: no backend can serve this call:")


def test_missing_implementation_and_bad_declarations():
    op = _op()
    assert op.not_supported_reasons("triton", torch.device("cpu"), torch.ones(1)) == [
        "toy has no triton implementation"
    ]
    with pytest.raises(ValueError, match="unknown backend 'opencl'"):
        op.implement("opencl", lambda x: x)
    with pytest.raises(ValueError, match="declares unknown features"):
        op.implement("triton", lambda x: x, Supports(features=frozenset({"flash"})))
    with pytest.raises(ValueError, match="already registered"):
        register_op("gather_tokens")
    assert check_backend_name("m", "auto") == "auto"
    with pytest.raises(ValueError, match="m: backend must be 'auto' or one of"):
        check_backend_name("m", "tritn")


def test_library_attention_implementations_are_registered():
    attention = registry.OPS["attention"]
    assert {"sdpa", "flash_attn", "xformers", "triton", "torch"} <= set(attention.impls)
    assert "flash_attn" in registry.OPS["varlen_attention"].impls
    # On CPU, auto takes SDPA for what it expresses and the torch backend for the rest.
    q = torch.randn(1, 4, 5, 8)
    k = torch.randn(1, 2, 5, 8)
    plain = (q, k, k, None, None, 0.3, True, 1.0, False, None, 0.0)
    with_lse = plain[:8] + (True,) + plain[9:]
    assert attention.select("auto", q.device, *plain) is attention.impls["sdpa"].fn
    assert attention.select("auto", q.device, *with_lse) is attention.impls["torch"].fn


def test_gpu_priority_puts_libraries_first_and_kernels_for_what_only_they_serve():
    """The shipped GPU default, until a measurement replaces it: library kernels for calls
    they can express, fastvl's kernels for key bias, soft causal, prefix-LM and lse."""
    attention = registry.OPS["attention"]
    order = registry.dispatch_order(attention, "cuda:9.0")
    assert order.index("sdpa") < order.index("triton") < order.index("torch")
    assert order.index("flash_attn") < order.index("sdpa")
    cuda = torch.device("cuda")
    reasons = lambda features: attention.call_reasons(  # noqa: E731
        "sdpa", Call(cuda, torch.float16, features, (("head_dim", 64),))
    )
    with registry.simulate_gpu_dispatch():
        assert reasons(("gqa", "causal")) == []
        for only_fastvl in ("key_bias", "soft_causal", "prefix_len", "lse"):
            assert reasons((only_fastvl,)), only_fastvl


def test_simulated_gpu_dispatch_picks_the_gpu_path_on_cpu():
    q = torch.randn(1, 2, 5, 8)
    bias = torch.randn(1, 5)
    args = (q, q, q, bias, None, 0.3, False, 1.0, False, None, 0.0)
    attention = registry.OPS["attention"]
    assert attention.select("auto", q.device, *args) is attention.impls["sdpa"].fn
    with registry.simulate_gpu_dispatch("9.0"):
        assert registry.device_kind(q.device) == "cuda:9.0"
        # SDPA's CUDA kernels give NaN for rows a -inf key bias empties: the kernel serves it.
        if not registry.TRITON_IMPORT_ERROR:
            assert attention.select("auto", q.device, *args) is attention.impls["triton"].fn
    assert registry.device_kind(q.device) == "cpu"


def test_dispatch_table_file_round_trip(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"devices": {"cpu": {"attention": ["torch", "sdpa"]}}}))
    try:
        registry.load_dispatch_table(str(path))
        assert registry.OPS["attention"].order(torch.device("cpu"))[:2] == ("torch", "sdpa")
        q = torch.randn(1, 2, 3, 4)
        args = (q, q, q, None, None, 0.5, False, 1.0, False, None, 0.0)
        assert registry.OPS["attention"].select("auto", q.device, *args) is (
            registry.OPS["attention"].impls["torch"].fn
        )
    finally:
        registry.load_dispatch_table()
    assert registry.OPS["attention"].order(torch.device("cpu"))[0] == "sdpa"
    path.write_text(json.dumps({"devices": {"cpu": {"attention": ["opencl"]}}}))
    with pytest.raises(ValueError, match="unknown backends"):
        registry.load_dispatch_table(str(path))


def test_no_module_outside_the_registry_lists_backend_names():
    """Modules and patches validate ``backend`` through the registry."""
    from fastvl.nn import Attention, LoRALinear

    with pytest.raises(ValueError, match="one of .*'sdpa'"):
        Attention(16, num_heads=2, backend="tritn")
    assert Attention(16, num_heads=2, backend="sdpa").backend == "sdpa"
    with pytest.raises(ValueError, match="LoRALinear: backend must be 'auto' or one of"):
        LoRALinear(torch.nn.Linear(4, 4), r=2, alpha=4, backend="sdpa")
    assert fastvl.ops.BACKENDS == registry.BACKENDS


def test_interpreted_triton_refuses_bfloat16(monkeypatch):
    """The Triton interpreter's bfloat16 tl.dot gives garbage: on CPU under TRITON_INTERPRET=1
    the triton backend refuses bfloat16 with that reason, auto takes the next backend, and
    float16 stays served. On a (simulated) GPU bfloat16 is served."""
    if registry.TRITON_IMPORT_ERROR:
        pytest.skip(registry.TRITON_IMPORT_ERROR)
    monkeypatch.setattr(registry, "TRITON_INTERPRETER", True)
    gather = registry.OPS["gather_tokens"]
    cpu = torch.device("cpu")
    assert "the Triton interpreter" in " ".join(
        gather.call_reasons("triton", Call(cpu, torch.bfloat16)))
    assert gather.call_reasons("triton", Call(cpu, torch.float16)) == []
    x = torch.randn(2, 5, 4, dtype=torch.bfloat16)
    index = torch.tensor([[0, 4], [1, 1]])
    with pytest.raises(BackendNotSupportedError, match="bfloat16 dot products"):
        fastvl.ops.gather_tokens(x, index, backend="triton")
    assert torch.equal(fastvl.ops.gather_tokens(x, index), x.gather(1, index[..., None].expand(-1, -1, 4)))
    with registry.simulate_gpu_dispatch():
        assert gather.call_reasons("triton", Call(cpu, torch.bfloat16)) == []
