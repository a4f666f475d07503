"""MAE ops: random_masking, unshuffle_with_mask_token, masked_pixel_loss.

Each op is compared with plain PyTorch written here the way MAE / VideoMAE write it (never
fastvl.reference, which is the torch backend), on the same noise: index ops exactly; every
backend, torch included, in float64 against those oracles, the kernels (run by the
interpreter on CPU, so shapes are small) by the flash-attn error rule (2x forward / 3x
gradients of the error of fastvl.reference in the kernel's dtype, the plain-PyTorch budget),
and that plain-PyTorch result itself within ``_RTOL[dtype]`` of the oracle. bf16 and large
shapes are `gpu` tests.
"""

from __future__ import annotations

import pytest
import torch

from fastvl.ops import BackendNotSupportedError
from fastvl.ops import gather_tokens
from fastvl import _extension
from fastvl.ops.masking import (
    masked_pixel_loss,
    random_masking,
    running_cell_masking,
    unshuffle_batch_chunks,
    unshuffle_with_mask_token,
)
from fastvl.reference import masking as reference
from fastvl.testing import (
    ERROR_FLOOR,
    assert_grads_within_reference_error,
    assert_opcheck,
    assert_within_reference_error,
    poison_outputs,
    random_tensor,
)
from tests.conftest import DEVICE, require_backend

MASK_RATIOS = (0.0, 0.75, 0.9, 0.985)
ALL_BACKENDS = ("torch", "triton")
UNSHUFFLE_BACKENDS = ("torch", "triton", "cuda")
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE.type == "cuda" else ())


# The torch backend against the float64 oracles: a few roundings of the dtype.
_RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _assert_near_oracle(low, expected64, name, dtype):
    """``low``: plain PyTorch run on ``dtype`` inputs (its result may be wider)."""
    torch.testing.assert_close(low.double(), expected64, rtol=_RTOL[dtype],
                               atol=ERROR_FLOOR[dtype], msg=name)


# ---- random_masking ----------------------------------------------------------------------


def _mae_random_masking(noise, mask_ratio):
    """MAE's random_masking index bookkeeping, line for line (models_mae.py)."""
    batch, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones([batch, length], device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, ids_restore, mask


@pytest.mark.parametrize("mask_ratio", MASK_RATIOS)
@pytest.mark.parametrize("num_patches", [1, 49, 196, 197])
def test_random_masking_matches_mae(mask_ratio, num_patches):
    noise = torch.rand(3, num_patches, generator=_gen(0), device=DEVICE)
    ids_keep, ids_restore, mask = random_masking(3, num_patches, mask_ratio, noise=noise)
    expected = _mae_random_masking(noise, mask_ratio)
    for name, got, want in zip(("ids_keep", "ids_restore", "mask"), (ids_keep, ids_restore, mask),
                               expected):
        assert got.dtype == want.dtype, name
        assert torch.equal(got, want), name
    assert ids_keep.shape == (3, int(num_patches * (1 - mask_ratio)))
    # The kept tokens are exactly the unmasked positions, and ids_restore inverts the shuffle.
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros_like(ids_keep, dtype=mask.dtype))
    rows, patches = (mask == 0).nonzero(as_tuple=True)
    assert torch.equal(ids_keep[rows, ids_restore[rows, patches]], patches)


def test_random_masking_default_noise_follows_the_generator():
    first = random_masking(2, 196, 0.75, generator=_gen(5), device=DEVICE)
    second = random_masking(2, 196, 0.75, generator=_gen(5), device=DEVICE)
    noise = torch.rand(2, 196, generator=_gen(5), device=DEVICE)
    for got, again, want in zip(first, second, _mae_random_masking(noise, 0.75)):
        assert torch.equal(got, again) and torch.equal(got, want)
    assert first[0].device.type == DEVICE.type


@pytest.mark.parametrize("mask_ratio", (0.0, 0.9))
def test_tube_masking_shares_one_spatial_mask(mask_ratio):
    frames, spatial = 4, 49
    noise = torch.rand(2, spatial, generator=_gen(1), device=DEVICE)
    ids_keep, ids_restore, mask = random_masking(
        2, frames * spatial, mask_ratio, noise=noise, frames=frames
    )
    _, _, spatial_mask = _mae_random_masking(noise, mask_ratio)
    len_keep = int(spatial * (1 - mask_ratio))
    assert ids_keep.shape == (2, frames * len_keep)
    assert torch.equal(mask, spatial_mask.repeat(1, frames))
    # ids_restore is a permutation whose kept part points at the kept patches.
    assert torch.equal(ids_restore.sort(dim=1).values,
                       torch.arange(frames * spatial, device=DEVICE).expand(2, -1))
    assert torch.equal(mask, (ids_restore >= ids_keep.shape[1]).float())
    kept_by_restore = torch.argsort(ids_restore, dim=1)[:, : ids_keep.shape[1]]
    assert torch.equal(kept_by_restore, ids_keep)
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros(ids_keep.shape, device=DEVICE))


