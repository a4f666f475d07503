"""attention_key_mass on every backend against a float64 reference; ranges, masks, GQA, heads.

Tolerance rule (flash-attn's, forward): a backend's max error against the dense oracle
written below (:func:`_dense_key_mass`, not fastvl.reference, the torch backend) in float64
(fed the lse of the float64 reference of ``tests/samples_attention.py``) is at most 2x the
error of the same dense math run in the kernel's dtype (fed the same float32 lse as the
backend), plus a small absolute floor. Outputs are poisoned (NaN) first,
so unwritten elements fail. The lse fed to a backend comes from ``attention`` on that
backend (end to end: attention -> lse -> key mass).

On a CPU machine the Triton kernel runs in the interpreter with small blocks (16 queries x
32 keys), so the small shapes here span several query and key blocks; bf16 (``tl.dot`` on
bf16 is wrong in the interpreter) and large shapes are `gpu` tests.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastvl.ops
from fastvl.ops import BackendNotSupportedError, attention, attention_key_mass
from fastvl.testing import (
    ERROR_FLOOR,
    assert_opcheck,
    assert_within_reference_error,
    poison_outputs,
    random_tensor,
)
from tests.conftest import DEVICE, require_backend
from tests.samples_attention import attention_inputs, noncontiguous_prefix_lens, reference_attention

ALL_BACKENDS = ("torch", "triton")


def _make_inputs(batch, heads, kv_heads, nq, nk, head_dim, dtype, seed, bias=None,
                 device=DEVICE):
    """The shared attention inputs, the key_bias (if any) hiding every 5th key of sample 0."""
    q, k, v, key_bias = attention_inputs(batch, heads, kv_heads, nq, nk, head_dim, dtype,
                                         seed, bias=bias, device=device)
    if key_bias is not None:
        key_bias[0, ..., ::5] = -math.inf
    return q, k, v, key_bias


def _query_weights(kind, batch, heads, nq, seed, device=DEVICE):
    """None, or (B, Nq) ("b") / (B, H, Nq) ("bh") weights of both signs (a PageRank vector
    is positive; the op is linear in them), float32."""
    if kind is None:
        return None
    shape = (batch, nq) if kind == "b" else (batch, heads, nq)
    return random_tensor(*shape, device=device,
                         generator=torch.Generator(device=device).manual_seed(seed + 99))


def _check(backend, batch, heads, kv_heads, nq, nk, head_dim, dtype, *, rows=(0, None),
           head_reduce="mean", causal=False, causal_strength=None, prefix_len=None, bias=None,
           weights=None, seed=0):
    q, k, v, key_bias = _make_inputs(batch, heads, kv_heads, nq, nk, head_dim, dtype, seed, bias)
    query_weights = _query_weights(weights, batch, heads, nq, seed)
    if isinstance(prefix_len, tuple):
        prefix_len = torch.tensor(prefix_len, device=DEVICE)
    masks = dict(causal=causal, causal_strength=causal_strength, key_bias=key_bias)
    ref_prefix = prefix_len
    if isinstance(prefix_len, int):
        ref_prefix = torch.full((batch,), prefix_len, device=DEVICE)
    _, lse = attention(q, k, v, prefix_len=prefix_len, return_lse=True, backend=backend,
                       **masks)
    selection = dict(query_start=rows[0], query_end=rows[1], head_reduce=head_reduce)
    with poison_outputs():
        mass = attention_key_mass(q, k, lse, prefix_len=prefix_len, backend=backend,
                                  query_weights=query_weights, **selection, **masks)
    num_rows = (nq if rows[1] is None else rows[1]) - rows[0]
    shape = (batch, heads, nk) if head_reduce is None else (batch, nk)
    assert mass.dtype == torch.float32 and mass.shape == shape

    _, lse64 = reference_attention(q, k, v, prefix_len=ref_prefix, **masks)
    dense = dict(masks, prefix_len=ref_prefix, rows=rows, head_reduce=head_reduce,
                 weights=query_weights)
    mass64 = _dense_key_mass(q, k, lse64, **dense)
    low = _dense_key_mass(q, k, lse, low=True, **dense)
    assert_within_reference_error(mass, mass64, low, factor=2, atol=ERROR_FLOOR[dtype], name="mass")
    if num_rows == 0:
        assert torch.count_nonzero(mass) == 0


# (batch, heads, kv_heads, Nq, Nk, D, dtype, options): Nq/Nk in {1, 7, 30..64, 197}, D in
# {8, 16, 32, 64, 80}; every head reduction, range kind and mask appears.
SWEEP = [
    (2, 3, 3, 197, 197, 64, torch.float16, dict(rows=(0, 1))),  # EViT / VisionZip: CLS row
    (1, 4, 2, 64, 64, 32, torch.float32,
     dict(rows=(63, 64), head_reduce="sum", causal=True)),  # FastV: last query, GQA
    (2, 2, 2, 37, 37, 80, torch.float16, dict(head_reduce="max", causal=True, bias="bh")),
    (1, 4, 1, 40, 53, 32, torch.float32,
     dict(rows=(5, 30), head_reduce=None, causal=True, causal_strength=0.6)),
    (2, 2, 1, 50, 50, 32, torch.float16,
     dict(rows=(3, 45), causal=True, prefix_len=(0, 20), bias="b")),
    (2, 2, 2, 30, 7, 32, torch.float32, dict(head_reduce="sum", causal=True)),  # -inf rows
    (2, 2, 2, 1, 1, 16, torch.float32, dict()),
    (1, 4, 2, 7, 197, 64, torch.float16,
     dict(rows=(2, 7), head_reduce=None, causal=True, bias="b")),  # Nq < Nk, bottom-right
    (1, 2, 2, 197, 7, 8, torch.float32,
     dict(head_reduce="max", causal=True, causal_strength=0.3, prefix_len=3)),
    (2, 2, 1, 9, 9, 32, torch.float32, dict(rows=(4, 4), causal=True)),  # empty range
    # query weights (Zero-TPrune's PageRank step): per sample, per head, with masks
    (2, 3, 3, 197, 197, 64, torch.float16, dict(weights="b", head_reduce=None)),
    (1, 4, 2, 50, 64, 32, torch.float32,
     dict(weights="bh", rows=(3, 47), head_reduce="sum", causal=True, bias="bh")),
    (2, 2, 1, 37, 37, 80, torch.float16,
     dict(weights="bh", head_reduce="max", causal=True, causal_strength=0.5)),
]


def _sweep_id(case):
    batch, heads, kv_heads, nq, nk, head_dim, dtype, opts = case
    tag = "-".join(f"{k}={v}" for k, v in opts.items())
    return f"{str(dtype)[6:]}-b{batch}h{heads}kv{kv_heads}-q{nq}k{nk}d{head_dim}-{tag or 'plain'}"


@pytest.mark.parametrize("case", SWEEP, ids=_sweep_id)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sweep(backend, case):
    require_backend("attention_key_mass", backend)
    _check(backend, *case[:7], **case[7])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rows_of_probabilities_sum_to_one(backend):
    """Summed over keys, each head's mass counts the rows that see a key (lse finite)."""
    require_backend("attention_key_mass", backend)
    q, k, v, key_bias = _make_inputs(2, 2, 1, 23, 11, 32, torch.float32, seed=3, bias="b")
    key_bias[0] = -math.inf  # sample 0 sees nothing: all its rows have lse = -inf
    _, lse = attention(q, k, v, key_bias=key_bias, causal=True, return_lse=True, backend=backend)
    mass = attention_key_mass(q, k, lse, key_bias=key_bias, causal=True, head_reduce=None,
                              backend=backend)
    assert torch.count_nonzero(mass[0]) == 0
    # Causal with Nq - Nk = 12: rows 12..22 of sample 1 see a key.
    torch.testing.assert_close(mass[1].sum(-1), torch.full((2,), 11.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_neginf_lse_rows_contribute_nothing(backend):
    """Rows whose given lse is -inf add 0: the mass equals the full mass minus theirs."""
    require_backend("attention_key_mass", backend)
    q, k, v, _ = _make_inputs(1, 2, 2, 40, 35, 32, torch.float32, seed=4)
    _, lse = attention(q, k, v, return_lse=True, backend=backend)
    dropped = lse.clone()
    dropped[:, :, [3, 21]] = -math.inf
    got = attention_key_mass(q, k, dropped, head_reduce=None, backend=backend)
    expected = attention_key_mass(q, k, lse, head_reduce=None, backend=backend)
    for row in (3, 21):
        expected -= attention_key_mass(q, k, lse, query_start=row, query_end=row + 1,
                                       head_reduce=None, backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_triton_strided_inputs():
    """Non-contiguous q, k (last dim too), key_bias and lse give the contiguous result."""
    require_backend("attention_key_mass", "triton")
    q, k, v, key_bias = _make_inputs(2, 4, 2, 21, 33, 32, torch.float32, seed=5, bias="bh")
    _, lse = attention(q, k, v, key_bias=key_bias, causal=True, return_lse=True,
                       backend="torch")
    q_s = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_s = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    bias_s = torch.stack([key_bias, key_bias], -1)[..., 0]
    lse_s = torch.stack([lse, lse], 1)[:, 0]
    assert k_s.stride(-1) != 1 and not bias_s.is_contiguous() and not lse_s.is_contiguous()
    kwargs = dict(causal=True, query_start=2, query_end=19, head_reduce="max")
    got = attention_key_mass(q_s, k_s, lse_s, key_bias=bias_s, backend="triton", **kwargs)
    expected = attention_key_mass(q, k, lse, key_bias=key_bias, backend="torch", **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 5, 7), (2, 2, 0, 7), (2, 2, 5, 0)])
def test_empty(backend, shape):
    """B = 0, Nq = 0 (zero mass) or Nk = 0."""
    require_backend("attention_key_mass", backend)
    batch, heads, nq, nk = shape
    q = random_tensor(batch, heads, nq, 32, device=DEVICE)
    k = random_tensor(batch, 1, nk, 32, device=DEVICE)
    _, lse = attention(q, k, k, return_lse=True, backend="torch")
    for head_reduce in ("mean", None):
        with poison_outputs():
            mass = attention_key_mass(q, k, lse, head_reduce=head_reduce, backend=backend)
        expected_shape = (batch, nk) if head_reduce else (batch, heads, nk)
        assert mass.shape == expected_shape and torch.count_nonzero(mass) == 0


def test_torch_backend_float64():
    """float64 inputs (and float64 lse) are computed in float64, returned as float32."""
    q, k, v, _ = _make_inputs(2, 2, 1, 6, 9, 8, torch.float64, seed=6)
    _, lse = attention(q, k, v, causal=True, return_lse=True, backend="torch")
    assert lse.dtype == torch.float64
    mass = attention_key_mass(q, k, lse, causal=True, backend="torch")
    future = torch.ones(6, 9, dtype=torch.bool).triu(4)  # key j > query i + (9 - 6)
    probs = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(future, -math.inf), -1)
    assert mass.dtype == torch.float32
    torch.testing.assert_close(mass, probs.sum(2).mean(1).float())


