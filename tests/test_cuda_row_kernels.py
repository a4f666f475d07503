"""The CUDA row kernels of csrc/ (gather_tokens, the deterministic scatter-add, and
unshuffle_with_mask_token forward / backward) run on the host.

tests/csrc/emulated_row_kernels.cpp compiles the same kernel bodies and host code as
``fastvl._C`` for the CPU and runs every thread of each launch one after another (with every
16-byte access checked for alignment), so their indexing, vector-path choice, launch geometry
and summation order are tested here without a GPU; the GPU tests in test_gather_tokens.py and
test_masking.py run the real kernels. Oracles: float64 formulas written here.
"""

from __future__ import annotations

import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "tests", "csrc", "emulated_row_kernels.cpp")

# Grid sizes the emulated device has: 1 SM makes every group loop over many rows.
SM_COUNTS = (1, 132)
VECTOR = {torch.float16: 8, torch.bfloat16: 8, torch.float32: 4, torch.float64: 2}


@pytest.fixture(scope="module")
def emulated():
    from torch.utils.cpp_extension import load

    build = os.path.join(ROOT, "build", "emulated_row_kernels")
    os.makedirs(build, exist_ok=True)
    module = load(name="fastvl_emulated_row_kernels", sources=[SOURCE],
                  extra_include_paths=[os.path.join(ROOT, "csrc")], build_directory=build,
                  extra_cflags=["-O2"])
    module.take_launch_log()
    return module


@pytest.fixture(autouse=True)
def _fresh_launch_log(emulated):
    emulated.take_launch_log()


def _vector_widths(module):
    return [entry[3] for entry in module.take_launch_log()]


def _both_orders(fn, *args):
    """fn(*args, sms, reverse) for both thread orders; the results must be bitwise equal
    (no thread's result may depend on another's)."""
    results = [fn(*args, sms, reverse) for sms in SM_COUNTS for reverse in (False, True)]
    for other in results[1:]:
        for a, b in zip(results[0] if isinstance(results[0], tuple) else (results[0],),
                        other if isinstance(other, tuple) else (other,)):
            assert torch.equal(a, b)
    return results[0]


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """t's values in storage that starts one element past an aligned address."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


# ---- gather_tokens / scatter_add_tokens --------------------------------------------------


def _gather_oracle(x, index):
    out = torch.zeros(index.shape + (x.shape[2],), dtype=torch.float64)
    for b in range(index.shape[0]):
        for k in range(index.shape[1]):
            if 0 <= index[b, k] < x.shape[1]:
                out[b, k] = x[b, index[b, k]].double()
    return out


@pytest.mark.parametrize("dtype", list(VECTOR))
@pytest.mark.parametrize("channels", [8, 24, 7, 1])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_gather_values_and_vector_path(emulated, dtype, channels, num_tokens):
    g = torch.Generator().manual_seed(num_tokens * 31 + channels)
    x = torch.randn(3, num_tokens, channels, generator=g).to(dtype)
    index = torch.randint(0, num_tokens, (3, 5), generator=g)
    index[0, 0] = num_tokens  # out of range: a zero row
    index[1, 1] = -1
    out = _both_orders(emulated.gather_tokens, x, index)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out.double(), _gather_oracle(x, index))
    vec = VECTOR[dtype] if channels % VECTOR[dtype] == 0 else 1
    assert set(_vector_widths(emulated)) == {vec}


@pytest.mark.parametrize("layout", ["transposed", "misaligned", "sliced_channels"])
def test_gather_strided_inputs_take_the_scalar_path(emulated, layout):
    x = torch.randn(2, 16, 9)
    if layout == "transposed":
        x = torch.randn(2, 8, 16).transpose(1, 2)
    elif layout == "misaligned":
        x = _misaligned(torch.randn(2, 9, 16))
    else:
        x = torch.randn(2, 9, 32)[:, :, ::2]
    index = torch.randint(0, x.shape[1], (2, 4))
    out = _both_orders(emulated.gather_tokens, x, index)
    assert torch.equal(out.double(), _gather_oracle(x, index))
    assert set(_vector_widths(emulated)) == {1}


def _scatter_oracle(grad, index, num_tokens):
    out = torch.zeros(grad.shape[0], num_tokens, grad.shape[2], dtype=torch.float64)
    for b in range(index.shape[0]):
        for k in range(index.shape[1]):
            if 0 <= index[b, k] < num_tokens:
                out[b, index[b, k]] += grad[b, k].double()
    return out


@pytest.mark.parametrize("dtype", list(VECTOR))
@pytest.mark.parametrize("channels", [16, 5])
@pytest.mark.parametrize("num_tokens,num_rows", [(1, 3), (7, 4), (9, 20), (40, 40)])
def test_scatter_add_against_float64(emulated, dtype, channels, num_tokens, num_rows):
    g = torch.Generator().manual_seed(num_tokens * 7 + num_rows)
    grad = torch.randn(3, num_rows, channels, generator=g).to(dtype)
    index = torch.randint(0, num_tokens, (3, num_rows), generator=g)  # repeats included
    index[2, 0] = num_tokens  # skipped
    index[2, -1] = -3
    out = _both_orders(emulated.scatter_add_tokens, grad, index, num_tokens)
    assert out.shape == (3, num_tokens, channels) and out.dtype == dtype
    expected = _scatter_oracle(grad, index, num_tokens)
    # summed in float32 (float64 for float64), rounded once into the dtype
    torch.testing.assert_close(out.double(), expected,
                               **_rounding_tolerance(dtype, grad.abs().max() * num_rows))
    vec = VECTOR[dtype] if channels % VECTOR[dtype] == 0 else 1
    assert set(_vector_widths(emulated)) == {vec}


def _rounding_tolerance(dtype, scale):
    """One rounding into ``dtype`` of a float32 (float64) sum of terms up to ``scale``."""
    sum_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return {"rtol": torch.finfo(dtype).eps, "atol": 4 * sum_eps * float(scale) + 1e-30}


def test_scatter_add_sums_duplicates_in_ascending_row_order(emulated):
    """float32 sums are not associative: the kernel's order is ascending k, bit for bit."""
    values = torch.tensor([1e8, 1.0, -1e8, 1.0, 3.0], dtype=torch.float32)
    grad = values.view(1, 5, 1).expand(1, 5, 4).contiguous()
    index = torch.tensor([[2, 2, 2, 2, 0]])
    out = _both_orders(emulated.scatter_add_tokens, grad, index, 3)
    in_order = torch.zeros((), dtype=torch.float32)
    for k in range(4):
        in_order = in_order + values[k]
    assert float(in_order) != 2.0  # the order matters for these values
    assert torch.equal(out[0, 2], in_order.expand(4))
    assert torch.equal(out[0, 1], torch.zeros(4)) and torch.equal(out[0, 0], torch.full((4,), 3.0))