def test_random_masking_compiles_without_graph_breaks():
    torch._dynamo.reset()
    noise = torch.rand(2, 16, generator=_gen(2), device=DEVICE)

    @torch.compile(fullgraph=True, backend="eager")
    def fn(n):
        return random_masking(2, 16, 0.75, noise=n)

    for got, want in zip(fn(noise), _mae_random_masking(noise, 0.75)):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mask_ratio=1.0), ValueError, r"mask_ratio must lie in \[0, 1\), got 1.0"),
        (dict(mask_ratio=-0.1), ValueError, r"mask_ratio must lie in \[0, 1\)"),
        (dict(mask_ratio="0.5"), TypeError, r"mask_ratio must be a float"),
        (dict(batch=2.0), TypeError, r"batch must be an int"),
        (dict(num_patches=-1), ValueError, r"num_patches must be >= 0"),
        (dict(frames=5), ValueError, r"frames must be a positive divisor of num_patches \(12\)"),
        (dict(noise=torch.rand(2, 11)), ValueError, r"noise must be \(B, L / frames\) = \(2, 12\)"),
        (dict(noise=torch.rand(2, 12), frames=2), ValueError, r"= \(2, 6\)"),
        (dict(noise=torch.ones(2, 12, dtype=torch.int64)), TypeError, r"noise must be a floating"),
        (dict(noise=[0.1] * 12), TypeError, r"noise must be a torch.Tensor"),
    ],
)
def test_random_masking_bad_inputs(kwargs, error, match):
    args = dict(batch=2, num_patches=12, mask_ratio=0.5) | kwargs
    with pytest.raises(error, match=match):
        random_masking(args.pop("batch"), args.pop("num_patches"), args.pop("mask_ratio"), **args)


# ---- running_cell_masking ---------------------------------------------------------------


def _running_cell_oracle(phase, frames, height, width, mask_ratio):
    """VideoMAE V2's running cell generator, step by step: a queue of 4 (the dropped ones
    first) read from a pointer that starts at ``phase`` and advances before every time slot;
    the 2 x 2 cell it reads is tiled over the grid. (T', h * w) lists of 0 / 1."""
    dropped = int(4 * mask_ratio)
    queue = [1] * dropped + [0] * (4 - dropped)
    pointer = phase
    slots = []
    for _ in range(frames):
        pointer += 1
        cell = [queue[(i + pointer) % 4] for i in range(4)]  # row-major 2 x 2
        slots.append([cell[2 * (y % 2) + x % 2] for y in range(height) for x in range(width)])
    return slots


@pytest.mark.parametrize("mask_ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("frames,height,width", [(1, 2, 2), (5, 4, 6), (8, 14, 14)])
def test_running_cell_masking_matches_the_generator(mask_ratio, frames, height, width):
    phase = torch.tensor([0, 1, 2, 3, 2])
    mask = running_cell_masking(5, frames, height, width, mask_ratio, phase=phase)
    assert mask.dtype == torch.float32 and mask.shape == (5, frames * height * width)
    for b in range(5):
        expected = _running_cell_oracle(int(phase[b]), frames, height, width, mask_ratio)
        assert mask[b].view(frames, -1).tolist() == expected
    # every 2 x 2 cell of every slot drops its share; over 4 slots every patch equally often
    cells = mask.view(5, frames, height // 2, 2, width // 2, 2).sum(dim=(3, 5))
    assert bool((cells == 4 * mask_ratio).all())
    if frames % 4 == 0:
        per_patch = mask.view(5, frames, -1).sum(dim=1)
        assert bool((per_patch == frames * mask_ratio).all())


def test_running_cell_masking_default_phase_follows_the_generator():
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    first = running_cell_masking(16, 4, 2, 2, 0.5, generator=g1)
    assert torch.equal(first, running_cell_masking(16, 4, 2, 2, 0.5, generator=g2))
    phases = {tuple(row.tolist()) for row in first}
    assert len(phases) > 1  # 16 samples, 4 phases drawn at random


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(height=3), ValueError, r"height and width must be even"),
    (dict(width=0), ValueError, r"height and width must be even"),
    (dict(frames=0), ValueError, r"frames >= 1"),
    (dict(mask_ratio=0.3), ValueError, r"mask_ratio must be 0.25, 0.5 or 0.75"),
    (dict(mask_ratio=1.0), ValueError, r"mask_ratio must be 0.25, 0.5 or 0.75"),
    (dict(mask_ratio="half"), TypeError, r"mask_ratio must be a float"),
    (dict(batch=2.0), TypeError, r"batch must be an int"),
    (dict(phase=torch.zeros(2, dtype=torch.int32)), ValueError, r"phase must be int64"),
    (dict(phase=torch.zeros(3, dtype=torch.int64)), ValueError, r"phase must be int64 of shape"),
    (dict(phase=torch.tensor([0, 4])), ValueError, r"phase values must lie in \[0, 4\)"),
])
def test_running_cell_masking_bad_inputs(kwargs, error, match):
    args = dict(batch=2, frames=4, height=2, width=2, mask_ratio=0.5) | kwargs
    phase = args.pop("phase", None)
    with pytest.raises(error, match=match):
        running_cell_masking(args.pop("batch"), args.pop("frames"), args.pop("height"),
                             args.pop("width"), args.pop("mask_ratio"), phase=phase)


# ---- unshuffle_with_mask_token -----------------------------------------------------------


def _mae_decoder_input(x, ids_restore, mask_token, pos_embed, num_prefix=1):
    """MAE's forward_decoder up to the positions, line for line (its one class token
    generalised to ``num_prefix`` leading tokens; pos_embed may be None)."""
    mask_token = mask_token.reshape(1, 1, -1)
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + num_prefix - x.shape[1], 1)
    x_ = torch.cat([x[:, num_prefix:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :num_prefix, :], x_], dim=1)
    return x if pos_embed is None else x + pos_embed.reshape(1, -1, x.shape[2])