def _dense_key_mass(q, k, lse, *, causal, causal_strength, prefix_len, key_bias, rows,
                    head_reduce, weights=None, low=False):
    """Independent oracle: every logit of the selected rows, the bias written out, each row's
    probabilities times its query weight; float64, or with ``low`` the logits in q's dtype
    and the rest in float32."""
    acc = torch.float32 if low else torch.float64
    if not low:
        q, k = q.double(), k.double()
    lse = lse.to(acc)
    batch, heads, nq, head_dim = q.shape
    nk = k.shape[2]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)).to(acc) / math.sqrt(head_dim)  # (B, H, Nq, Nk)
    if key_bias is not None:
        kb = key_bias.to(acc)
        logits = logits + (kb[:, None, None, :] if kb.dim() == 2 else kb[:, :, None, :])
    if causal:
        i = torch.arange(nq, device=q.device).view(1, nq, 1)
        j = torch.arange(nk, device=q.device).view(1, 1, nk)
        future = (j > i + nk - nq).expand(batch, nq, nk)
        if prefix_len is not None:
            future = future & (j >= prefix_len.view(-1, 1, 1))
        strength = 1.0 if causal_strength is None else causal_strength
        value = -math.inf if strength >= 1.0 else math.log(1.0 - strength)
        bias = torch.zeros(future.shape, dtype=acc, device=q.device).masked_fill(future, value)
        logits = logits + bias.unsqueeze(1)
    probs = torch.exp(logits - lse.unsqueeze(-1))
    probs = torch.where(torch.isneginf(lse).unsqueeze(-1), 0.0, probs)
    if weights is not None:
        w = weights.to(acc)
        probs = probs * (w[:, None, :, None] if w.dim() == 2 else w.unsqueeze(-1))
    mass = probs[:, :, rows[0]:rows[1]].sum(dim=2)
    return {"mean": mass.mean(1), "sum": mass.sum(1), "max": mass.amax(1), None: mass}[head_reduce]