@pytest.mark.parametrize("shape,num_tokens", [((2, 0, 8), 5), ((0, 3, 8), 4), ((2, 3, 0), 4),
                                              ((2, 3, 8), 0)])
def test_scatter_add_empty(emulated, shape, num_tokens):
    grad = torch.randn(shape)
    index = torch.zeros(shape[:2], dtype=torch.int64)
    out = emulated.scatter_add_tokens(grad, index, num_tokens, 1, False)
    assert out.shape == (shape[0], num_tokens, shape[2])
    assert torch.equal(out, torch.zeros_like(out))


def test_scatter_add_strided_grad(emulated):
    g = torch.Generator().manual_seed(5)
    grad = torch.randn(2, 16, 6, generator=g).transpose(1, 2)  # (2, 6, 16), channels strided
    index = torch.randint(0, 4, (2, 6), generator=g)
    out = _both_orders(emulated.scatter_add_tokens, grad, index, 4)
    torch.testing.assert_close(out.double(), _scatter_oracle(grad, index, 4),
                               **_rounding_tolerance(torch.float32, grad.abs().max() * 6))
    assert set(_vector_widths(emulated)) == {1}


def test_launch_geometry_covers_wide_rows_and_large_grids(emulated):
    x = torch.randn(1, 3, 8 * 300, dtype=torch.float16)  # 300 vectors: 256 lanes, 1 row each
    emulated.gather_tokens(x, torch.tensor([[2, 0]]), 132, False)
    (blocks, lanes, rows_per_block, vec), = emulated.take_launch_log()
    assert (blocks, lanes, rows_per_block, vec) == (2, 256, 1, 8)
    x = torch.randn(64, 10, 4)  # 1 vector per row: 32 lanes, 8 rows a block, 8 blocks a SM
    emulated.gather_tokens(x, torch.zeros(64, 10, dtype=torch.int64), 2, False)
    assert emulated.take_launch_log() == [(16, 32, 8, 4)]