def _unshuffle_inputs(batch, num_patches, mask_ratio, num_prefix, dim, dtype, seed,
                      pos_shape="batched"):
    g = _gen(seed)
    _, ids_restore, mask = random_masking(batch, num_patches, mask_ratio, generator=g,
                                          device=DEVICE)
    num_kept = num_patches - int(mask[0].sum().item()) if batch else 0
    x = random_tensor(batch, num_prefix + num_kept, dim, dtype=dtype, device=DEVICE, generator=g)
    mask_token = random_tensor(1, 1, dim, dtype=dtype, device=DEVICE, generator=g)
    pos = None
    if pos_shape is not None:
        pos = random_tensor(1, num_prefix + num_patches, dim, dtype=dtype, device=DEVICE,
                            generator=g)
        pos = pos if pos_shape == "batched" else pos[0]
    return x, ids_restore, mask_token, pos


@pytest.mark.parametrize("mask_ratio", MASK_RATIOS)
def test_unshuffle_reference_matches_mae(mask_ratio):
    x, ids_restore, mask_token, pos = _unshuffle_inputs(3, 49, mask_ratio, 1, 8,
                                                        torch.float64, seed=10)
    out = unshuffle_with_mask_token(x, ids_restore, mask_token, pos_embed=pos, backend="torch")
    assert torch.equal(out, _mae_decoder_input(x, ids_restore, mask_token, pos))


def _check_unshuffle(backend, batch, num_patches, mask_ratio, num_prefix, dim, dtype, seed,
                     pos_shape="batched"):
    """Forward and the gradients of x, mask_token, pos_embed against float64."""
    inputs = _unshuffle_inputs(batch, num_patches, mask_ratio, num_prefix, dim, dtype, seed,
                               pos_shape)
    x, ids_restore, mask_token, pos = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, mask_token, pos)
              if t is not None]

    def run(fn, tensors):
        xx, token, *maybe_pos = tensors
        return fn(xx, ids_restore, token, maybe_pos[0] if maybe_pos else None)

    def op(xx, ids, token, p):
        return unshuffle_with_mask_token(xx, ids, token, num_prefix_tokens=num_prefix,
                                         pos_embed=p, backend=backend)

    def ref(xx, ids, token, p):
        return reference.unshuffle_with_mask_token(xx, ids, token, num_prefix, p)

    def oracle(xx, ids, token, p):
        return _mae_decoder_input(xx, ids, token, p, num_prefix)

    with poison_outputs():
        out = run(op, leaves)
    assert out.dtype == dtype and out.shape == (batch, num_prefix + num_patches, dim)
    ref64 = [t.detach().double().requires_grad_(True) for t in leaves]
    low = [t.detach().clone().requires_grad_(True) for t in leaves]
    expected, expected_low = run(oracle, ref64), run(ref, low)
    assert_within_reference_error(out, expected, expected_low, atol=ERROR_FLOOR[dtype])
    _assert_near_oracle(expected_low, expected, "out", dtype)

    grad_out = random_tensor(*out.shape, dtype=dtype, device=DEVICE, generator=_gen(seed + 1))
    with poison_outputs():
        grads = torch.autograd.grad(out, leaves, grad_out)
    grads64 = torch.autograd.grad(expected, ref64, grad_out.double())
    grads_low = torch.autograd.grad(expected_low, low, grad_out)
    names = ("dx", "dmask_token", "dpos_embed")[: len(leaves)]
    assert_grads_within_reference_error(names, grads, grads64, grads_low,
                                        atol=ERROR_FLOOR[dtype])
    for name, low_grad, grad64 in zip(names, grads_low, grads64):
        _assert_near_oracle(low_grad, grad64, name, dtype)


@pytest.mark.parametrize("backend", UNSHUFFLE_BACKENDS)
@pytest.mark.parametrize("mask_ratio", MASK_RATIOS)
def test_unshuffle_mask_ratios(backend, mask_ratio):
    require_backend("unshuffle_with_mask_token", backend)
    _check_unshuffle(backend, 2, 49, mask_ratio, 1, 24, torch.float32, seed=11)


@pytest.mark.parametrize("backend", UNSHUFFLE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_prefix, pos_shape", [(0, None), (1, "batched"), (5, "flat")])
def test_unshuffle_dtypes_prefixes_and_positions(backend, dtype, num_prefix, pos_shape):
    require_backend("unshuffle_with_mask_token", backend)
    _check_unshuffle(backend, 3, 37, 0.75, num_prefix, 40, dtype, seed=12, pos_shape=pos_shape)


@pytest.mark.parametrize("backend", UNSHUFFLE_BACKENDS)
def test_unshuffle_wide_tokens_and_strided_inputs(backend):
    """D spans two kernel blocks (1100 fp32 > 1024); x and ids_restore are not contiguous."""
    require_backend("unshuffle_with_mask_token", backend)
    x, ids_restore, mask_token, pos = _unshuffle_inputs(2, 9, 0.5, 1, 1100, torch.float32,
                                                        seed=13)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)
    ids_restore = ids_restore.t().contiguous().t()
    assert not x.is_contiguous() and not ids_restore.is_contiguous()
    with poison_outputs():
        out = unshuffle_with_mask_token(x, ids_restore, mask_token, pos_embed=pos,
                                        backend=backend)
    assert torch.equal(out, _mae_decoder_input(x, ids_restore, mask_token, pos))