# (batch, heads, kv_heads, Nq, Nk, D, options): shapes that span several blocks of the torch
# backend once BLOCK_BYTES is shrunk, in both blocking modes (whole slices / row blocks).
BLOCKED = [
    (3, 4, 2, 37, 37, 16, dict()),
    (2, 6, 2, 53, 53, 8, dict(causal=True, rows=(7, 53), head_reduce="sum")),
    (2, 4, 1, 19, 45, 8, dict(causal=True, rows=(0, 19), head_reduce=None)),  # Nq < Nk
    (2, 2, 2, 45, 19, 8, dict(causal=True, rows=(3, 41), head_reduce="max")),  # -inf rows
    (2, 4, 2, 30, 33, 8, dict(causal=True, causal_strength=0.4, bias="bh", rows=(2, 29))),
    (2, 4, 4, 41, 41, 8, dict(causal=True, prefix_len=(0, 17), bias="b", rows=(5, 40))),
    (2, 4, 2, 29, 29, 8, dict(causal=True, causal_strength=0.7, prefix_len=(4, 11))),
    (3, 4, 2, 37, 37, 16, dict(weights="bh", rows=(2, 35))),
    (2, 6, 2, 53, 53, 8, dict(causal=True, weights="b", head_reduce=None)),
]


@pytest.mark.parametrize("block_bytes", [4 << 20, 60000, 4096, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("case", BLOCKED, ids=[str(i) for i in range(len(BLOCKED))])
def test_torch_blocks_against_dense_float64(case, dtype, block_bytes, monkeypatch):
    """The torch backend, one block at a time (several slices per block, one slice in row
    blocks, causal key skipping), against the dense float64 oracle above. Tolerance: float64
    1e-10; float32 / float16 inputs: the oracle fed the same rounded inputs and lse, so only
    the accumulation differs (rtol 1e-4, atol 1e-5; float16 logits round to 2^-11)."""
    import fastvl.reference.attention_key_mass as module

    monkeypatch.setattr(module, "BLOCK_BYTES", block_bytes)
    batch, heads, kv_heads, nq, nk, head_dim, opts = case
    opts = dict(opts)
    rows = opts.pop("rows", (0, nq))
    head_reduce = opts.pop("head_reduce", "mean")
    q, k, v, key_bias = _make_inputs(batch, heads, kv_heads, nq, nk, head_dim, dtype, seed=11,
                                     bias=opts.pop("bias", None), device="cpu")
    prefix_len = opts.pop("prefix_len", None)
    if prefix_len is not None:
        prefix_len = torch.tensor(prefix_len)
    query_weights = _query_weights(opts.pop("weights", None), batch, heads, nq, seed=11,
                                   device="cpu")
    masks = dict(causal=opts.pop("causal", False),
                 causal_strength=opts.pop("causal_strength", None), prefix_len=prefix_len)
    assert not opts
    _, lse = reference_attention(q, k, v, key_bias=key_bias, **masks)
    lse = lse if dtype == torch.float64 else lse.float()
    with poison_outputs():
        mass = module.attention_key_mass(q, k, lse, key_bias=key_bias, query_start=rows[0],
                                         query_end=rows[1], head_reduce=head_reduce,
                                         query_weights=query_weights, **masks)
    expected = _dense_key_mass(q, k, lse, key_bias=key_bias, rows=rows,
                               head_reduce=head_reduce, weights=query_weights, **masks)
    assert mass.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else (
        dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3))
    torch.testing.assert_close(mass.double(), expected, **tol)


# ---- no gradient, registration, compile --------------------------------------------------


def _compiler(backend):
    if DEVICE.type == "cuda":
        return "inductor"
    return "aot_eager" if backend == "torch" else "eager"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_no_grad_and_compiles_without_graph_breaks(backend):
    """Inputs that require grad are fine; the result never requires grad, compiled or not."""
    require_backend("attention_key_mass", backend)
    torch._dynamo.reset()
    q, k, v, key_bias = _make_inputs(2, 4, 2, 17, 19, 32, torch.float32, seed=7, bias="b")
    q, k, key_bias = (t.requires_grad_(True) for t in (q, k, key_bias))
    prefix = torch.tensor([3, 9], device=DEVICE)

    def fn(q, k, v, key_bias, prefix):
        _, lse = attention(q, k, v, key_bias=key_bias, causal=True, causal_strength=0.75,
                           prefix_len=prefix, return_lse=True, backend=backend)
        assert lse.requires_grad
        return attention_key_mass(q, k, lse, key_bias=key_bias, causal=True,
                                  causal_strength=0.75, prefix_len=prefix, query_start=1,
                                  query_end=9, head_reduce="max", backend=backend)

    expected = fn(q, k, v, key_bias, prefix)
    got = torch.compile(fn, fullgraph=True, backend=_compiler(backend))(q, k, v, key_bias, prefix)
    assert not expected.requires_grad and not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # An int prefix_len, the default query range and scale compile too.
    q, k = q.detach(), k.detach()
    _, lse = attention(q, k, v, causal=True, prefix_len=4, return_lse=True, backend="torch")
    compiled_int = torch.compile(
        lambda q, k, lse: attention_key_mass(q, k, lse, causal=True, prefix_len=4,
                                             head_reduce=None, backend=backend),
        fullgraph=True, backend=_compiler(backend),
    )
    torch.testing.assert_close(
        compiled_int(q, k, lse),
        attention_key_mass(q, k, lse, causal=True, prefix_len=4, head_reduce=None,
                           backend="torch"), rtol=1e-5, atol=1e-5,
    )


def test_opcheck_triton_op():
    require_backend("attention_key_mass", "triton")
    q, k, v, key_bias = _make_inputs(2, 4, 2, 9, 11, 32, torch.float32, seed=8, bias="bh")
    prefix = torch.tensor([3, 0], device=DEVICE)
    _, lse = attention(q, k, v, key_bias=key_bias, causal=True, return_lse=True,
                       backend="torch")
    op = torch.ops.fastvl.attention_key_mass_triton.default
    weights = random_tensor(2, 4, 9, device=DEVICE)
    for args in (
        (q, k, lse, key_bias, prefix, 0.3, True, 0.8, 0, 9, "mean", None),
        (q, k, lse, None, None, 0.25, False, 1.0, 8, 9, None, None),
        (q, k, lse, key_bias, None, 0.3, True, 1.0, 1, 8, "sum", weights),
        (q, k, lse, None, prefix, 0.3, True, 0.5, 0, 9, None, weights[:, 0]),
    ):
        assert_opcheck(op, args)


def test_auto_uses_torch_on_cpu():
    from fastvl.ops.registry import OPS

    q, k, _, _ = _make_inputs(1, 1, 1, 3, 3, 8, torch.float32, seed=9, device="cpu")
    lse = torch.zeros(1, 1, 3)
    args = (q, k, lse, None, None, 1.0, False, 1.0, 0, 3, "mean")
    assert OPS["attention_key_mass"].select("auto", q.device, *args).__name__ == "_torch_impl"


# ---- bad input ---------------------------------------------------------------------------


def _bad_inputs():
    q, k, _, _ = _make_inputs(2, 4, 2, 5, 6, 8, torch.float32, seed=10, device="cpu")
    return q, k, torch.zeros(2, 4, 5)


@pytest.mark.parametrize(
    "make_call, error, match",
    [
        (lambda q, k, lse: ((q[0], k, lse), {}), ValueError,
         r"^attention_key_mass: q must be \(B, H, Nq, D\)"),
        (lambda q, k, lse: ((q, k[..., :4], lse), {}), ValueError,
         r"^attention_key_mass: k head dim 4 does not match q's 8"),
        (lambda q, k, lse: ((q[:, :3], k, lse[:, :3]), {}), ValueError,
         r"query heads \(3\) must be a multiple"),
        (lambda q, k, lse: ((q, k.half(), lse), {}), TypeError, r"share one dtype"),
        (lambda q, k, lse: ((q, k, lse), dict(causal_strength=0.5)), ValueError,
         r"pass causal=True"),
        (lambda q, k, lse: ((q, k, lse), dict(key_bias=torch.zeros(2, 5))), ValueError,
         r"key_bias must be \(B, Nk\)"),
        (lambda q, k, lse: ((q, k, lse.tolist()), {}), TypeError,
         r"lse must be a torch.Tensor, got list"),
        (lambda q, k, lse: ((q, k, lse[:, :, :4]), {}), ValueError,
         r"lse must be \(B, H, Nq\) = \(2, 4, 5\) .* got shape \(2, 4, 4\)"),
        (lambda q, k, lse: ((q, k, lse.half()), {}), TypeError,
         r"lse must be float32 .* got torch.float16"),
        (lambda q, k, lse: ((q, k, lse.double()), {}), TypeError, r"lse must be float32"),
        (lambda q, k, lse: ((q, k, lse.to("meta")), {}), ValueError,
         r"q is on cpu but lse is on meta"),
        (lambda q, k, lse: ((q, k, lse), dict(query_start=-1)), ValueError,
         r"0 <= query_start <= query_end <= Nq = 5, got query_start=-1, query_end=None"),
        (lambda q, k, lse: ((q, k, lse), dict(query_end=6)), ValueError,
         r"query_end <= Nq = 5"),
        (lambda q, k, lse: ((q, k, lse), dict(query_start=3, query_end=2)), ValueError,
         r"got query_start=3, query_end=2"),
        (lambda q, k, lse: ((q, k, lse), dict(query_start=True)), TypeError,
         r"query_start must be an int, got bool"),
        (lambda q, k, lse: ((q, k, lse), dict(query_end=2.0)), TypeError,
         r"query_end must be an int or None, got float"),
        (lambda q, k, lse: ((q, k, lse), dict(head_reduce="median")), ValueError,
         r"head_reduce must be one of \('mean', 'max', 'sum', None\), got 'median'"),
        (lambda q, k, lse: ((q[:, :0], k, lse[:, :0]), {}), ValueError,
         r"needs at least one query head"),
        (lambda q, k, lse: ((q, k, lse), dict(query_weights=torch.ones(2, 4))), ValueError,
         r"query_weights must be \(B, Nq\) = \(2, 5\) or \(B, H, Nq\) = \(2, 4, 5\), got "
         r"shape \(2, 4\)"),
        (lambda q, k, lse: ((q, k, lse), dict(query_weights=torch.ones(2, 5, dtype=torch.int64))),
         TypeError, r"query_weights must be a floating-point tensor"),
        (lambda q, k, lse: ((q, k, lse), dict(query_weights=torch.ones(2, 5, device="meta"))),
         ValueError, r"q is on cpu but query_weights is on meta"),
        (lambda q, k, lse: ((q, k, lse), dict(query_weights=[1.0] * 5)), TypeError,
         r"query_weights must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bad_inputs_raise_clear_errors(make_call, error, match, backend):
    args, kwargs = make_call(*_bad_inputs())
    with pytest.raises(error, match=match):
        attention_key_mass(*args, backend=backend, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(causal="False"), TypeError, r"attention_key_mass: causal must be a bool, got str"),
        (dict(scale=math.nan), ValueError, r"scale must be a finite number > 0 or None"),
        (dict(scale=0.0), ValueError, r"scale must be a finite number > 0 or None"),
    ],
)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_wrong_kind_flags_and_bad_scale_raise(kwargs, error, match, backend):
    """Also after a memoised valid call with the same shapes."""
    q, k, lse = _bad_inputs()
    attention_key_mass(q, k, lse, scale=0.5, backend=backend)
    with pytest.raises(error, match=match):
        attention_key_mass(q, k, lse, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_prefix_len_is_read_by_value(backend):
    """A non-contiguous or expanded prefix_len means its values."""
    require_backend("attention_key_mass", backend)
    q, k, v, _ = _make_inputs(3, 2, 1, 9, 11, 16, torch.float32, seed=12)
    for prefix in noncontiguous_prefix_lens():
        masks = dict(causal=True, causal_strength=None, key_bias=None, prefix_len=prefix.clone())
        _, lse = reference_attention(q, k, v, **masks)
        mass = attention_key_mass(q, k, lse.float(), causal=True, prefix_len=prefix,
                                  head_reduce=None, backend=backend)
        expected = _dense_key_mass(q, k, lse, rows=(0, None), head_reduce=None, **masks)
        torch.testing.assert_close(mass.double(), expected, rtol=1e-5, atol=1e-5)


def test_backend_not_supported_reasons():
    q, k, lse = _bad_inputs()
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of"):
        attention_key_mass(q, k, lse, backend="flash")
    with pytest.raises(ValueError, match=r"attention_key_mass: backend must be .*'cuda'"):
        attention_key_mass(q, k, lse, backend="cuda")  # no cuda implementation
    require_backend("attention_key_mass", "triton", q.device)
    q64, k64 = q.double(), k.double()
    with pytest.raises(BackendNotSupportedError, match=r"q has dtype torch.float64; triton"):
        attention_key_mass(q64, k64, lse, backend="triton")
    # auto falls back to torch for what triton cannot serve
    assert attention_key_mass(q64, k64, lse, backend="auto").shape == (2, 6)


# ---- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c[:6] + (torch.bfloat16, c[7]) for c in SWEEP], ids=_sweep_id)
def test_gpu_sweep_bf16(case):
    require_backend("attention_key_mass", "triton")
    _check("triton", *case[:7], **case[7])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "case",
    [
        (8, 16, 16, 577, 577, 64, dict(rows=(0, 1))),  # ViT-L/14 at 336: CLS row
        (2, 12, 12, 197, 197, 64, dict(head_reduce="max", bias="b")),
        (1, 32, 8, 2048, 2048, 128, dict(rows=(2047, 2048), causal=True)),  # LLaMA, FastV
        (1, 32, 8, 2048, 2048, 128, dict(head_reduce=None, causal=True, prefix_len=(576,))),
        (2, 8, 2, 1025, 333, 80, dict(rows=(100, 900), causal=True, causal_strength=0.4)),
    ],
    ids=lambda c: f"q{c[3]}k{c[4]}d{c[5]}-{'-'.join(c[6])}" if isinstance(c, tuple) else None,
)
def test_gpu_large_shapes(dtype, case):
    require_backend("attention_key_mass", "triton")
    _check("triton", *case[:6], dtype, **case[6])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_query_weights_iterate_the_attention_graph(backend):
    """Zero-TPrune's importance: s <- A^T s per head from uniform s, A the attention
    probabilities. Five steps of the op (weights = the last scores, per head) against the
    same power iteration on the dense float64 matrix; each step keeps sum(s) = 1."""
    require_backend("attention_key_mass", backend)
    q, k, v, key_bias = _make_inputs(2, 4, 2, 33, 33, 32, torch.float32, seed=21, bias="b")
    _, lse = attention(q, k, v, key_bias=key_bias, return_lse=True, backend=backend)
    _, lse64 = reference_attention(q, k, v, key_bias=key_bias)
    logits = q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2)
    probs = torch.exp(logits / math.sqrt(32) + key_bias.double()[:, None, None, :]
                      - lse64.unsqueeze(-1))  # (B, H, N, N), rows sum to 1
    scores = torch.full((2, 4, 33), 1 / 33, device=DEVICE)
    expected = scores.double()
    for _ in range(5):
        scores = attention_key_mass(q, k, lse, key_bias=key_bias, head_reduce=None,
                                    query_weights=scores, backend=backend)
        expected = (expected.unsqueeze(-1) * probs).sum(dim=2)
        torch.testing.assert_close(scores.sum(-1), torch.ones(2, 4, device=DEVICE),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)


# ---- attention_graph_rank (Zero-TPrune's importance) ---------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("head_reduce", ["mean", None, "max"])
def test_attention_graph_rank_is_the_power_iteration(backend, head_reduce):
    require_backend("attention_key_mass", backend)
    q, k, v, _ = _make_inputs(2, 4, 2, 29, 29, 16, torch.float32, seed=23)
    _, lse = attention(q, k, v, return_lse=True, backend=backend)
    _, lse64 = reference_attention(q, k, v)
    logits = q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2)
    probs = torch.exp(logits / math.sqrt(16) - lse64.unsqueeze(-1))
    expected = torch.full((2, 4, 29), 1 / 29, dtype=torch.float64, device=DEVICE)
    for _ in range(7):
        expected = torch.einsum("bhi,bhij->bhj", expected, probs)
    expected = {"mean": expected.mean(1), "max": expected.amax(1), None: expected}[head_reduce]
    with poison_outputs():
        rank = fastvl.ops.attention_graph_rank(q, k, lse, iterations=7, head_reduce=head_reduce,
                                              backend=backend)
    assert rank.dtype == torch.float32 and not rank.requires_grad
    torch.testing.assert_close(rank.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(iterations=0), ValueError, r"iterations must be >= 1"),
    (dict(iterations=True), TypeError, r"iterations must be an int"),
    (dict(head_reduce="median"), ValueError, r"head_reduce must be one of"),
    (dict(keys=6), ValueError, r"needs self-attention, .* got shapes \(2, 4, 5, 8\) and "
                               r"\(2, 2, 6, 8\)"),
])
def test_attention_graph_rank_bad_inputs(kwargs, error, match):
    q, k, _ = _bad_inputs()  # 5 queries, 6 keys
    k = k[:, :, :kwargs.pop("keys", 5)]
    with pytest.raises(error, match=match):
        fastvl.ops.attention_graph_rank(q, k, torch.zeros(2, 4, 5), **kwargs)