# ---- unshuffle_with_mask_token -----------------------------------------------------------


def _restore_ids(batch, num_patches, generator):
    rows = [torch.randperm(num_patches, generator=generator) for _ in range(batch)]
    return torch.stack(rows) if rows else torch.empty(0, num_patches, dtype=torch.int64)


def _unshuffle_oracle(x, ids_restore, token, pos, prefix):
    batch, _, dim = x.shape
    visible = x.shape[1] - prefix
    out = torch.empty(batch, prefix + ids_restore.shape[1], dim, dtype=torch.float64)
    for b in range(batch):
        out[b, :prefix] = x[b, :prefix].double()
        for patch in range(ids_restore.shape[1]):
            r = int(ids_restore[b, patch])
            out[b, prefix + patch] = x[b, prefix + r].double() if r < visible else token.double()
    return out + pos.double() if pos is not None else out


DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("param_dtype", ["same", torch.float32])
@pytest.mark.parametrize("with_pos", [True, False])
@pytest.mark.parametrize("dim", [16, 12])
def test_unshuffle_forward_against_float64(emulated, x_dtype, param_dtype, with_pos, dim):
    g = torch.Generator().manual_seed(dim)
    param_dtype = x_dtype if param_dtype == "same" else param_dtype
    prefix, patches, visible = 1, 9, 3
    x = torch.randn(2, prefix + visible, dim, generator=g).to(x_dtype)
    ids = _restore_ids(2, patches, g)
    token = torch.randn(dim, generator=g).to(param_dtype)
    pos = torch.randn(prefix + patches, dim, generator=g).to(param_dtype) if with_pos else None
    out = _both_orders(emulated.unshuffle_with_mask_token, x, ids, token, pos, prefix)
    out_dtype = torch.promote_types(x_dtype, param_dtype)
    assert out.dtype == out_dtype and out.shape == (2, prefix + patches, dim)
    expected = _unshuffle_oracle(x, ids, token, pos, prefix)
    # summed in float32, rounded once into out_dtype
    torch.testing.assert_close(out.double(), expected,
                               **_rounding_tolerance(out_dtype, expected.abs().max() * 2))
    vec = VECTOR[x_dtype] if dim % VECTOR[x_dtype] == 0 else 1
    assert set(_vector_widths(emulated)) == {vec}


@pytest.mark.parametrize("prefix,visible", [(0, 0), (0, 4), (2, 4), (3, 9)])
def test_unshuffle_forward_prefix_and_visible_counts(emulated, prefix, visible):
    g = torch.Generator().manual_seed(prefix * 10 + visible)
    x = torch.randn(3, prefix + visible, 8, generator=g)
    ids = _restore_ids(3, 9, g)
    token = torch.randn(8, generator=g)
    out = _both_orders(emulated.unshuffle_with_mask_token, x, ids, token, None, prefix)
    torch.testing.assert_close(out.double(), _unshuffle_oracle(x, ids, token, None, prefix),
                               rtol=0, atol=0)


def test_unshuffle_forward_strided_inputs(emulated):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 5, generator=g).transpose(1, 2)  # (2, 5, 16)
    ids = _restore_ids(2, 8, g)[:, :]
    token = torch.randn(32, generator=g)[::2]
    pos = torch.randn(16, 9, generator=g).t()  # (9, 16)
    out = _both_orders(emulated.unshuffle_with_mask_token, x, ids, token, pos, 1)
    expected = _unshuffle_oracle(x, ids, token, pos, 1)
    torch.testing.assert_close(out.double(), expected,
                               **_rounding_tolerance(torch.float32, expected.abs().max() * 2))
    assert set(_vector_widths(emulated)) == {1}


def _unshuffle_backward_oracle(grad, ids_restore, prefix, visible):
    batch, rows, dim = grad.shape
    g = grad.double()
    dx = torch.zeros(batch, prefix + visible, dim, dtype=torch.float64)
    dtoken = torch.zeros(dim, dtype=torch.float64)
    for b in range(batch):
        dx[b, :prefix] = g[b, :prefix]
        for patch in range(ids_restore.shape[1]):
            r = int(ids_restore[b, patch])
            if r < visible:
                dx[b, prefix + r] = g[b, prefix + patch]
            else:
                dtoken += g[b, prefix + patch]
    return dx, dtoken, g.sum(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [16, 6])