@pytest.mark.parametrize("backend", UNSHUFFLE_BACKENDS)
def test_unshuffle_promotes_mixed_dtypes(backend):
    """fp16 activations with fp32 parameters (autocast): fp32 out, grads in each input's dtype."""
    require_backend("unshuffle_with_mask_token", backend)
    x, ids_restore, mask_token, pos = _unshuffle_inputs(2, 16, 0.75, 1, 8, torch.float32,
                                                        seed=14)
    x = x.half().requires_grad_(True)
    mask_token.requires_grad_(True)
    pos.requires_grad_(True)
    out = unshuffle_with_mask_token(x, ids_restore, mask_token, pos_embed=pos, backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _mae_decoder_input(x.float(), ids_restore, mask_token, pos))
    grads = torch.autograd.grad(out, (x, mask_token, pos), torch.ones_like(out))
    assert [g.dtype for g in grads] == [torch.float16, torch.float32, torch.float32]


def test_unshuffle_gradcheck_torch_backend():
    x, ids_restore, mask_token, pos = _unshuffle_inputs(2, 7, 0.5, 1, 3, torch.float64, seed=15)

    def fn(xx, token, p):
        return unshuffle_with_mask_token(xx, ids_restore, token, pos_embed=p, backend="torch")

    inputs = [t.requires_grad_(True) for t in (x, mask_token, pos)]
    assert torch.autograd.gradcheck(fn, inputs)


def test_unshuffle_opcheck():
    require_backend("unshuffle_with_mask_token", "triton")
    x, ids_restore, mask_token, pos = _unshuffle_inputs(2, 11, 0.75, 1, 6, torch.float32,
                                                        seed=16)
    ops = torch.ops.fastvl
    fwd_args = (x.requires_grad_(True), ids_restore, mask_token.reshape(6), pos[0], 1)
    assert_opcheck(ops.unshuffle_with_mask_token_fwd_triton.default, fwd_args)
    grad_out = random_tensor(2, 12, 6, device=DEVICE)
    assert_opcheck(ops.unshuffle_with_mask_token_bwd_triton.default,
                   (grad_out, ids_restore, 1, x.shape[1] - 1, True))


@pytest.mark.parametrize("backend", UNSHUFFLE_BACKENDS)
def test_unshuffle_compiles_without_graph_breaks(backend):
    require_backend("unshuffle_with_mask_token", backend)
    torch._dynamo.reset()
    compiler = "inductor" if DEVICE.type == "cuda" else (
        "aot_eager" if backend == "torch" else "eager")
    x, ids_restore, mask_token, pos = _unshuffle_inputs(2, 16, 0.75, 1, 8, torch.float32,
                                                        seed=17)
    x.requires_grad_(True)

    @torch.compile(fullgraph=True, backend=compiler)
    def fn(xx, ids, token, p):
        return unshuffle_with_mask_token(xx, ids, token, pos_embed=p, backend=backend) * 2

    out = fn(x, ids_restore, mask_token, pos)
    torch.testing.assert_close(out, 2 * _mae_decoder_input(x, ids_restore, mask_token, pos))
    out.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def _unshuffle_args():
    x, ids_restore, mask_token, pos = _unshuffle_inputs(2, 8, 0.5, 1, 4, torch.float32, seed=18)
    return dict(x=x, ids_restore=ids_restore, mask_token=mask_token, pos_embed=pos)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(x=torch.zeros(2, 5)), ValueError, r"x must be \(B, P \+ K, D\)"),
        (dict(x=torch.zeros(2, 5, 4, dtype=torch.int64)), TypeError, r"x must be a floating"),
        (dict(ids_restore=torch.zeros(2, 8, dtype=torch.int32)), TypeError,
         r"ids_restore must be torch.int64"),
        (dict(ids_restore=torch.arange(8).expand(3, 8)), ValueError,
         r"ids_restore must be \(B, L\) with B = 2"),
        (dict(ids_restore=torch.zeros(2, 8, dtype=torch.int64)), ValueError,
         r"must be a permutation of \[0, L\) = \[0, 8\)"),
        (dict(x=torch.zeros(2, 10, 4)), ValueError, r"x holds 9 patch tokens .* L = 8"),
        (dict(mask_token=torch.zeros(1, 4, 1)), ValueError,
         r"mask_token must be \(D,\) or \(1, 1, D\) with D = 4"),
        (dict(pos_embed=torch.zeros(1, 8, 4)), ValueError,
         r"pos_embed must be \(P \+ L, D\) or \(1, P \+ L, D\) = \(1, 9, 4\)"),
        (dict(mask_token=torch.zeros(4).to("meta")), ValueError,
         r"x is on cpu but mask_token is on meta"),
        (dict(num_prefix_tokens=6), ValueError, r"num_prefix_tokens must lie in \[0, x.shape"),
        (dict(num_prefix_tokens=1.0), TypeError, r"num_prefix_tokens must be an int"),
    ],
)
def test_unshuffle_bad_inputs(change, error, match):
    args = _unshuffle_args()
    args = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()} | change
    with pytest.raises(error, match=match):
        unshuffle_with_mask_token(args.pop("x"), args.pop("ids_restore"),
                                  args.pop("mask_token"), **args)