@pytest.mark.parametrize("block_bytes", [4 << 20, 20000, 300])  # many / one slice, row blocks
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_attention_graph_rank_torch_blocks(block_bytes, dtype, monkeypatch):
    """The torch backend computes a block of heads' probabilities once and iterates on them;
    a slice above 4 blocks falls back to weighted key-mass steps. Against the dense power
    iteration in float64 (fed the same rounded inputs and lse), with a key bias and GQA."""
    import fastvl.reference.attention_key_mass as module

    monkeypatch.setattr(module, "BLOCK_BYTES", block_bytes)
    q, k, v, key_bias = _make_inputs(3, 4, 2, 23, 23, 8, dtype, seed=25, bias="bh",
                                     device="cpu")
    _, lse = reference_attention(q, k, v, key_bias=key_bias)
    lse = lse if dtype == torch.float64 else lse.float()
    logits = q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2)
    if dtype != torch.float64:  # the logits rounded as the backend rounds them
        logits = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)).double()
    probs = torch.exp(logits / math.sqrt(8) + key_bias.double().unsqueeze(2)
                      - lse.double().unsqueeze(-1))
    expected = torch.full((3, 4, 23), 1 / 23, dtype=torch.float64)
    for _ in range(4):
        expected = torch.einsum("bhi,bhij->bhj", expected, probs)
    rank = fastvl.ops.attention_graph_rank(q, k, lse, key_bias=key_bias, iterations=4,
                                           head_reduce=None, backend="torch")
    tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rank.double(), expected, **tol)


