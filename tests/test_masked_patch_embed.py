"""masked_patch_embed on every backend against MAE's path written here in float64.

The oracle (:func:`_mae_embed`): timm / MAE's conv patch embedding of every patch, + pos,
MAE's gather of the kept patches, prepend CLS (+ its position). Tolerance rule (flash-attn's):
a backend's max error against it in float64 is at most 2x (forward) / 3x (gradients of imgs,
weight, bias, pos_embed, cls_token) the error of that same oracle run by PyTorch in the tested
dtype, plus a small absolute floor; the torch backend (gather first, one matmul) is a
different computation, so the rule checks it too. Outputs are poisoned (NaN) first, so
unwritten rows fail.

On a CPU machine the Triton kernels run in the interpreter with 16-wide blocks, so the small
shapes here span several blocks of rows, of D and of the patch length; bf16 and MAE-sized
shapes are `gpu` tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastvl.ops import BackendNotSupportedError
from fastvl.ops.patch_embed import masked_patch_embed
from fastvl.testing import (
    ERROR_FLOOR,
    assert_grads_within_reference_error,
    assert_opcheck,
    assert_within_reference_error,
    poison_outputs,
    random_index,
    random_tensor,
)
from tests.conftest import DEVICE, require_backend

ALL_BACKENDS = ("torch", "triton")
CPU_DTYPES = (torch.float32, torch.float16)
GPU_DTYPES = CPU_DTYPES + (torch.bfloat16,)
NAMES = ("imgs", "weight", "bias", "pos_embed", "cls_token")


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _mae_embed(imgs, weight, bias, pos_embed, ids_keep, patch, cls_token=None):
    """MAE's encoder input: conv patch embed, + pos_embed (its patch rows), gather ids_keep,
    then the class token (+ row 0 of a 1 + L pos_embed) in front."""
    conv = F.conv2d if imgs.dim() == 4 else F.conv3d
    x = conv(imgs, weight, bias, stride=tuple(patch)).flatten(2).transpose(1, 2)  # (B, L, D)
    num_patches, dim = x.shape[1], x.shape[2]
    pos = None if pos_embed is None else pos_embed.reshape(-1, dim)
    if pos is not None:
        x = x + pos[pos.shape[0] - num_patches:]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, dim))
    if cls_token is None:
        return x
    cls = cls_token if pos is None or pos.shape[0] == num_patches else cls_token + pos[:1]
    return torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)


def _inputs(imgs_shape, patch, dim, dtype, seed, *, bias=True, pos="cls", cls=True):
    """(imgs, weight, bias, pos_embed, cls_token); pos: "cls" (1 + L rows), "patches" (L rows)
    or None."""
    g = _gen(seed)
    batch, channels, *size = imgs_shape
    num_patches = 1
    for n, p in zip(size, patch):
        num_patches *= n // p
    imgs = random_tensor(*imgs_shape, dtype=dtype, device=DEVICE, generator=g)
    # Scaled like a real patch embedding so outputs stay O(1) (fp16 keeps its precision).
    weight = random_tensor(dim, channels, *patch, dtype=torch.float64, device=DEVICE, generator=g)
    weight = (weight / weight[0].numel() ** 0.5).to(dtype)
    pos_rows = {"cls": 1 + num_patches, "patches": num_patches, None: 0}[pos]
    return (
        imgs,
        weight,
        random_tensor(dim, dtype=dtype, device=DEVICE, generator=g) if bias else None,
        random_tensor(1, pos_rows, dim, dtype=dtype, device=DEVICE, generator=g) if pos else None,
        random_tensor(1, 1, dim, dtype=dtype, device=DEVICE, generator=g) if cls else None,
    ), num_patches


def _check(backend, imgs_shape, patch, dim, num_kept, dtype, *, seed=0, ids_keep=None,
           patch_arg=None, grads=True, **options):
    """Forward and the gradients of every tensor input, against float64, by the error rule."""
    inputs, num_patches = _inputs(imgs_shape, patch, dim, dtype, seed, **options)
    if ids_keep is None:
        ids_keep = random_index(imgs_shape[0], num_kept, num_patches, device=DEVICE,
                                generator=_gen(seed + 100))
    present = [i for i, t in enumerate(inputs) if t is not None]

    def run(fn, tensors, cast):
        leaves = [None if t is None else cast(t).detach().requires_grad_(grads) for t in tensors]
        imgs, weight, bias, pos, cls = leaves
        out = fn(imgs, weight, bias, pos, ids_keep, cls)
        return out, [leaves[i] for i in present]

    with poison_outputs():
        out, leaves = run(
            lambda i, w, b, p, ids, c: masked_patch_embed(
                i, w, b, p, ids, patch if patch_arg is None else patch_arg, cls_token=c,
                backend=backend),
            inputs, lambda t: t)
    ref_fn = lambda i, w, b, p, ids, c: _mae_embed(i, w, b, p, ids, patch, c)  # noqa: E731
    ref64, leaves64 = run(ref_fn, inputs, torch.Tensor.double)
    low, leaves_low = run(ref_fn, inputs, lambda t: t.clone())
    rows = num_kept + (inputs[4] is not None)
    assert out.dtype == dtype and out.shape == (imgs_shape[0], rows, dim)
    floor = ERROR_FLOOR[dtype]
    assert_within_reference_error(out, ref64, low, factor=2, atol=floor, name="out")
    if not grads:
        return
    grad_out = random_tensor(*out.shape, dtype=dtype, device=DEVICE, generator=_gen(seed + 200))
    actual = torch.autograd.grad(out, leaves, grad_out)
    expected = torch.autograd.grad(ref64, leaves64, grad_out.double())
    low_grads = torch.autograd.grad(low, leaves_low, grad_out)
    names = [NAMES[i] for i in present]
    assert_grads_within_reference_error(names, actual, expected, low_grads, atol=floor)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("mask_ratio", [0.0, 0.75, 0.9, 0.985])
def test_masking_ratios(backend, mask_ratio):
    """MAE (75%), VideoMAE (90%) and CropMAE (98.5%: one patch of 72 kept) ratios."""
    require_backend("masked_patch_embed", backend)
    num_patches = (32 // 4) * (36 // 4)
    num_kept = int(num_patches * (1 - mask_ratio))
    _check(backend, (2, 3, 32, 36), (4, 4), 40, num_kept, torch.float32, seed=1)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES if DEVICE.type == "cuda" else CPU_DTYPES)
def test_dtypes_odd_sizes_non_square_patch(backend, dtype):
    """H, W odd multiples of a (3, 5) patch; C = 2, D = 33 and E = 30 not multiples of 16."""
    require_backend("masked_patch_embed", backend)
    _check(backend, (3, 2, 21, 25), (3, 5), 33, 11, dtype, seed=2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        dict(pos="patches", cls=True),  # timm's no_embed_class: the class token gets no position
        dict(pos="patches", cls=False),
        dict(pos=None, cls=True, bias=False),
        dict(pos=None, cls=False),
    ],
    ids=["no_embed_class", "no_cls", "no_pos_no_bias", "bare"],
)
def test_pos_cls_bias_layouts(backend, options):
    require_backend("masked_patch_embed", backend)
    _check(backend, (2, 3, 12, 20), (4, 4), 24, 5, torch.float32, seed=3, patch_arg=4, **options)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_pos_embed_without_batch_dim(backend):
    require_backend("masked_patch_embed", backend)
    (imgs, weight, bias, pos, cls), num_patches = _inputs((2, 3, 8, 12), (4, 4), 16,
                                                          torch.float32, seed=4)
    ids_keep = random_index(2, 3, num_patches, device=DEVICE, generator=_gen(4))
    out = masked_patch_embed(imgs, weight, bias, pos[0], ids_keep, 4, cls_token=cls,
                             backend=backend)
    expected = masked_patch_embed(imgs, weight, bias, pos, ids_keep, 4, cls_token=cls,
                                  backend=backend)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_video_tube_masking(backend, dtype):
    """VideoMAE: (B, C, T, H, W) with (2, 4, 4) tubelets; one spatial mask shared by all frames."""
    require_backend("masked_patch_embed", backend)
    batch, frames, grid_h, grid_w = 2, 3, 2, 3
    spatial = random_index(batch, 2, grid_h * grid_w, device=DEVICE, generator=_gen(5))
    offsets = torch.arange(frames, device=DEVICE) * grid_h * grid_w
    ids_keep = (offsets[None, :, None] + spatial[:, None, :]).reshape(batch, -1)
    _check(backend, (batch, 3, 2 * frames, 4 * grid_h, 4 * grid_w), (2, 4, 4), 20,
           ids_keep.shape[1], dtype, seed=5, ids_keep=ids_keep)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_repeated_indices_sum_gradients(backend):
    """Not MAE's case, but defined: a patch kept twice adds both rows' gradients."""
    require_backend("masked_patch_embed", backend)
    ids_keep = random_index(2, 9, 6, unique=False, device=DEVICE, generator=_gen(6))
    _check(backend, (2, 3, 8, 12), (4, 4), 20, 9, torch.float32, seed=6, ids_keep=ids_keep)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_inputs(backend):
    """channels_last images, a transposed weight, a strided ids_keep and pos_embed."""
    require_backend("masked_patch_embed", backend)
    (imgs, weight, bias, pos, cls), num_patches = _inputs((2, 3, 8, 16), (4, 4), 24,
                                                          torch.float32, seed=7)
    imgs_cl = imgs.to(memory_format=torch.channels_last)
    weight_t = weight.transpose(2, 3).contiguous().transpose(2, 3)
    pos_t = pos.transpose(1, 2).contiguous().transpose(1, 2)
    ids_t = random_index(3, 2, num_patches, device=DEVICE, generator=_gen(7)).t()
    assert not (imgs_cl.is_contiguous() or weight_t.is_contiguous() or pos_t.is_contiguous()
                or ids_t.is_contiguous())
    with poison_outputs():
        out = masked_patch_embed(imgs_cl, weight_t, bias, pos_t, ids_t, 4, cls_token=cls,
                                 backend=backend)
    expected = _mae_embed(imgs, weight, bias, pos, ids_t.contiguous(), (4, 4), cls)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 8, 8, 2), (2, 3, 8, 8, 0)], ids=["B=0", "K=0"])
def test_empty(backend, shape):
    require_backend("masked_patch_embed", backend)
    batch, channels, height, width, num_kept = shape
    (imgs, weight, bias, pos, cls), _ = _inputs((batch, channels, height, width), (4, 4), 8,
                                                torch.float32, seed=8)
    leaves = [t.requires_grad_() for t in (imgs, weight, bias, pos, cls)]
    ids_keep = torch.zeros(batch, num_kept, dtype=torch.int64, device=DEVICE)
    out = masked_patch_embed(*leaves[:4], ids_keep, 4, cls_token=leaves[4], backend=backend)
    assert out.shape == (batch, 1 + num_kept, 8)
    torch.testing.assert_close(out, _mae_embed(*leaves[:4], ids_keep, (4, 4), leaves[4]))
    out.sum().backward()
    assert torch.count_nonzero(imgs.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_torch_backend_gradcheck():
    """float64 gradcheck of the torch backend, video with a class token and positions."""
    (imgs, weight, bias, pos, cls), num_patches = _inputs((2, 2, 2, 2, 6), (2, 1, 3), 3,
                                                          torch.float64, seed=9)
    ids_keep = random_index(2, 3, num_patches, device=DEVICE, generator=_gen(9))
    inputs = tuple(t.requires_grad_() for t in (imgs, weight, bias, pos, cls))

    def fn(i, w, b, p, c):
        return masked_patch_embed(i, w, b, p, ids_keep, (2, 1, 3), cls_token=c, backend="torch")

    assert torch.autograd.gradcheck(fn, inputs)


# ---- registration, compile ---------------------------------------------------------------


def test_opcheck_triton_ops():
    require_backend("masked_patch_embed", "triton")
    (imgs, weight, bias, pos, cls), num_patches = _inputs((2, 3, 1, 8, 12), (1, 4, 4), 16,
                                                          torch.float32, seed=10)
    ids_keep = random_index(2, 3, num_patches, device=DEVICE, generator=_gen(10))
    pos = pos[0]
    leaves = [t.requires_grad_() for t in (imgs, weight, bias, pos)]
    ops = torch.ops.fastvl
    assert_opcheck(ops.masked_patch_embed_fwd_triton.default, (*leaves, ids_keep, cls))
    grad_out = random_tensor(2, 4, 16, device=DEVICE, generator=_gen(11))
    for num_pos_rows, flags in ((1 + num_patches, (True, True)), (0, (False, False))):
        assert_opcheck(ops.masked_patch_embed_bwd_triton.default,
                       (grad_out, imgs.detach(), weight.detach(), ids_keep, num_pos_rows, *flags))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_compiles_without_graph_breaks(backend):
    require_backend("masked_patch_embed", backend)
    torch._dynamo.reset()
    # On CPU: dynamo only (and aot_eager for torch); inductor is exercised on GPU.
    if DEVICE.type == "cuda":
        compiler = "inductor"
    else:
        compiler = "aot_eager" if backend == "torch" else "eager"
    (imgs, weight, bias, pos, cls), num_patches = _inputs((2, 3, 8, 12), (4, 4), 16,
                                                          torch.float32, seed=12)
    ids_keep = random_index(2, 3, num_patches, device=DEVICE, generator=_gen(12))
    leaves = [t.requires_grad_() for t in (weight, bias, pos, cls)]

    @torch.compile(fullgraph=True, backend=compiler)
    def fn(i, w, b, p, ids, c):
        return masked_patch_embed(i, w, b, p, ids, 4, cls_token=c, backend=backend) * 2

    out = fn(imgs, *leaves[:3], ids_keep, leaves[3])
    expected = _mae_embed(imgs, *leaves[:3], ids_keep, (4, 4), leaves[3]) * 2
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), leaves)
    expected_grads = torch.autograd.grad(expected.sum(), leaves)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_auto_uses_torch_on_cpu():
    from fastvl.ops.registry import OPS
    from fastvl.reference.patch_embed import masked_patch_embed_gather_first

    imgs = random_tensor(1, 3, 4, 4)
    impl = OPS["masked_patch_embed"].select("auto", imgs.device, imgs)
    assert impl is masked_patch_embed_gather_first


def test_unchecked_out_of_range_rows_read_nothing():
    """With check_bounds=False the kernel stays memory-safe: a bad index's row is the bias."""
    require_backend("masked_patch_embed", "triton")
    (imgs, weight, bias, pos, _), num_patches = _inputs((1, 3, 8, 8), (4, 4), 16,
                                                        torch.float32, seed=13, pos="patches")
    ids_keep = torch.tensor([[0, num_patches, -1, 3]], device=DEVICE)
    out = masked_patch_embed(imgs, weight, bias, pos, ids_keep, 4, backend="triton",
                             check_bounds=False)
    expected = _mae_embed(imgs, weight, bias, pos, ids_keep[:, [0, 3]], (4, 4))
    torch.testing.assert_close(out[:, [0, 3]], expected)
    torch.testing.assert_close(out[0, 1:3], bias.expand(2, -1), rtol=0, atol=0)