def test_unshuffle_unavailable_backend_lists_reasons():
    args = _unshuffle_args()
    if not _extension.is_built():
        with pytest.raises(ValueError, match=r"backend must be 'auto' or one of .*, got 'cuda'"):
            unshuffle_with_mask_token(args.pop("x"), args.pop("ids_restore"),
                                      args.pop("mask_token"), backend="cuda", **args)
    elif DEVICE.type == "cpu":
        with pytest.raises(BackendNotSupportedError, match="CUDA device"):
            unshuffle_with_mask_token(args.pop("x"), args.pop("ids_restore"),
                                      args.pop("mask_token"), backend="cuda", **args)
    require_backend("unshuffle_with_mask_token", "triton")
    args = _unshuffle_args()
    with pytest.raises(BackendNotSupportedError, match="x has dtype torch.float64"):
        unshuffle_with_mask_token(args.pop("x").double(), args.pop("ids_restore"),
                                  args.pop("mask_token"), backend="triton", **args)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("triton", "cuda"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 196, 0.75, 1, 512), (8, 1568, 0.9, 0, 384),
                                   (16, 196, 0.985, 1, 1000), (256, 196, 0.75, 1, 512)])
def test_unshuffle_gpu_large_shapes(backend, dtype, shape):
    require_backend("unshuffle_with_mask_token", backend)
    _check_unshuffle(backend, *shape, dtype, seed=19)


@pytest.mark.parametrize("shape,chunks", [((256, 197, 512), 11), ((2, 197, 512), 2),
                                          ((8, 1569, 384), 2), ((0, 5, 4), 1), ((3, 0, 4), 3)])
def test_unshuffle_cuda_backward_batch_chunks(shape, chunks):
    """Enough (chunk, position) row groups for a GPU, at most one chunk per sample."""
    assert unshuffle_batch_chunks(*shape) == chunks