@pytest.mark.parametrize("batch,chunks", [(5, 1), (5, 2), (5, 5), (1, 1), (0, 1)])
@pytest.mark.parametrize("compute_dpos", [True, False])
def test_unshuffle_backward_against_float64(emulated, dtype, dim, batch, chunks, compute_dpos):
    g = torch.Generator().manual_seed(batch * 10 + chunks + dim)
    prefix, patches, visible = 1, 7, 2
    grad = torch.randn(batch, prefix + patches, dim, generator=g).to(dtype)
    ids = _restore_ids(batch, patches, g)
    dx, dtoken_rows, dpos = _both_orders(emulated.unshuffle_with_mask_token_backward, grad, ids,
                                         prefix, visible, compute_dpos, chunks)
    assert dx.dtype == dtype and dtoken_rows.dtype == torch.float32
    assert dtoken_rows.shape == (chunks * (prefix + patches), dim)
    expected_dx, expected_dtoken, expected_dpos = _unshuffle_backward_oracle(grad, ids, prefix,
                                                                             visible)
    assert torch.equal(dx.double(), expected_dx)  # copies
    tol = {"rtol": 1e-6, "atol": 1e-5}
    torch.testing.assert_close(dtoken_rows.double().sum(0), expected_dtoken, **tol)
    if compute_dpos:
        assert dpos.shape == (chunks * (prefix + patches), dim)
        torch.testing.assert_close(dpos.double().view(chunks, -1, dim).sum(0), expected_dpos,
                                   **tol)
    else:
        assert dpos.shape == (0,)
    vec = VECTOR[dtype] if dim % VECTOR[dtype] == 0 else 1
    assert set(_vector_widths(emulated)) == {vec}  # batch 0 too: the sums are zeros


def test_unshuffle_backward_strided_grad(emulated):
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(8, 3, 9, generator=g).permute(1, 2, 0)  # (3, 9, 8), nothing contiguous
    ids = _restore_ids(3, 8, g)
    dx, dtoken_rows, dpos = _both_orders(emulated.unshuffle_with_mask_token_backward, grad, ids,
                                         1, 5, True, 2)
    expected_dx, expected_dtoken, expected_dpos = _unshuffle_backward_oracle(grad, ids, 1, 5)
    assert torch.equal(dx.double(), expected_dx)
    torch.testing.assert_close(dtoken_rows.double().sum(0), expected_dtoken)
    torch.testing.assert_close(dpos.double().view(2, 9, 8).sum(0), expected_dpos)
    assert set(_vector_widths(emulated)) == {1}


@pytest.mark.parametrize("call,match", [
    (lambda m: m.unshuffle_with_mask_token(torch.randn(2, 3, 8).double(), torch.zeros(2, 4).long(),
                                           torch.randn(8), None, 1, 1, False), "x must be"),
    (lambda m: m.unshuffle_with_mask_token(torch.randn(2, 3, 8), torch.zeros(2, 4).long(),
                                           torch.randn(7), None, 1, 1, False), "mask_token"),
    (lambda m: m.unshuffle_with_mask_token(torch.randn(2, 3, 8), torch.zeros(2, 4).long(),
                                           torch.randn(8), torch.randn(4, 8), 1, 1, False),
     "pos_embed"),
    (lambda m: m.unshuffle_with_mask_token(torch.randn(2, 9, 8), torch.zeros(2, 4).long(),
                                           torch.randn(8), None, 1, 1, False), "more than L"),
    (lambda m: m.unshuffle_with_mask_token_backward(torch.randn(2, 5, 8), torch.zeros(2, 4).long(),
                                                    1, 2, True, 3, 1, False), "batch_chunks"),
    (lambda m: m.scatter_add_tokens(torch.randn(2, 3, 8), torch.zeros(2, 4).long(), 4, 1, False),
     "rows per sample"),
    (lambda m: m.gather_tokens(torch.randn(2, 3, 8), torch.zeros(2, 4).int(), 1, False),
     "int64"),
])
def test_host_side_checks(emulated, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(emulated)
