"""gather_tokens on every backend against a float64 reference, plus errors, autograd, compile.

On a CPU machine the Triton kernels run in the interpreter (shapes kept small); the cuda
backend and bf16 are covered by the `gpu` tests.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastvl import _extension, reference
from fastvl.ops import BackendNotSupportedError, gather_tokens
from fastvl.testing import (
    ODD_TOKEN_COUNTS,
    assert_opcheck,
    assert_within_reference_error,
    poison_outputs,
    random_index,
    random_tensor,
)
from tests.conftest import DEVICE, require_backend

KERNEL_BACKENDS = ("triton", "cuda")
ALL_BACKENDS = ("torch",) + KERNEL_BACKENDS
CPU_DTYPES = (torch.float32, torch.float16, torch.float64)
GPU_DTYPES = CPU_DTYPES + (torch.bfloat16,)


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _check_forward(backend, batch, num_tokens, num_kept, channels, dtype, seed, unique=True):
    g = _gen(seed)
    x = random_tensor(batch, num_tokens, channels, dtype=dtype, device=DEVICE, generator=g)
    index = random_index(batch, num_kept, num_tokens, unique=unique, device=DEVICE, generator=g)
    with poison_outputs():
        out = gather_tokens(x, index, backend=backend)
    expected = reference.gather_tokens(x.double(), index)
    assert out.dtype == dtype and out.shape == (batch, num_kept, channels)
    assert out.is_contiguous()
    # A gather copies values: it must be exact, and poisoned (NaN) leftovers fail equality.
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("num_tokens", ODD_TOKEN_COUNTS)
@pytest.mark.parametrize("channels", [1, 24, 80])
def test_forward_odd_sizes(backend, num_tokens, channels):
    require_backend("gather_tokens", backend)
    for seed, num_kept in enumerate(sorted({1, max(1, num_tokens // 4), num_tokens})):
        _check_forward(backend, 2, num_tokens, num_kept, channels, torch.float32, seed)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES if DEVICE.type == "cuda" else CPU_DTYPES)
def test_forward_dtypes_and_repeated_indices(backend, dtype):
    require_backend("gather_tokens", backend)
    _check_forward(backend, 3, 37, 50, 96, dtype, seed=1, unique=False)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_forward_channels_larger_than_one_block(backend):
    require_backend("gather_tokens", backend)
    # 4096 bytes per block in the Triton kernel: 1100 fp32 channels span two blocks.
    _check_forward(backend, 1, 9, 5, 1100, torch.float32, seed=3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_inputs(backend):
    require_backend("gather_tokens", backend)
    g = _gen(4)
    base = random_tensor(3, 40, 19, dtype=torch.float32, device=DEVICE, generator=g)
    x = base.transpose(1, 2).contiguous().transpose(1, 2)[:, 5:, 2:]  # (3, 35, 17), strided
    index = random_index(6, 3, 35, device=DEVICE, generator=g).t()  # (3, 6), strided
    assert not x.is_contiguous() and not index.is_contiguous()
    with poison_outputs():
        out = gather_tokens(x, index, backend=backend)
    torch.testing.assert_close(out, reference.gather_tokens(x, index), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5, 4, 3), (2, 5, 0, 3), (2, 5, 4, 0)])
def test_empty(backend, shape):
    require_backend("gather_tokens", backend)
    batch, num_tokens, num_kept, channels = shape
    x = random_tensor(batch, num_tokens, channels, device=DEVICE, requires_grad=True)
    index = random_index(batch, num_kept, num_tokens, device=DEVICE)
    out = gather_tokens(x, index, backend=backend)
    assert out.shape == (batch, num_kept, channels)
    out.sum().backward()
    assert torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES if DEVICE.type == "cuda" else CPU_DTYPES)
def test_backward_against_float64(backend, dtype):
    """Repeated indices make the gradient a real sum; kernels accumulate in fp32."""
    require_backend("gather_tokens", backend)
    g = _gen(5)
    batch, num_tokens, num_kept, channels = 2, 23, 90, 40
    x = random_tensor(batch, num_tokens, channels, dtype=dtype, device=DEVICE, generator=g)
    index = random_index(batch, num_kept, num_tokens, unique=False, device=DEVICE, generator=g)
    grad_out = random_tensor(batch, num_kept, channels, dtype=dtype, device=DEVICE, generator=g)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(gather_tokens(x, index, backend=backend), x, grad_out)
    expected = reference.scatter_add_tokens(grad_out.double(), index, num_tokens)
    low_precision = reference.scatter_add_tokens(grad_out, index, num_tokens)
    assert grad.dtype == dtype
    assert_within_reference_error(grad, expected, low_precision, factor=3, name="grad x")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradcheck_and_double_backward(backend):
    require_backend("gather_tokens", backend)
    g = _gen(6)
    x = random_tensor(2, 6, 3, dtype=torch.float64, device=DEVICE, generator=g, requires_grad=True)
    index = random_index(2, 8, 6, unique=False, device=DEVICE, generator=g)

    def fn(inp):
        return gather_tokens(inp, index, backend=backend)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def _kernel_ops(backend):
    ops = torch.ops.fastvl
    if backend == "triton":
        return ops.gather_tokens_triton.default, ops.scatter_add_tokens_triton.default
    return ops.gather_tokens_cuda.default, ops.scatter_add_tokens_cuda.default


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    require_backend("gather_tokens", backend)
    g = _gen(7)
    x = random_tensor(2, 11, 6, device=DEVICE, generator=g, requires_grad=True)
    index = random_index(2, 5, 11, device=DEVICE, generator=g)
    src = random_tensor(2, 5, 6, device=DEVICE, generator=g, requires_grad=True)
    # wrap_triton cannot capture interpreted kernels, so AOT tracing is checked on GPU only.
    gather_op, scatter_op = _kernel_ops(backend)
    for op, args in ((gather_op, (x, index)), (scatter_op, (src, index, 11))):
        assert_opcheck(op, args)


@pytest.mark.skipif(not _extension.is_built(), reason="fastvl._C is not built")
def test_cuda_ops_gradients_are_wired_without_a_gpu():
    """The cuda ops' registered backward runs (on fake cuda tensors, so no GPU is needed)."""
    gather_op, scatter_op = _kernel_ops("cuda")
    with FakeTensorMode():
        x = torch.empty(2, 5, 8, device="cuda", requires_grad=True)
        index = torch.zeros(2, 3, dtype=torch.int64, device="cuda")
        gathered = gather_op(x, index)
        grad_x, *_ = gathered.grad_fn.apply(torch.empty(2, 3, 8, device="cuda"))
        scattered = scatter_op(gathered, index, 5)
        grad_src, *_ = scattered.grad_fn.apply(torch.empty(2, 5, 8, device="cuda"))
    assert grad_x.shape == (2, 5, 8) and grad_x.device.type == "cuda"
    assert grad_src.shape == (2, 3, 8) and grad_src.device.type == "cuda"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_compiles_without_graph_breaks(backend):
    require_backend("gather_tokens", backend)
    torch._dynamo.reset()
    # On CPU: dynamo only (and aot_eager for torch); inductor is exercised on GPU.
    if DEVICE.type == "cuda":
        compiler = "inductor"
    else:
        compiler = "aot_eager" if backend == "torch" else "eager"
    x = random_tensor(2, 13, 8, device=DEVICE, requires_grad=True)
    index = random_index(2, 4, 13, device=DEVICE)

    @torch.compile(fullgraph=True, backend=compiler)
    def fn(inp, idx):
        return gather_tokens(inp, idx, backend=backend) * 2

    out = fn(x, index)
    torch.testing.assert_close(out, reference.gather_tokens(x, index) * 2)
    out.sum().backward()
    expected = reference.scatter_add_tokens(torch.full_like(out, 2.0), index, 13)
    torch.testing.assert_close(x.grad, expected)


