"""lora_linear / routed_lora_linear on every backend against an independent float64 reference.

The oracle (:mod:`tests.samples_lora`) is the formula written out per token,
``x Wᵀ + b + scaling · (x Aₑᵀ) Bₑᵀ``, sharing no code with fastvl. Tolerance rule
(flash-attn's): a backend's max error against the formula in float64 is at most 2x (forward) /
3x (gradients of x, weight, bias, lora_a, lora_b) the error of the same formula run in the
tested dtype, plus a small absolute floor. The torch backend is also checked by gradcheck in
float64.

On a CPU machine the Triton kernels run in the interpreter with 16-wide blocks, so the small
shapes here span several blocks of rows, of in / out features and (with r = 20) of the rank
padding; bf16 and large shapes are `gpu` tests.
"""

from __future__ import annotations

import pytest
import torch

from fastvl.ops import BackendNotSupportedError, lora_linear, routed_lora_linear
from fastvl.testing import (
    ERROR_FLOOR,
    assert_grads_within_reference_error,
    assert_opcheck,
    assert_within_reference_error,
    poison_outputs,
    random_tensor,
)
from tests.conftest import DEVICE, require_backend
from tests.samples_lora import (
    NAMES,
    LoRASample,
    generator as _gen,
    lora_params as _params,
    lora_reference,
    plain_samples,
    route_values as _routes,
    routed_samples,
)

ALL_BACKENDS = ("torch", "triton")
CPU_DTYPES = (torch.float32, torch.float16)
PLAIN = plain_samples()
ROUTED = routed_samples()


def _run(fn, params, dtype, trainable_base=True):
    """fn(*leaves) and the gradients of every leaf (zeros where fn does not use it; None for
    a frozen base) for a fixed random output gradient."""
    leaves = [None if t is None else t.to(dtype).detach().requires_grad_(
        trainable_base or i not in (1, 2)) for i, t in enumerate(params)]
    out = fn(*leaves)
    grad = random_tensor(*out.shape, dtype=torch.float64, device=DEVICE, generator=_gen(99))
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wrt, grad.to(dtype), allow_unused=True,
                                     materialize_grads=True))
    return out, [next(grads) if t is not None and t.requires_grad else None for t in leaves]


def _check_backend(backend, dtype, sample, trainable_base=True, **kwargs):
    """The backend in dtype vs the float64 formula, by the error rule (the formula in dtype
    sets the error budget); returns the backend's gradients."""
    with poison_outputs():
        out, grads = _run(lambda *t: sample.call(*t, backend=backend, **kwargs), sample.tensors,
                          dtype, trainable_base)
    ref, ref_grads = _run(sample.reference, sample.tensors, torch.float64, trainable_base)
    low, low_grads = _run(sample.reference, sample.tensors, dtype, trainable_base)
    floor = ERROR_FLOOR[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    assert_within_reference_error(out, ref, low, factor=2, atol=floor)
    present = [i for i, g in enumerate(grads) if g is not None]
    assert present == [i for i, g in enumerate(ref_grads) if g is not None]
    if not trainable_base:
        assert present == [0, 3, 4]
    assert_grads_within_reference_error(
        [NAMES[i] for i in present], [grads[i] for i in present],
        [ref_grads[i] for i in present], [low_grads[i] for i in present], atol=floor,
    )
    return grads


# ---- torch backend: gradcheck, its two routed forms ----------------------------------------


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
@pytest.mark.parametrize("sample", PLAIN + ROUTED, ids=lambda s: s.name)
def test_torch_backend_gradcheck(sample, dropout_p):
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in sample.tensors]
    given = [t for t in leaves if t is not None]

    def fn(*tensors):
        tensors = iter(tensors)
        return sample.call(*[None if t is None else next(tensors) for t in leaves],
                           dropout_p=dropout_p, seed=6, backend="torch")

    assert torch.autograd.gradcheck(fn, given, fast_mode=True)