@pytest.mark.parametrize("bias", [None, "b", "bh"])
def test_attention_graph_rank_without_lse(bias):
    """lse=None: the torch backend normalises the rows itself, the same result; auto takes it
    (the triton backend needs the lse and says so)."""
    q, k, v, key_bias = _make_inputs(2, 4, 2, 21, 21, 8, torch.float64, seed=27, bias=bias,
                                     device="cpu")
    if key_bias is not None:
        key_bias[1, ..., :] = -math.inf  # sample 1: every key hidden, its rows contribute 0
    _, lse = reference_attention(q, k, v, key_bias=key_bias)
    with_lse = fastvl.ops.attention_graph_rank(q, k, lse, key_bias=key_bias, iterations=3,
                                               head_reduce=None, backend="torch")
    own = fastvl.ops.attention_graph_rank(q, k, None, key_bias=key_bias, iterations=3,
                                          head_reduce=None)
    torch.testing.assert_close(own, with_lse, rtol=1e-6, atol=1e-9)
    assert fastvl.ops.graph_rank_reads_lse(torch.device("cpu"), torch.float32, 8) is False
    if "triton" in fastvl.ops.OPS["attention_graph_rank"].impls:
        with pytest.raises(fastvl.ops.BackendNotSupportedError, match="lse=None"):
            fastvl.ops.attention_graph_rank(q.float(), k.float(), None, backend="triton")