@pytest.mark.skipif(not _extension.is_built(), reason="fastvl._C is not built")
@pytest.mark.parametrize("compute_dpos", [True, False])
def test_unshuffle_cuda_ops_are_wired_without_a_gpu(compute_dpos):
    """The cuda ops' fake impls and registered backward (fake cuda tensors: no GPU needed):
    the gradients come out in each input's shape and dtype, through the batch chunks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastvl.ops.masking import UNSHUFFLE_WITH_MASK_TOKEN

    cuda_impl = UNSHUFFLE_WITH_MASK_TOKEN.impls["cuda"].fn
    with FakeTensorMode():
        x = torch.empty(4, 5, 8, device="cuda", dtype=torch.float16, requires_grad=True)
        ids_restore = torch.zeros(4, 16, dtype=torch.int64, device="cuda")
        token = torch.empty(8, device="cuda", requires_grad=True)
        pos = torch.empty(17, 8, device="cuda", requires_grad=compute_dpos)
        out = cuda_impl(x, ids_restore, token, pos, 1)
        grads = out.grad_fn.apply(torch.empty_like(out))  # (dx, None, dtoken, dpos, None)
    assert out.shape == (4, 17, 8) and out.dtype == torch.float32
    inputs = (x, token, pos) if compute_dpos else (x, token)
    grads = [g for g in grads if g is not None]
    assert [(g.shape, g.dtype, g.device.type) for g in grads] == [
        (t.shape, t.dtype, "cuda") for t in inputs]


# ---- masked_pixel_loss -------------------------------------------------------------------


def _mae_forward_loss(imgs, pred, mask, p, norm_pix=True):
    """MAE's patchify + forward_loss, line for line (H and W may differ)."""
    n, c, h, w = imgs.shape[0], imgs.shape[1], imgs.shape[2] // p, imgs.shape[3] // p
    x = imgs.reshape(shape=(n, c, h, p, w, p))
    x = torch.einsum("nchpwq->nhwpqc", x)
    target = x.reshape(shape=(n, h * w, p**2 * c))
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def _videomae_loss(videos, outputs, bool_masked_pos, tubelet, p):
    """VideoMAE's normalised-target loss on the masked rows (its rearranges as reshapes)."""
    b, c, t, h, w = videos.shape
    x = videos.reshape(b, c, t // tubelet, tubelet, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, -1, tubelet * p * p, c)
    x = (x - x.mean(dim=-2, keepdim=True)) / (
        x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    videos_patch = x.reshape(b, x.shape[1], -1)
    labels = videos_patch[bool_masked_pos].reshape(b, -1, videos_patch.shape[-1])
    return torch.nn.functional.mse_loss(outputs, labels)


def _loss_oracle(pred, imgs, mask, patch_size, norm_pix=True, eps=1e-6, eps_style="mae"):
    """MAE's / VideoMAE's loss generalised (their patchify and normalisations, the mask as
    row weights), counting only the rows of nonzero weight; pred (B, L, N) or (B, M, N)
    holding the masked patches of each sample in ascending order. Images are videos of one
    frame and tubelet depth 1."""
    if imgs.dim() == 4:
        imgs, patch_size = imgs.unsqueeze(2), (1, *patch_size)
    b, c, t, h, w = imgs.shape
    pt, ph, pw = patch_size
    x = imgs.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, -1, pt * ph * pw, c)  # (B, L, pixels, C)
    if norm_pix and eps_style == "mae":
        flat = x.reshape(b, x.shape[1], -1)
        mean, var = flat.mean(-1, keepdim=True), flat.var(-1, unbiased=True, keepdim=True)
        x = ((flat - mean) / (var + eps) ** 0.5).reshape(x.shape)
    elif norm_pix:
        mean, std = x.mean(-2, keepdim=True), x.var(-2, unbiased=True, keepdim=True).sqrt()
        x = (x - mean) / (std + eps)
    target = x.reshape(b, x.shape[1], -1)
    weight = mask.double()
    if pred.shape[1] != target.shape[1]:
        target = torch.stack([target[i][mask[i] != 0] for i in range(b)])
        weight = torch.stack([weight[i][mask[i] != 0] for i in range(b)])
    counted = weight != 0
    error = ((pred[counted] - target[counted]) ** 2).mean(-1)
    return (error * weight[counted]).sum() / weight.sum().clamp_min(1e-300)


def _loss_inputs(batch, img_shape, patch_size, mask_ratio, rows, dtype, seed, frames=1):
    """imgs (B, *img_shape), a random_masking mask and pred for all / only the masked rows."""
    g = _gen(seed)
    channels, *size = img_shape
    num_patches = 1
    for n, p in zip(size, patch_size):
        num_patches *= n // p
    imgs = random_tensor(batch, *img_shape, dtype=dtype, device=DEVICE, generator=g)
    _, _, mask = random_masking(batch, num_patches, mask_ratio, generator=g, device=DEVICE,
                                frames=frames)
    num_rows = num_patches if rows == "all" else int(mask[0].sum().item())
    patch_dim = channels
    for p in patch_size:
        patch_dim *= p
    pred = random_tensor(batch, num_rows, patch_dim, dtype=dtype, device=DEVICE, generator=g)
    return pred, imgs, mask


def test_loss_reference_matches_mae_and_videomae():
    pred, imgs, mask = _loss_inputs(2, (3, 20, 28), (4, 4), 0.75, "all", torch.float64, seed=20)
    for norm_pix in (True, False):
        loss = masked_pixel_loss(pred, imgs, mask, 4, norm_pix=norm_pix, backend="torch")
        expected = _mae_forward_loss(imgs, pred, mask, 4, norm_pix)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    pred, videos, mask = _loss_inputs(2, (3, 4, 8, 12), (2, 4, 4), 0.9, "masked",
                                      torch.float64, seed=21, frames=2)
    loss = masked_pixel_loss(pred, videos, mask, (2, 4, 4), eps_style="videomae",
                             backend="torch")
    expected = _videomae_loss(videos, pred, mask.bool(), 2, 4)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def _check_loss(backend, pred, imgs, mask, patch_size, **options):
    """The loss and pred's gradient against float64 (imgs and pred rounded to their dtype)."""
    dtype = pred.dtype
    leaf = pred.detach().clone().requires_grad_(True)
    with poison_outputs():
        loss = masked_pixel_loss(leaf, imgs, mask, patch_size, backend=backend, **options)
        (grad,) = torch.autograd.grad(loss, leaf)
    assert loss.dim() == 0 and loss.dtype == torch.float32

    def reference_loss(p, im):
        return reference.masked_pixel_loss(p, im, mask, patch_size, **options)

    ref64 = pred.detach().double().requires_grad_(True)
    low = pred.detach().clone().requires_grad_(True)
    expected = _loss_oracle(ref64, imgs.double(), mask, patch_size, **options)
    expected_low = reference_loss(low, imgs)
    assert_within_reference_error(loss, expected, expected_low, atol=ERROR_FLOOR[dtype],
                                  name="loss")
    _assert_near_oracle(expected_low, expected, "loss", dtype)
    (grad64,) = torch.autograd.grad(expected, ref64)
    (grad_low,) = torch.autograd.grad(expected_low, low)
    assert_grads_within_reference_error(("dpred",), (grad,), (grad64,), (grad_low,),
                                        atol=ERROR_FLOOR[dtype])
    _assert_near_oracle(grad_low, grad64, "dpred", dtype)
    return loss


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("mask_ratio", MASK_RATIOS)
@pytest.mark.parametrize("rows", ["all", "masked"])
def test_loss_mask_ratios_and_pred_rows(backend, mask_ratio, rows):
    """An odd image (3 x 20 x 28, 5 x 7 patches of 4); ratio 0 masks nothing: loss 0."""
    require_backend("masked_pixel_loss", backend)
    pred, imgs, mask = _loss_inputs(2, (3, 20, 28), (4, 4), mask_ratio, rows, torch.float32,
                                    seed=22)
    loss = _check_loss(backend, pred, imgs, mask, (4, 4))
    assert (loss == 0) == (mask_ratio == 0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [dict(), dict(eps_style="videomae", eps=1e-3),
                                     dict(norm_pix=False)])
def test_loss_dtypes_and_normalisations(backend, dtype, options):
    require_backend("masked_pixel_loss", backend)
    pred, imgs, mask = _loss_inputs(2, (3, 20, 12), (4, 4), 0.75, "all", dtype, seed=23)
    _check_loss(backend, pred, imgs, mask, (4, 4), **options)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("eps_style", ["mae", "videomae"])
def test_loss_video_tubes(backend, eps_style):
    require_backend("masked_pixel_loss", backend)
    pred, videos, mask = _loss_inputs(2, (3, 6, 12, 8), (2, 4, 4), 0.9, "masked",
                                      torch.float32, seed=24, frames=3)
    _check_loss(backend, pred, videos, mask, (2, 4, 4), eps_style=eps_style)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_loss_strided_inputs_bool_mask_and_fp16_pred(backend):
    """channels_last imgs in fp32 with an fp16 pred (autocast), a strided bool mask, and a
    strided float mask with all rows."""
    require_backend("masked_pixel_loss", backend)
    pred, imgs, mask = _loss_inputs(2, (3, 16, 24), (8, 8), 0.75, "masked", torch.float32,
                                    seed=25)
    imgs = imgs.to(memory_format=torch.channels_last)
    pred = pred.half().requires_grad_(True)
    strided_mask = mask.bool().t().contiguous().t()
    assert not strided_mask.is_contiguous()
    loss = masked_pixel_loss(pred, imgs, strided_mask, 8, backend=backend)
    expected = _loss_oracle(pred.double(), imgs.double(), mask, (8, 8))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(loss, pred)
    assert grad.dtype == torch.float16
    full = random_tensor(2, 6, 192, device=DEVICE, generator=_gen(32))
    weights = torch.rand(6, 2, device=DEVICE, generator=_gen(33)).t()
    assert not weights.is_contiguous()
    torch.testing.assert_close(masked_pixel_loss(full, imgs, weights, 8, backend=backend).double(),
                               _loss_oracle(full.double(), imgs.double(), weights, (8, 8)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("rows", ["all", "masked"])
def test_loss_ignores_values_that_do_not_count(backend, rows):
    """NaN in a kept patch of imgs and in a pred row of weight 0 (rows="all"): the same loss
    and gradient as without them, the gradient of those rows 0, on every backend."""
    require_backend("masked_pixel_loss", backend)
    pred, imgs, mask = _loss_inputs(2, (3, 8, 12), (4, 4), 0.5, rows, torch.float32, seed=34)
    kept = int((mask[0] == 0).nonzero()[0])
    poisoned_imgs, poisoned_pred = imgs.clone(), pred.detach().clone()
    row, col = divmod(kept, 3)
    poisoned_imgs[0, 1, 4 * row + 2, 4 * col + 1] = float("nan")
    if rows == "all":
        poisoned_pred[0, kept] = float("nan")
    leaf = poisoned_pred.requires_grad_(True)
    loss = masked_pixel_loss(leaf, poisoned_imgs, mask, 4, backend=backend)
    (grad,) = torch.autograd.grad(loss, leaf)
    ref64 = pred.detach().double().requires_grad_(True)
    expected = _loss_oracle(ref64, imgs.double(), mask, (4, 4))
    (grad64,) = torch.autograd.grad(expected, ref64)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-5, atol=1e-7)
    if rows == "all":
        assert (grad[0, kept] == 0).all()


@pytest.mark.parametrize("rows", ["all", "masked"])
def test_loss_gradcheck_torch_backend(rows):
    pred, imgs, mask = _loss_inputs(2, (2, 6, 4), (2, 2), 0.5, rows, torch.float64, seed=26)

    def fn(p):
        return masked_pixel_loss(p, imgs, mask, 2, backend="torch")

    assert torch.autograd.gradcheck(fn, (pred.requires_grad_(True),))


def test_loss_opcheck():
    require_backend("masked_pixel_loss", "triton")
    pred, imgs, mask = _loss_inputs(2, (3, 8, 12), (4, 4), 0.5, "masked", torch.float32,
                                    seed=27)
    index, weight = reference.loss_rows(mask, pred.shape[1], torch.float32)
    index = index.contiguous()
    ops = torch.ops.fastvl
    for patch_index in (index, None):
        rows = pred if patch_index is not None else random_tensor(2, 6, 48, device=DEVICE)
        w = weight if patch_index is not None else mask
        assert_opcheck(ops.masked_pixel_row_error_triton.default,
                       (rows.requires_grad_(True), imgs, patch_index, w, [4, 4], 1, 1e-6))
        grad_rows = random_tensor(2, rows.shape[1], device=DEVICE)
        assert_opcheck(ops.masked_pixel_row_error_bwd_triton.default,
                       (grad_rows, rows.detach(), imgs, patch_index, [4, 4], 2, 1e-6))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_loss_compiles_without_graph_breaks(backend):
    require_backend("masked_pixel_loss", backend)
    torch._dynamo.reset()
    compiler = "inductor" if DEVICE.type == "cuda" else (
        "aot_eager" if backend == "torch" else "eager")
    pred, imgs, mask = _loss_inputs(2, (3, 8, 12), (4, 4), 0.5, "masked", torch.float32,
                                    seed=28)
    pred.requires_grad_(True)

    @torch.compile(fullgraph=True, backend=compiler)
    def fn(p, im, m):
        return masked_pixel_loss(p, im, m, 4, backend=backend)

    loss = fn(pred, imgs, mask)
    pred64 = pred.detach().double().requires_grad_(True)
    expected = _loss_oracle(pred64, imgs.double(), mask, (4, 4))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, pred)
    torch.testing.assert_close(grad.double(), torch.autograd.grad(expected, pred64)[0],
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dual_masking_pipeline(backend):
    """VideoMAE V2: the decoder sees the visible tokens plus half of the masked ones; the
    loss covers the decoded masked patches. Same result as the reference code's path."""
    require_backend("masked_pixel_loss", backend)
    g = _gen(29)
    batch, frames, spatial, dim, tubelet, p = 2, 2, 12, 8, (2, 4, 4), 4
    videos = random_tensor(batch, 3, 4, 12, 16, device=DEVICE, generator=g)
    num_patches = frames * spatial
    ids_keep, ids_restore, mask = random_masking(batch, num_patches, 0.75, generator=g,
                                                 device=DEVICE, frames=frames)
    num_kept = ids_keep.shape[1]
    encoded = random_tensor(batch, 1 + num_kept, dim, device=DEVICE, generator=g)
    mask_token = random_tensor(dim, device=DEVICE, generator=g)
    pos = random_tensor(1 + num_patches, dim, device=DEVICE, generator=g)
    head = random_tensor(dim, 3 * 2 * p * p, device=DEVICE, generator=g).requires_grad_(True)
    # The decoder's subset: half of each sample's masked patches, chosen at random.
    masked_ids = torch.argsort(ids_restore, dim=1)[:, num_kept:]
    sub_keep, _, _ = random_masking(batch, masked_ids.shape[1], 0.5, generator=g, device=DEVICE)
    decoded = masked_ids.gather(1, sub_keep).sort(dim=1).values  # ascending patch order
    decode_mask = torch.zeros_like(mask).scatter_(1, decoded, 1.0)

    def pipeline(unshuffle, loss_fn):
        full = unshuffle(encoded, ids_restore, mask_token, pos)
        rows = gather_tokens(full[:, 1:], decoded, backend="torch")
        return loss_fn(rows @ head, decode_mask)

    loss = pipeline(
        lambda *a: unshuffle_with_mask_token(*a[:3], pos_embed=a[3], backend=backend),
        lambda pred, m: masked_pixel_loss(pred, videos, m, tubelet, eps_style="videomae",
                                          backend=backend),
    )
    expected = pipeline(
        lambda x, ids, token, pe: _mae_decoder_input(x, ids, token.view(1, 1, -1), pe),
        lambda pred, m: _videomae_loss(videos, pred, m.bool(), 2, p),
    )
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, head)[0],
                               torch.autograd.grad(expected, head)[0])