@pytest.mark.parametrize("path", ["segments", "dense"])
def test_torch_routed_paths_match_formula_and_gradcheck(path, monkeypatch):
    """Both forms of the torch backend's routed_lora_linear (per-adapter row segments, used
    on CPU in eager mode, and the dense one-hot form) against the per-token formula in
    float64 (rtol = atol = 1e-12), gradients by gradcheck; -1 rows, an unused adapter, rows
    routed outside [0, E) (unchecked: no adapter in both forms), dropout with a seed."""
    import fastvl.reference.lora as reference_lora

    if DEVICE.type != "cpu":
        pytest.skip("the segment form is a CPU path")
    monkeypatch.setattr(reference_lora, "SEGMENT_MIN_ADAPTERS", 2 if path == "segments" else 99)
    calls = []
    original = reference_lora._routed_by_segments
    monkeypatch.setattr(reference_lora, "_routed_by_segments",
                        lambda *args: calls.append(1) or original(*args))
    x, weight, bias, lora_a, lora_b = _params((11,), 12, 10, 4, 4, seed=21)
    route = torch.tensor([2, -1, 0, 2, 1, 0, 5, 2, -3, 1, 0], device=DEVICE)  # adapter 3 unused
    scaling = torch.tensor([0.5, -2.0, 3.0, 1.25], dtype=torch.float64, device=DEVICE)
    valid = torch.where((route >= 0) & (route < 4), route, -1)
    for scale in (scaling, 1.5):
        out = routed_lora_linear(x, weight, bias, lora_a, lora_b, scale, route,
                                 backend="torch", check_route=False)
        expected = lora_reference(x, weight, bias, lora_a, lora_b, scale, valid)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert len(calls) == (2 if path == "segments" else 0)

    leaves = [t.detach().requires_grad_(True) for t in (x, weight, bias, lora_a, lora_b)]
    assert torch.autograd.gradcheck(
        lambda *t: routed_lora_linear(*t, scaling, route, dropout_p=0.3, seed=7,
                                      backend="torch", check_route=False), leaves)
    routed_lora_linear(*leaves, scaling, valid, backend="torch").sum().backward()
    assert torch.count_nonzero(leaves[3].grad[3]) == 0 and torch.count_nonzero(leaves[4].grad[3]) == 0
    # Dropout with a seed draws one mask over all of x in both forms: the same output.
    monkeypatch.setattr(reference_lora, "SEGMENT_MIN_ADAPTERS", 99)
    dense = routed_lora_linear(x, weight, bias, lora_a, lora_b, scaling, valid, dropout_p=0.5,
                               seed=3, backend="torch")
    monkeypatch.setattr(reference_lora, "SEGMENT_MIN_ADAPTERS", 2)
    segments = routed_lora_linear(x, weight, bias, lora_a, lora_b, scaling, valid,
                                  dropout_p=0.5, seed=3, backend="torch")
    torch.testing.assert_close(segments, dense, rtol=1e-12, atol=1e-12)


# ---- backends vs the float64 formula ------------------------------------------------------


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("sample", PLAIN, ids=lambda s: s.name)
def test_plain(backend, dtype, sample):
    """Every sample, degenerate sizes included (in = 0: the bias; N, out or r = 0)."""
    require_backend("lora_linear", backend)
    _check_backend(backend, dtype, sample)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("sample", ROUTED, ids=lambda s: s.name)
def test_routed(backend, dtype, sample):
    """Every sample, degenerate sizes included (E = 0: the base layer; in = 0, r = 0);
    adapters without tokens get zero gradients (not None)."""
    require_backend("routed_lora_linear", backend)
    grads = _check_backend(backend, dtype, sample)
    used = set(sample.route.unique().tolist())
    for e in range(sample.tensors[3].shape[0]):
        if e not in used:
            assert torch.count_nonzero(grads[3][e]) == 0 and torch.count_nonzero(grads[4][e]) == 0