def test_auto_uses_torch_on_cpu():
    from fastvl.ops.registry import OPS

    x = random_tensor(1, 4, 2)
    index = random_index(1, 2, 4)
    impl = OPS["gather_tokens"].select("auto", x.device, x, index)
    assert impl is reference.gather_tokens


@pytest.mark.gpu
def test_auto_uses_a_kernel_on_gpu():
    from fastvl.ops.registry import OPS

    x = random_tensor(1, 4, 2, device="cuda")
    index = random_index(1, 2, 4, device="cuda")
    impl = OPS["gather_tokens"].select("auto", x.device, x, index)
    assert impl is not reference.gather_tokens


# ---- bad input -------------------------------------------------------------------------


def _inputs():
    return random_tensor(2, 5, 3), random_index(2, 4, 5)


@pytest.mark.parametrize(
    "make_args, error, match",
    [
        (lambda x, i: (x[0], i), ValueError, r"x must be \(B, N, C\)"),
        (lambda x, i: (x, i[0]), ValueError, r"index must be \(B, K\)"),
        (lambda x, i: (x, i.int()), TypeError, r"index must be torch.int64"),
        (lambda x, i: (x, i.float()), TypeError, r"index must be torch.int64"),
        (lambda x, i: (x, i[:1]), ValueError, r"index batch size 1 does not match x \(batch 2\)"),
        (lambda x, i: (x.tolist(), i), TypeError, r"x must be a torch.Tensor"),
        (lambda x, i: (x, i.to("meta")), ValueError, r"x is on cpu but index is on meta"),
        (lambda x, i: (x, i - 1), ValueError, r"index values must lie in \[0, 5\).*from -1"),
        (lambda x, i: (x, i + 1), ValueError, r"index values must lie in \[0, 5\).*to 5"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bad_inputs_raise_clear_errors(make_args, error, match, backend):
    x, index = _inputs()
    index[:, 0] = 0  # keep min/max predictable for the range messages
    index[:, 1] = 4
    with pytest.raises(error, match=match):
        gather_tokens(*make_args(x, index), backend=backend)


def test_unknown_backend():
    x, index = _inputs()
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of"):
        gather_tokens(x, index, backend="cudnn")


def test_unavailable_backend_lists_reasons():
    x, index = _inputs()
    if DEVICE.type == "cpu":
        with pytest.raises(BackendNotSupportedError, match="CUDA device") as info:
            gather_tokens(x, index, backend="cuda")
        assert info.value.op == "gather_tokens" and info.value.reasons
    require_backend("gather_tokens", "triton", x.device)
    with pytest.raises(BackendNotSupportedError, match=r"x has dtype torch.int64"):
        gather_tokens(x.long(), index, backend="triton")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_unchecked_out_of_range_rows_are_zero(backend):
    """With check_bounds=False the kernels stay memory-safe: a bad index reads as zeros."""
    require_backend("gather_tokens", backend)
    x = random_tensor(1, 5, 3, device=DEVICE)
    index = torch.tensor([[0, 5, -1, 4]], device=DEVICE)
    out = gather_tokens(x, index, backend=backend, check_bounds=False)
    torch.testing.assert_close(out[0, [0, 3]], x[0, [0, 4]], rtol=0, atol=0)
    assert torch.count_nonzero(out[0, 1:3]) == 0


def test_eager_calls_launch_directly_and_tracing_calls_the_registered_op():
    """Eager mode runs the kernels without dispatching fastvl's custom ops (gradients
    included; a dispatch mode that only watches sees that path); under FakeTensorMode, as
    while torch.compile traces, the registered op (its fake impl) serves the call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    require_backend("gather_tokens", "triton")
    namespaces = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            namespaces.append(func.namespace)
            return func(*args, **(kwargs or {}))

    g = _gen(10)
    x = random_tensor(2, 7, 5, device=DEVICE, generator=g, requires_grad=True)
    index = random_index(2, 3, 7, device=DEVICE, generator=g)
    with Watch():
        out = gather_tokens(x, index, backend="triton", check_bounds=False)
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert namespaces and "fastvl" not in namespaces
    torch.testing.assert_close(out, reference.gather_tokens(x.detach(), index), rtol=0, atol=0)
    torch.testing.assert_close(grad, reference.scatter_add_tokens(torch.ones_like(out), index, 7))
    with FakeTensorMode() as mode:
        fake = gather_tokens(mode.from_tensor(x), mode.from_tensor(index), backend="triton",
                             check_bounds=False)
    assert fake.shape == (2, 3, 5)


# ---- the torch backend's flat-table path ---------------------------------------------------


def _loop_gather64(x, index):
    """Independent oracle: out[b, k] = x[b, index[b, k]] by Python loops, in float64."""
    out = torch.empty(*index.shape, x.shape[2], dtype=torch.float64)
    for b in range(index.shape[0]):
        for k in range(index.shape[1]):
            out[b, k] = x[b, int(index[b, k])].double()
    return out


def _loop_scatter_add64(src, index, num_tokens):
    out = torch.zeros(src.shape[0], num_tokens, src.shape[2], dtype=torch.float64)
    for b in range(index.shape[0]):
        for k in range(index.shape[1]):
            out[b, int(index[b, k])] += src[b, k].double()
    return out


def _strided_x(kind, g):
    """x (3, N, C): contiguous; batch-sliced (a view with an offset, still one flat table);
    token-sliced and channel-strided (no flat view: the torch.gather path)."""
    base = random_tensor(4, 13, 7, dtype=torch.float64, generator=g)
    return {"contiguous": base[:3].contiguous(), "batch-sliced": base[1:],
            "rows": base[:3, 2:, :5],
            "channels-last": base[:3].transpose(1, 2).contiguous().transpose(1, 2)}[kind]


def _force_index_check(monkeypatch, on_host):
    """The torch backend checks indices on the host (CPU, eager) or on the device (-1 rows,
    as under torch.compile or on a GPU): pick one."""
    import fastvl.reference.gather as module

    monkeypatch.setattr(module, "host_readable", lambda t: on_host)


@pytest.mark.parametrize("on_host", [True, False])
@pytest.mark.parametrize("kind", ["contiguous", "batch-sliced", "rows", "channels-last"])
def test_torch_path_values_and_gradients_against_loops(kind, on_host, monkeypatch):
    """reference.gather_tokens (the torch backend) and scatter_add_tokens against Python-loop
    float64 oracles, repeated indices included: exact (copies and sums of <= 4 terms in
    float64; rtol = atol = 0 for the gather, 1e-15 for the sums)."""
    _force_index_check(monkeypatch, on_host)
    g = torch.Generator().manual_seed(12)
    x = _strided_x(kind, g).requires_grad_(True)
    index = random_index(3, 9, x.shape[1], unique=False, generator=g)
    out = reference.gather_tokens(x, index)
    assert out.is_contiguous() and out.shape == (3, 9, x.shape[2])
    torch.testing.assert_close(out, _loop_gather64(x.detach(), index), rtol=0, atol=0)
    grad_out = random_tensor(3, 9, x.shape[2], dtype=torch.float64, generator=g)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    expected = _loop_scatter_add64(grad_out, index, x.shape[1])
    torch.testing.assert_close(grad, expected, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(reference.scatter_add_tokens(grad_out, index, x.shape[1]),
                               expected, rtol=1e-15, atol=1e-15)
    assert torch.autograd.gradgradcheck(lambda t: reference.gather_tokens(t, index), (x,))


@pytest.mark.parametrize("on_host", [True, False])
@pytest.mark.parametrize("bad", [6, -1, 100])
@pytest.mark.parametrize("sample", [0, 1])
def test_torch_path_out_of_range_raises(bad, sample, on_host, monkeypatch):
    """An index outside [0, N) raises like torch.gather; it never reads (or adds into)
    another sample's token of the flat (B * N) table."""
    _force_index_check(monkeypatch, on_host)
    x = random_tensor(2, 6, 3)
    index = torch.tensor([[0, 5], [1, 2]])
    index[sample, 1] = bad
    with pytest.raises((IndexError, RuntimeError)):
        reference.gather_tokens(x, index)
    with pytest.raises((IndexError, RuntimeError)):
        reference.scatter_add_tokens(random_tensor(2, 2, 3), index, 6)
    with pytest.raises((IndexError, RuntimeError)):
        gather_tokens(x, index, backend="torch", check_bounds=False)


# ---- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize(
    "shape", [(64, 196, 49, 768), (32, 577, 288, 1024), (4, 2880, 576, 4096), (3, 197, 100, 77)]
)
def test_gpu_large_shapes(backend, dtype, shape):
    require_backend("gather_tokens", backend)
    batch, num_tokens, num_kept, channels = shape
    _check_forward(backend, batch, num_tokens, num_kept, channels, dtype, seed=8)
    g = _gen(9)
    x = random_tensor(batch, num_tokens, channels, dtype=dtype, device=DEVICE, generator=g)
    index = random_index(batch, num_kept, num_tokens, device=DEVICE, generator=g)
    grad_out = random_tensor(batch, num_kept, channels, dtype=dtype, device=DEVICE, generator=g)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(gather_tokens(x, index, backend=backend), x, grad_out)
    expected = reference.scatter_add_tokens(grad_out.double(), index, num_tokens)
    # Unique indices: every gradient element is one copied value or zero, so exact.
    torch.testing.assert_close(grad.double(), expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.float32))
def test_gpu_cuda_backward_repeated_indices_deterministic(dtype):
    """Many repeated indices: the cuda scatter-add sums each output row in ascending k (no
    atomics), so it runs under torch.use_deterministic_algorithms and repeats bit for bit;
    its values match float64 within one rounding of a float32 sum."""
    require_backend("gather_tokens", "cuda")
    g = _gen(10)
    x = random_tensor(8, 577, 1024, dtype=dtype, device=DEVICE, generator=g, requires_grad=True)
    index = torch.randint(0, 577, (8, 2000), device=DEVICE, generator=g)
    grad_out = random_tensor(8, 2000, 1024, dtype=dtype, device=DEVICE, generator=g)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = [torch.autograd.grad(gather_tokens(x, index, backend="cuda", check_bounds=False),
                                     x, grad_out)[0] for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(grads[0], other) for other in grads[1:])
    expected = reference.scatter_add_tokens(grad_out.double(), index, 577)
    torch.testing.assert_close(grads[0].double(), expected, rtol=torch.finfo(dtype).eps,
                               atol=1e-5 * float(expected.abs().max()))