def _loss_args():
    pred, imgs, mask = _loss_inputs(2, (3, 8, 12), (4, 4), 0.5, "all", torch.float32, seed=30)
    return dict(pred=pred.cpu(), imgs=imgs.cpu(), mask=mask.cpu(), patch_size=4)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(imgs=torch.zeros(2, 3, 9, 12)), ValueError,
         r"image size \(9, 12\) is not divisible by the patch size \(4, 4\)"),
        (dict(imgs=torch.zeros(2, 3, 12)), ValueError, r"imgs must be \(B, C, H, W\) or"),
        (dict(imgs=torch.zeros(2, 3, 4, 8, 12)), TypeError,
         r"patch_size must be a tuple \(pt, ph, pw\)"),
        (dict(patch_size=(4, 4, 4)), TypeError, r"patch_size must be an int or a tuple"),
        (dict(patch_size=0), ValueError, r"patch_size entries must be >= 1"),
        (dict(pred=torch.zeros(2, 6, 47)), ValueError,
         r"pred must be \(B, L, N\) = \(2, 6, 48\)"),
        (dict(pred=torch.zeros(2, 7, 48)), ValueError, r"M <= L"),
        (dict(pred=torch.zeros(2, 2, 48)), ValueError,
         r"pred has 2 rows .* mask \[3\] patches; every sample must mask exactly 2"),
        (dict(mask=torch.zeros(2, 5)), ValueError, r"mask must be \(B, L\) = \(2, 6\)"),
        (dict(mask=torch.zeros(2, 6, dtype=torch.int64)), TypeError, r"mask must be a float"),
        (dict(pred=torch.zeros(2, 6, 48, dtype=torch.int32)), TypeError,
         r"pred must be a floating-point tensor"),
        (dict(imgs=torch.zeros(2, 3, 8, 12, requires_grad=True)), ValueError,
         r"imgs requires grad.*imgs.detach\(\)"),
        (dict(eps_style="bert"), ValueError, r"eps_style must be 'mae' or 'videomae'"),
        (dict(eps=-1.0), ValueError, r"eps must be a finite number >= 0, got -1.0"),
        (dict(eps=float("nan")), ValueError, r"eps must be a finite number >= 0, got nan"),
        (dict(eps=float("inf")), ValueError, r"eps must be a finite number >= 0, got inf"),
        (dict(norm_pix=1), TypeError, r"norm_pix must be a bool"),
        (dict(imgs=torch.zeros(2, 1, 8, 12), pred=torch.zeros(2, 96, 1), patch_size=1,
              mask=torch.zeros(2, 96)), ValueError, r"needs at least 2 values per statistic"),
        (dict(mask=torch.zeros(2, 6).to("meta")), ValueError,
         r"pred is on cpu but mask is on meta"),
    ],
)
def test_loss_bad_inputs(change, error, match):
    args = _loss_args() | change
    with pytest.raises(error, match=match):
        masked_pixel_loss(args.pop("pred"), args.pop("imgs"), args.pop("mask"),
                          args.pop("patch_size"), **args)


def test_loss_unavailable_backend_lists_reasons():
    args = _loss_args()
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of .*, got 'cuda'"):
        masked_pixel_loss(**args, backend="cuda")
    require_backend("masked_pixel_loss", "triton")
    args["pred"] = args["pred"].double()
    with pytest.raises(BackendNotSupportedError, match="pred has dtype torch.float64"):
        masked_pixel_loss(**args, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [
    ((64, 3, 224, 224), (16, 16), 0.75, "all", 1, "mae"),
    ((64, 3, 224, 224), (16, 16), 0.985, "masked", 1, "mae"),
    ((8, 3, 16, 224, 224), (2, 16, 16), 0.9, "masked", 8, "videomae"),
    ((4, 3, 96, 160), (32, 32), 0.75, "all", 1, "videomae"),
])
def test_loss_gpu_large_shapes(dtype, case):
    shape, patch_size, mask_ratio, rows, frames, eps_style = case
    pred, imgs, mask = _loss_inputs(shape[0], shape[1:], patch_size, mask_ratio, rows, dtype,
                                    seed=31, frames=frames)
    _check_loss("triton", pred, imgs, mask, patch_size, eps_style=eps_style)