@pytest.mark.parametrize("form", ["triton", "torch_segments", "torch_dense"])
def test_unused_adapter_values_do_not_reach_results(form, monkeypatch):
    """NaN / inf in the A, B and scale of adapters no token is routed to (between used ones
    and last) change neither the output nor any gradient: the float64 formula (which never
    reads them) within 1e-5 in float32, zero gradients for those adapters."""
    import fastvl.reference.lora as reference_lora

    backend = "triton" if form == "triton" else "torch"
    require_backend("routed_lora_linear", backend)
    if form != "triton" and DEVICE.type != "cpu":
        pytest.skip("the segment form is a CPU path")
    monkeypatch.setattr(reference_lora, "SEGMENT_MIN_ADAPTERS",
                        99 if form == "torch_dense" else 2)
    x, weight, bias, lora_a, lora_b = _params((2, 19), 24, 18, 4, 4, seed=50)
    for unused, value in ((1, float("nan")), (3, float("inf"))):
        lora_a[unused, 0, 2] = value
        lora_b[unused, 5, 1] = -value
    scaling = torch.tensor([0.5, float("nan"), 2.0, float("inf")], device=DEVICE)
    route = _routes("mixed", (2, 19), 3, seed=51) * 2  # -2 (unchecked: none), 0 and 2
    sample = LoRASample("poisoned", (x, weight, bias, lora_a, lora_b), scaling, route)
    out, grads = _run(lambda *t: sample.call(*t, backend=backend, check_route=False),
                      sample.tensors, torch.float32)
    ref, ref_grads = _run(sample.reference, sample.tensors, torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(NAMES, grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.count_nonzero(grads[3][1::2]) == 0 and torch.count_nonzero(grads[4][1::2]) == 0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_unchecked_route_outside_range_gets_no_adapter(backend):
    """With check_route=False (as under torch.compile) route values outside [-1, E) get no
    adapter on every backend (no out-of-bounds read), E = 0 included."""
    require_backend("routed_lora_linear", backend)
    for num_adapters in (3, 0):
        x, weight, bias, lora_a, lora_b = (t.float() for t in _params(
            (9,), 20, 18, 4, num_adapters, seed=52))
        route = torch.tensor([0, 3, -1, 7, -5, 2, 1, 3, 0], device=DEVICE)
        valid = torch.where((route >= 0) & (route < num_adapters), route, -1)
        out = routed_lora_linear(x, weight, bias, lora_a, lora_b, 1.5, route, backend=backend,
                                 check_route=False)
        expected = lora_reference(*(t.double() for t in (x, weight, bias, lora_a, lora_b)),
                                  1.5, valid)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


# ---- multi-adapter decode: the row path, routes per sequence ------------------------------

DECODE_ADAPTERS = 12


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("num_rows, in_f, out_f, rank", [
    (1, 16, 16, 1), (5, 37, 50, 20), (7, 40, 33, 8), (19, 24, 18, 4),
])
@pytest.mark.parametrize("routed", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_row_path_matches_row_blocks(dtype, num_rows, in_f, out_f, rank, routed, dropout_p):
    """The decode (row) forward and the row-block forward give the same output, the same
    stored shrink s and the same dropout mask, and both are within the error rule."""
    require_backend("lora_linear", "triton")
    from fastvl.kernels.lora import lora_forward

    num_adapters = DECODE_ADAPTERS if routed else 1
    x, weight, _, lora_a, lora_b = _params((num_rows,), in_f, out_f, rank, num_adapters, seed=40)
    route = _routes("mixed", (num_rows,), num_adapters, seed=41) if routed else None
    scale = torch.rand(num_adapters, generator=_gen(42), device=DEVICE) + 0.5

    def run(row_path, dt):
        out = torch.nn.functional.linear(x.to(dt), weight.to(dt))
        with poison_outputs():
            s = lora_forward(x.to(dt), lora_a.to(dt), lora_b.to(dt), scale, route, dropout_p,
                             43, out, row_path=row_path)
        return out, s[:, :rank]

    rows, s_rows = run(True, dtype)
    blocks, s_blocks = run(False, dtype)
    torch.testing.assert_close(s_rows, s_blocks, rtol=1e-5, atol=1e-5)
    if dropout_p == 0.0:
        ref, _ = run(False, torch.float64)  # (the interpreter runs float64 too)
        xl, wl, al, bl = (t.to(dtype) for t in (x, weight, lora_a, lora_b))
        if routed:
            low = routed_lora_linear(xl, wl, None, al, bl, scale, route, backend="torch")
        else:
            low = lora_linear(xl, wl, None, al[0], bl[0], scale[0].item(), backend="torch")
        for got in (rows, blocks):
            assert_within_reference_error(got, ref, low, factor=2, atol=ERROR_FLOOR[dtype])
    else:  # same mask: identical up to the summation order of the shrink
        torch.testing.assert_close(rows.float(), blocks.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_multi_adapter_decode_step(backend, dtype):
    """A decode step of 6 sequences over 12 adapters, one adapter per sequence given as a
    (B, 1) route (one sequence without an adapter): forward and gradients vs float64."""
    require_backend("routed_lora_linear", backend)
    params = _params((6, 1), 40, 33, 8, DECODE_ADAPTERS, seed=44)
    route = torch.tensor([[3], [11], [-1], [0], [3], [7]], device=DEVICE)
    scaling = torch.linspace(0.5, 2.0, DECODE_ADAPTERS, device=DEVICE)
    _check_backend(backend, dtype, LoRASample("decode", params, scaling, route))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_and_expanded_route_and_scales(backend):
    """A non-contiguous route (N,) and per-adapter scales (E,), strided or expanded (stride
    0), give the float64 formula's result (float32, 1e-5)."""
    require_backend("routed_lora_linear", backend)
    params = _params((7,), 24, 18, 4, 3, seed=48)
    strided = (_routes("mixed", (14,), 3, seed=49)[::2],
               torch.tensor([0.5, 9.0, 1.5, 9.0, 2.0, 9.0], device=DEVICE)[::2])
    expanded = (torch.tensor(1, device=DEVICE).expand(7),
                torch.tensor(2.0, device=DEVICE).expand(3))
    for route, scales in (strided, expanded):
        assert not route.is_contiguous() and not scales.is_contiguous()
        out = routed_lora_linear(*(t.float() for t in params), scales, route, backend=backend)
        expected = lora_reference(*params, scales, route)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("row_path", [True, False])
def test_triton_kernels_read_strided_route_and_scale(row_path):
    """The kernels' launchers (behind the registered ops that torch.compile calls) make a
    strided route and scale tensor contiguous: forward and backward give what contiguous
    copies give, the forward the float64 formula's result."""
    require_backend("routed_lora_linear", "triton")
    from fastvl.kernels.lora import lora_backward, lora_forward

    num_rows = 5 if row_path else 40
    params = _params((num_rows,), 24, 18, 4, 3, seed=53)
    x, _, _, lora_a, lora_b = (t.float() for t in params)
    route = _routes("mixed", (2 * num_rows,), 3, seed=54)[::2]
    scale = torch.tensor([0.5, 9.0, 1.5, 9.0, 2.0, 9.0], device=DEVICE)[::2]
    grad_out = random_tensor(num_rows, 18, device=DEVICE, generator=_gen(55))

    def run(route, scale):
        out = torch.zeros(num_rows, 18, device=DEVICE)
        s = lora_forward(x, lora_a, lora_b, scale, route, 0.0, 0, out, row_path=row_path)
        dx = torch.zeros_like(x)
        return out, dx, lora_backward(grad_out, x, lora_a, lora_b, scale, route, s, 0.0, 0, dx)

    strided, dense = run(route, scale), run(route.contiguous(), scale.contiguous())
    zero_base = (torch.zeros_like(params[1]), None)
    expected = lora_reference(params[0], *zero_base, *params[3:], scale, route)
    torch.testing.assert_close(strided[0].double(), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(strided, dense):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.fixture
def deterministic_algorithms():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("routed", [False, True])
def test_deterministic_backward_without_atomics(routed, deterministic_algorithms):
    """Under torch.use_deterministic_algorithms(True) (nothing to switch: the kernels sum
    dA / dB in row order, without atomics, always): the gradients within the rule vs
    float64, and run twice, bit-identical."""
    require_backend("routed_lora_linear", "triton")
    lead, in_f, out_f, rank = (3, 13), 40, 33, 8
    params = _params(lead, in_f, out_f, rank, 3 if routed else None, seed=46)
    route = _routes("mixed", lead, 3, seed=47)

    sample = LoRASample("deterministic", params, 1.5, route if routed else None)
    first = _check_backend("triton", torch.float32, sample)
    again = _run(lambda *t: sample.call(*t, backend="triton"), params, torch.float32)[1]
    for got, want in zip(first[3:], again[3:]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_frozen_base_gets_no_gradient(backend):
    require_backend("lora_linear", backend)
    params = _params((2, 11), 20, 18, 4, None, seed=10)
    _check_backend(backend, torch.float32, LoRASample("frozen_base", params, 2.0),
                   trainable_base=False)


# ---- dropout -----------------------------------------------------------------------------


def _dropout_mask(backend, lead, rank, dropout_p, seed, routed):
    """The keep-mask a backend applies to x (lead, r) for ``seed``, read through identity
    adapters (in = out = r, zero base weight): out = dropout(x) exactly."""
    x = random_tensor(*lead, rank, device=DEVICE, generator=_gen(11))
    eye = torch.eye(rank, device=DEVICE)
    zero = torch.zeros(rank, rank, device=DEVICE)
    if routed:
        route = torch.zeros(lead, dtype=torch.int64, device=DEVICE)
        out = routed_lora_linear(x, zero, None, eye[None], eye[None], 1.0, route,
                                 dropout_p=dropout_p, seed=seed, backend=backend)
    else:
        out = lora_linear(x, zero, None, eye, eye, 1.0, dropout_p=dropout_p, seed=seed,
                          backend=backend)
    keep = out != 0
    torch.testing.assert_close(out[keep], x[keep] / (1 - dropout_p))
    return keep


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dropout_statistics_and_determinism(backend):
    require_backend("lora_linear", backend)
    p = 0.3
    mask = _dropout_mask(backend, (64,), 32, p, seed=12, routed=False)
    # 2048 Bernoulli(0.7) draws: the kept fraction is within 5 sigma (0.05) of 0.7.
    assert abs(mask.float().mean().item() - (1 - p)) < 0.05
    assert torch.equal(mask, _dropout_mask(backend, (64,), 32, p, seed=12, routed=False))
    assert not torch.equal(mask, _dropout_mask(backend, (64,), 32, p, seed=13, routed=False))
    # The routed op draws the same mask (same rows, same seed).
    assert torch.equal(mask, _dropout_mask(backend, (64,), 32, p, seed=12, routed=True))


@pytest.mark.parametrize("routed", [False, True])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dropout_forward_backward(backend, routed):
    """Forward and gradients with dropout against float64 with the backend's own mask."""
    require_backend("lora_linear", backend)
    lead, in_f, out_f, p, seed = (2, 9), 16, 21, 0.25, 14
    keep = _dropout_mask(backend, lead, in_f, p, seed, routed).double()
    params = _params(lead, in_f, out_f, 6, 2 if routed else None, seed=15)
    route = _routes("mixed", lead, 2, seed=16)

    def call(*t):
        if routed:
            return routed_lora_linear(*t, 1.5, route, dropout_p=p, seed=seed, backend=backend)
        return lora_linear(*t, 1.5, dropout_p=p, seed=seed, backend=backend)

    def masked_reference(x, *tensors):
        return lora_reference(x, *tensors, 1.5, route if routed else None,
                              lora_input=x * keep / (1 - p))

    with poison_outputs():
        out, grads = _run(call, params, torch.float32)
    ref, ref_grads = _run(masked_reference, params, torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(NAMES, grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=name)


def test_dropout_without_seed_follows_torch_generator():
    params = [t.float() for t in _params((4, 8), 16, 12, 4, None, seed=17)]
    outs = []
    for _ in range(2):
        torch.manual_seed(18)
        outs.append(lora_linear(*params, 1.0, dropout_p=0.5))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.equal(outs[0], lora_linear(*params, 1.0, dropout_p=0.5))


# ---- registration, compile, dispatch -----------------------------------------------------


def _triton_op_args(sample):
    """The sample as the registered triton ops take it, float32: (x (N, in), weight, bias,
    lora_a (E, r, in), lora_b (E, out, r), scale (E,) or None, scaling, route (N,) or None)."""
    x, weight, bias, lora_a, lora_b = (None if t is None else t.float() for t in sample.tensors)
    tokens = x.shape[:-1]
    x = x.reshape(tokens.numel(), x.shape[-1])
    if not sample.routed:
        return x, weight, bias, lora_a[None], lora_b[None], None, sample.scaling, None
    scale, scaling = ((sample.scaling.float(), 0.0) if isinstance(sample.scaling, torch.Tensor)
                      else (None, sample.scaling))
    return (x, weight, bias, lora_a, lora_b, scale, scaling,
            sample.route.expand(tokens).reshape(-1))


@pytest.mark.parametrize("sample", PLAIN + ROUTED, ids=lambda s: s.name)
def test_opcheck_triton_ops(sample):
    """opcheck of the forward (with dropout) and backward ops on every sample (both forward
    paths, per-adapter and float scales, degenerate sizes; dX / dW asked for or not)."""
    require_backend("lora_linear", "triton")
    from fastvl.kernels.lora import shrink_columns

    x, weight, bias, lora_a, lora_b, scale, scaling, route = _triton_op_args(sample)
    fwd = torch.ops.fastvl.lora_linear_fwd_triton.default
    bwd = torch.ops.fastvl.lora_linear_bwd_triton.default
    leaves = [None if t is None else t.clone().requires_grad_(True)
              for t in (x, weight, bias, lora_a, lora_b)]
    assert_opcheck(fwd, (*leaves, scale, scaling, route, 0.2, 5))
    out, s = fwd(x, weight, bias, lora_a, lora_b, scale, scaling, route, 0.2, 5)
    assert s.shape == (x.shape[0], shrink_columns(lora_a.shape[1]))
    grad_out = random_tensor(*out.shape, device=DEVICE, generator=_gen(20))
    flags = (True, True) if sample.routed else (False, False)
    assert_opcheck(bwd, (grad_out, x, weight, lora_a, lora_b, scale, scaling, route, s, 0.2, 5,
                         *flags))


@pytest.mark.parametrize("sample", [PLAIN[0], PLAIN[3], *ROUTED], ids=lambda s: s.name)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_compiles_without_graph_breaks(backend, sample):
    """torch.compile(fullgraph=True) of the op: the float64 formula's output and gradients
    (float32, 1e-5)."""
    require_backend("routed_lora_linear", backend)
    torch._dynamo.reset()
    if DEVICE.type == "cuda":
        compiler = "inductor"
    else:
        compiler = "aot_eager" if backend == "torch" else "eager"
    compiled = torch.compile(lambda *t: sample.call(*t, backend=backend), fullgraph=True,
                             backend=compiler)
    out, grads = _run(compiled, sample.tensors, torch.float32)
    ref, ref_grads = _run(sample.reference, sample.tensors, torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(NAMES, grads, ref_grads):
        if want is not None:
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=name)


def test_compiled_seeded_dropout_on_triton():
    """Seeded dropout traces on the triton backend (the mask is a function of the seed)."""
    require_backend("lora_linear", "triton")
    torch._dynamo.reset()
    compiler = "inductor" if DEVICE.type == "cuda" else "eager"
    x, weight, bias, lora_a, lora_b = (t.float() for t in PLAIN[0].tensors)

    def call(x):
        return lora_linear(x, weight, bias, lora_a, lora_b, 0.5, dropout_p=0.3, seed=7,
                           backend="triton")

    dropped = torch.compile(call, fullgraph=True, backend=compiler)
    torch.testing.assert_close(dropped(x), call(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def gpu_launches():
    """The launches of every LoRA kernel variant a GPU would make (GPU block sizes; plain /
    routed, dropout, row and row-block paths, with and without dX), recorded from
    interpreted fp16 and fp32 runs, plus their bf16 twins."""
    require_backend("lora_linear", "triton")
    if DEVICE.type != "cpu":
        pytest.skip("checks GPU compilation on machines without one (a GPU runs the kernels)")
    from fastvl import triton_aot
    from fastvl.kernels import lora as kernels

    with triton_aot.gpu_launch_sizes(), triton_aot.recorded_launches(kernels) as launches:
        for dtype in (torch.float16, torch.float32):
            for num_rows, routed, dropout_p, needs_dx in [
                (5, True, 0.1, True), (5, False, 0.0, True),  # row path
                (300, True, 0.1, True), (300, False, 0.0, False),  # row blocks
            ]:
                x, weight, _, lora_a, lora_b = (t.to(dtype) for t in _params(
                    (num_rows,), 40, 33, 8, 3 if routed else None, seed=48))
                x.requires_grad_(needs_dx)
                lora_a.requires_grad_(True)
                route = _routes("mixed", (num_rows,), 3, seed=49)
                if routed:
                    out = routed_lora_linear(x, weight, None, lora_a, lora_b, 2.0, route,
                                             dropout_p=dropout_p, seed=1, backend="triton")
                else:
                    out = lora_linear(x, weight, None, lora_a, lora_b, 2.0,
                                      dropout_p=dropout_p, seed=1, backend="triton")
                out.float().sum().backward()
    kernel_names = {launch["kernel"] for launch in launches}
    assert kernel_names == {"_lora_fwd_kernel", "_lora_fwd_rows_kernel", "_lora_bwd_dx_kernel",
                            "_lora_bwd_dw_kernel"}, kernel_names  # both forwards, the backward
    return launches + triton_aot.with_pointer_type(launches, "fp16", "bf16")


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpus(arch, gpu_launches):
    """Every recorded launch compiles with Triton's real compiler (and ptxas) for sm_80
    (A100) and sm_90 (H100 / H200): what the interpreter cannot check, bf16 included."""
    from fastvl import triton_aot

    assert triton_aot.compile_errors(gpu_launches, arch) == []


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_do_not_spill_registers(arch, gpu_launches):
    """ptxas reports no register spills for any LoRA kernel variant on sm_80 and sm_90
    (spills cost local-memory traffic in kernels that are memory-bound already)."""
    from fastvl import triton_aot

    rows = triton_aot.resource_usage(gpu_launches, arch)
    assert [row["error"] for row in rows if "error" in row] == []
    spilling = [f"{row['kernel']} ({row['constants']}; {row['dtypes']}): {row['spill_bytes']} "
                f"bytes, {row['registers']} registers" for row in rows if row["spill_bytes"]]
    assert spilling == []


def test_auto_uses_torch_on_cpu_and_triton_reasons():
    from fastvl.ops.registry import OPS

    params = [t.float() for t in _params((3,), 8, 8, 4, None, seed=23)]
    assert OPS["lora_linear"].select("auto", torch.device("cpu"), *params, 1.0, 0.0, None) \
        is OPS["lora_linear"].impls["torch"].fn
    require_backend("lora_linear", "triton")
    x, weight, bias, lora_a, lora_b = _params((3,), 8, 8, 65, None, seed=24)
    with pytest.raises(BackendNotSupportedError) as info:
        lora_linear(x, weight, bias, lora_a, lora_b, 1.0, backend="triton")
    assert any("float64" in r for r in info.value.reasons)
    assert any("LoRA rank r 65 is above" in r for r in info.value.reasons)


# ---- bad inputs --------------------------------------------------------------------------


def _bad_plain(**change):
    """A lora_linear call on CPU tensors with some arguments replaced."""
    args = dict(zip(NAMES, (t.float().cpu() for t in _params((2, 3), 8, 6, 4, None, seed=25))))
    args.update(scaling=1.0)
    kwargs = {k: change.pop(k) for k in ("dropout_p", "seed") if k in change}
    args.update(change)
    return lambda: lora_linear(*args.values(), **kwargs)


def _bad_routed(**change):
    args = dict(zip(NAMES, (t.float().cpu() for t in _params((2, 3), 8, 6, 4, 2, seed=26))))
    args.update(scaling=1.0, route=torch.zeros(2, 3, dtype=torch.int64))
    args.update(change)
    return lambda: routed_lora_linear(*args.values())


@pytest.mark.parametrize("make_call, error, match", [
    (_bad_plain(x=torch.randn(2, 3, 7)), ValueError, "last dim 7 does not match"),
    (_bad_plain(weight=torch.randn(6, 8, 1)), ValueError, r"weight must be \(out, in\)"),
    (_bad_plain(bias=torch.randn(5)), ValueError, "bias must be"),
    (_bad_plain(lora_a=torch.randn(3, 8)), ValueError, "rank mismatch"),
    (_bad_plain(lora_a=torch.randn(4, 9)), ValueError, "lora_a .* in = 8"),
    (_bad_plain(lora_b=torch.randn(7, 4)), ValueError, "lora_b .* out = 6"),
    (_bad_plain(lora_a=torch.randn(2, 4, 8)), ValueError, r"lora_a must be \(r, in\)"),
    (_bad_plain(lora_b=torch.randn(6, 4, dtype=torch.float64)), TypeError, "share one dtype"),
    (_bad_plain(x=torch.ones(2, 3, 8, dtype=torch.int64)), TypeError, "floating-point"),
    (_bad_plain(scaling=torch.tensor(1.0)), TypeError, "scaling must be a float"),
    (_bad_plain(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (_bad_plain(seed=1.5), TypeError, "seed must be an int"),
    (_bad_routed(route=torch.tensor([[0, 2, 0], [0, 0, 0]])), ValueError,
     r"route values must lie in \[-1, 2\)"),
    (_bad_routed(route=torch.tensor([[0, -2, 0], [0, 0, 0]])), ValueError, "from -2 to 0"),
    (_bad_routed(route=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "torch.int64"),
    (_bad_routed(route=torch.zeros(6, dtype=torch.int64)), ValueError, "x's shape without"),
    (_bad_routed(route=torch.zeros(2, 2, dtype=torch.int64)), ValueError, "size-1 dims"),
    (_bad_routed(scaling=torch.ones(3)), ValueError, r"\(E,\) = \(2,\)"),
    (_bad_routed(lora_b=torch.randn(3, 6, 4)), ValueError, "2 adapters but lora_b 3"),
    (_bad_routed(lora_a=torch.randn(2, 5, 8)), ValueError, "rank mismatch"),
    (_bad_routed(lora_a=torch.randn(4, 8)), ValueError, r"lora_a must be \(E, r, in\)"),
])
def test_bad_inputs_raise_clear_errors(make_call, error, match):
    with pytest.raises(error, match=match):
        make_call()


def test_value_and_argument_checks_after_a_valid_call():
    """The checks are memoized by shapes, dtypes, devices and arguments: after valid calls,
    a call differing in an argument (or its type) is checked again and the route's values
    are checked on every call."""
    for _ in range(2):
        _bad_plain()()
        _bad_routed()()
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        _bad_plain(dropout_p=1.0)()
    with pytest.raises(TypeError, match="dropout_p must be a float"):
        _bad_plain(dropout_p=True)()
    with pytest.raises(ValueError, match=r"route values must lie in \[-1, 2\)"):
        _bad_routed(route=torch.tensor([[0, 2, 0], [0, 0, 0]]))()


def test_triton_launches_per_call():
    """On the GPU path (:func:`fastvl.bench.host_overhead.gpu_path`: CPU tensors dispatched as
    on a GPU, Triton launches counted and skipped), the triton backend's forward is the base
    GEMM and one kernel (a float scaling is a kernel argument: no tensor per call), on the
    row-block path as on the decode path; the backward the dX GEMM and two kernels (no
    zero-fill, no cast of dA / dB), plus the dW GEMM for a trainable base; a routed row-block
    call adds its sort (one in each direction; the backward always sorts)."""
    require_backend("lora_linear", "triton")
    from fastvl.bench.host_overhead import count_launches, gpu_path
    from fastvl.kernels.lora import row_path_max_rows

    many = row_path_max_rows(torch.device("cuda")) + 1  # (the GPU path's row-block path)
    for num_rows in (4, many):
        x, weight, bias, lora_a, lora_b = (t.cpu() for t in _params(
            (num_rows,), 16, 12, 4, 3, seed=27))
        x, weight, bias, lora_a, lora_b = (t.half() for t in (x, weight, bias, lora_a, lora_b))
        one_a, one_b = lora_a[1].clone(), lora_b[1].clone()
        leaves = [t.requires_grad_(True) for t in (x, one_a, one_b, lora_a, lora_b)]
        route = torch.randint(-1, 3, (num_rows,), generator=torch.Generator().manual_seed(3))
        grad = torch.randn(num_rows, 12).half()

        def plain():
            return lora_linear(x, weight, bias, one_a, one_b, 2.0, backend="triton")

        def routed():
            return routed_lora_linear(x, weight, bias, lora_a, lora_b, 2.0, route,
                                      backend="triton", check_route=False)

        sort = [] if num_rows == 4 else ["sort.stable"]
        with gpu_path():
            assert count_launches(plain) == (2, ["addmm.default", "triton"])
            launches, ops = count_launches(routed)
            assert sorted(ops) == sorted(["addmm.default", "triton"] + sort)
            launches, ops = count_launches(lambda: torch.autograd.grad(plain(), leaves[:3],
                                                                        grad))
            assert sorted(ops) == sorted(["addmm.default", "mm.default"] + ["triton"] * 3)
            launches, ops = count_launches(lambda: torch.autograd.grad(
                routed(), [leaves[0], *leaves[3:]], grad))
            assert sorted(ops) == sorted(["addmm.default", "mm.default"] + ["triton"] * 3
                                         + sort + ["sort.stable"])


# ---- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["plain", "mixed", "one_adapter", "decode"])
def test_gpu_large_shapes(dtype, kind):
    lead, in_f, out_f, rank = (4, 577), 1024, 1000, 64
    if kind == "decode":  # 32 sequences over 16 adapters, one token each: the row path
        route = torch.randint(-1, 16, (32, 1), generator=_gen(31), device=DEVICE)
        sample = LoRASample(kind, _params((32, 1), 4096, 4000, 16, 16, seed=30), 2.0, route)
    elif kind == "plain":
        sample = LoRASample(kind, _params(lead, in_f, out_f, rank, None, seed=27), 2.0)
    else:
        sample = LoRASample(kind, _params(lead, in_f, out_f, rank, 4, seed=28), 2.0,
                            _routes(kind, lead, 4, seed=29))
    _check_backend("triton", dtype, sample)


@pytest.mark.gpu
def test_gpu_deterministic_backward_is_bit_reproducible(deterministic_algorithms):
    """Atomics make dA / dB differ in the last bits between runs; deterministic mode not."""
    params = _params((8, 577), 1024, 1000, 16, 2, seed=32)
    route = _routes("mixed", (8, 577), 2, seed=33)

    def grads():
        return _run(lambda *t: routed_lora_linear(*t, 2.0, route, backend="triton"), params,
                    torch.bfloat16)[1][3:]

    first = grads()
    for _ in range(3):
        for got, want in zip(grads(), first):
            assert torch.equal(got, want)