# ---- bad input -------------------------------------------------------------------------


def _valid_args():
    (imgs, weight, bias, pos, cls), num_patches = _inputs((2, 3, 8, 12), (4, 4), 16,
                                                          torch.float32, seed=14)
    ids_keep = random_index(2, 3, num_patches, device=DEVICE)
    ids_keep[:, 0], ids_keep[:, 1] = 0, num_patches - 1  # predictable range messages
    return dict(imgs=imgs, weight=weight, bias=bias, pos_embed=pos, ids_keep=ids_keep,
                patch_size=4, cls_token=cls)


def _replace(**changes):
    return lambda a: {**a, **{k: f(a) for k, f in changes.items()}}


@pytest.mark.parametrize(
    "change, error, match",
    [
        (_replace(imgs=lambda a: a["imgs"][:, :, :7]), ValueError,
         r"image size H = 7 is not divisible by the patch size 4"),
        (_replace(imgs=lambda a: a["imgs"][..., :10]), ValueError,
         r"image size W = 10 is not divisible"),
        (_replace(imgs=lambda a: a["imgs"][0]), ValueError, r"imgs must be \(B, C, H, W\)"),
        (_replace(imgs=lambda a: a["imgs"].long()), TypeError, r"imgs must be a floating-point"),
        (_replace(imgs=lambda a: a["imgs"].tolist()), TypeError, r"imgs must be a torch.Tensor"),
        (_replace(imgs=lambda a: a["imgs"][:, :2]), ValueError,
         r"weight has 3 input channels but imgs has 2"),
        (_replace(patch_size=lambda a: 2), ValueError,
         r"weight's patch \(4, 4\) does not match patch_size \(2, 2\)"),
        (_replace(patch_size=lambda a: (4, 4, 4)), ValueError,
         r"patch_size must be an int or \(ph, pw\)"),
        (_replace(patch_size=lambda a: 4.0), TypeError, r"patch_size must be an int or a tuple"),
        (_replace(patch_size=lambda a: (0, 4)), ValueError, r"patch_size values must be >= 1"),
        (_replace(weight=lambda a: a["weight"].flatten(1)), ValueError,
         r"weight must be the conv weight \(D, C, ph, pw\)"),
        (_replace(bias=lambda a: a["bias"][:5]), ValueError, r"bias must be \(D,\) = \(16,\)"),
        (_replace(pos_embed=lambda a: a["pos_embed"][:, 2:]), ValueError,
         r"pos_embed must be \(1, N, D\) or \(N, D\) with D = 16 and N = L = 6 or 1 \+ L = 7"),
        (_replace(cls_token=lambda a: None), ValueError, r"only the patch rows"),
        (_replace(cls_token=lambda a: a["cls_token"][0]), ValueError,
         r"cls_token must be \(1, 1, D\)"),
        (_replace(ids_keep=lambda a: a["ids_keep"][0]), ValueError, r"ids_keep must be \(B, K\)"),
        (_replace(ids_keep=lambda a: a["ids_keep"].int()), TypeError,
         r"ids_keep must be torch.int64"),
        (_replace(ids_keep=lambda a: a["ids_keep"][:1]), ValueError,
         r"ids_keep batch size 1 does not match imgs \(batch 2\)"),
        (_replace(ids_keep=lambda a: a["ids_keep"] + 1), ValueError,
         r"masked_patch_embed: ids_keep values must lie in \[0, 6\) \(the L = 6 patches of "
         r"imgs\), found values from \d+ to 6"),
        (_replace(ids_keep=lambda a: a["ids_keep"] - 1), ValueError,
         r"ids_keep values must lie in \[0, 6\).*from -1"),
        (_replace(weight=lambda a: a["weight"].double()), TypeError,
         r"imgs and weight must share one dtype"),
        (_replace(pos_embed=lambda a: a["pos_embed"].half()), TypeError,
         r"imgs and pos_embed must share one dtype"),
        (_replace(bias=lambda a: a["bias"].to("meta")), ValueError,
         r"imgs is on cpu but bias is on meta"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    args = change(_valid_args())
    with pytest.raises(error, match=match):
        masked_patch_embed(**args)


def test_range_check_runs_on_every_call():
    """The checks that read no values are memoized by shapes, dtypes, devices and arguments;
    the range check of ids_keep reads values, so a repeated call runs it again."""
    args = _valid_args()
    masked_patch_embed(**args)
    masked_patch_embed(**args)
    with pytest.raises(ValueError, match=r"ids_keep values must lie in \[0, 6\).*to 6"):
        masked_patch_embed(**{**args, "ids_keep": args["ids_keep"] + 1})
    with pytest.raises(TypeError, match=r"patch_size must be an int or a tuple"):
        masked_patch_embed(**{**args, "patch_size": 4.0})


def test_video_needs_matching_tubelet():
    args = _valid_args()
    video = args["imgs"][:, :, None].expand(-1, -1, 4, -1, -1)
    with pytest.raises(ValueError, match=r"weight must be the conv weight \(D, C, pt, ph, pw\)"):
        masked_patch_embed(**{**args, "imgs": video, "patch_size": (2, 4, 4)})
    with pytest.raises(ValueError, match=r"image size T = 4 is not divisible by the patch size 3"):
        masked_patch_embed(**{**args, "imgs": video, "patch_size": (3, 4, 4)})


def test_unavailable_backend_lists_reasons():
    args = _valid_args()
    require_backend("masked_patch_embed", "triton")
    doubled = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
               for k, v in args.items()}
    with pytest.raises(BackendNotSupportedError, match=r"imgs has dtype torch.float64"):
        masked_patch_embed(**doubled, backend="triton")
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of .*, got 'cuda'"):
        masked_patch_embed(**args, backend="cuda")


# ---- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize(
    "imgs_shape, patch, dim, keep",
    [
        ((8, 3, 224, 224), (16, 16), 768, 49),  # MAE ViT-B, 75% masked
        ((4, 3, 16, 224, 224), (2, 16, 16), 384, 156),  # VideoMAE ViT-S, 90% masked
        ((3, 3, 210, 182), (14, 14), 1024, 2),  # odd grid (15 x 13), CropMAE-like
    ],
)
def test_gpu_large_shapes(dtype, imgs_shape, patch, dim, keep):
    require_backend("masked_patch_embed", "triton")
    _check("triton", imgs_shape, patch, dim, keep, dtype, seed=15)
