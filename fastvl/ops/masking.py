"""Masked image modeling (MAE, VideoMAE, CropMAE, VideoMAE V2) without the reference code's
copies: :func:`random_masking`, :func:`running_cell_masking`, :func:`unshuffle_with_mask_token`,
:func:`masked_pixel_loss`.

The encoder embeds only the kept patches (:func:`fastvl.ops.masked_patch_embed` with
``ids_keep``); the decoder input is built by one kernel (visible tokens back in place, the
mask token elsewhere, positions added) instead of repeat + cat + gather with a (B, L, D)
int64 index; the loss reads its targets straight from the image and normalises each patch
in registers instead of materialising a float32 target image. Nothing here syncs with the
host (the checks of index values run on CPU tensors only), so a training step can be
captured in a CUDA graph.

Dual masking (VideoMAE V2): :func:`running_cell_masking` gives the decoder's mask; the decoder
runs on the visible patches and the removed ones it keeps (``mask * (1 - decoder_mask)``):
gather those rows from the unshuffled decoder input with :func:`fastvl.ops.gather_tokens`
and give :func:`masked_pixel_loss` the decoded rows (``pred`` (B, M2, N), ascending patch
order) with the mask of the decoded patches; ``models.MaskedAutoencoderViT(...,
decoder_mask_ratio=0.5)`` does all of it. Any other subset works the same way (e.g. a second
:func:`random_masking` over the masked list, ``tests/test_masking.py::
test_dual_masking_pipeline``).

Layouts and the exact math are in :mod:`fastvl.reference.masking`. On the triton backend the
kernels are launched directly in eager mode (:class:`fastvl.ops._eager.EagerOp`; torch.compile
sees the registered ops), and the checks that read no values are memoized by the shapes,
dtypes, devices and flags they read.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastvl import _extension
from fastvl.ops._checks import check_float_tensor, check_int, check_tensor, host_readable, is_int
from fastvl.ops._eager import EagerOp, call_key, memoized
from fastvl.ops.registry import KERNEL_DTYPES, TRITON_IMPORT_ERROR, Call, Supports, register_op
from fastvl.reference import masking as _reference

__all__ = [
    "random_masking",
    "running_cell_masking",
    "unshuffle_with_mask_token",
    "masked_pixel_loss",
    "UNSHUFFLE_WITH_MASK_TOKEN",
    "MASKED_PIXEL_LOSS",
]



def _describe_unshuffle(x, ids_restore, mask_token, pos_embed, num_prefix_tokens) -> Call:
    more = (("mask_token", mask_token.dtype),)
    if pos_embed is not None:
        more += (("pos_embed", pos_embed.dtype),)
    return Call(x.device, x.dtype, more_dtypes=more)


def _describe_loss(pred, imgs, *other_args) -> Call:
    return Call(pred.device, pred.dtype, more_dtypes=(("imgs", imgs.dtype),))


UNSHUFFLE_WITH_MASK_TOKEN = register_op("unshuffle_with_mask_token", describe=_describe_unshuffle)
MASKED_PIXEL_LOSS = register_op("masked_pixel_loss", describe=_describe_loss)
EPS_STYLES = {"mae": 1, "videomae": 2}  # the kernels' NORM codes (0: norm_pix=False)

_NUMBER = (int, float)


# ---- random_masking ----------------------------------------------------------------------


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    *,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device=None,
    frames: int = 1,
):
    """MAE's per-sample random masking: which patches the encoder sees.

    Args:
        batch: B. num_patches: L, the patches per sample (for video ``T' * h * w``).
        mask_ratio: float in [0, 1); ``len_keep = int(S * (1 - mask_ratio))`` patches are
            kept per frame, S = L / frames (MAE 0.75, VideoMAE 0.9, CropMAE 0.985).
        noise: optional (B, S) float scores; the smallest are kept (MAE's ``argsort(noise)``;
            pass your own for reproducibility or importance-driven masking such as HPM).
            Default: uniform ``torch.rand`` from ``generator`` on ``device``.
        generator, device: for the default noise (device defaults to the generator's, else
            CPU); unused when noise is given (the results live on noise's device).
        frames: T' > 1 for tube masking (VideoMAE): one spatial mask of S = L / T' positions
            shared by every frame; patch ``l = t * S + s``.

    Returns:
        ``(ids_keep (B, K) int64, ids_restore (B, L) int64, mask (B, L) float32)``,
        K = frames * len_keep: ``ids_keep`` the kept patches (MAE's shuffled order, frame by
        frame for tubes), ``ids_restore`` the inverse permutation of the shuffle (visible
        patch l is encoder token ``ids_restore[:, l]``), ``mask`` 1 = removed, 0 = kept, in
        the original order (MAE). No host sync; nothing requires grad.
    """
    op = "random_masking"
    check_int(op, "batch", batch)
    check_int(op, "num_patches", num_patches)
    check_int(op, "frames", frames)
    if batch < 0 or num_patches < 0:
        raise ValueError(f"{op}: batch and num_patches must be >= 0, got {batch} and {num_patches}")
    if frames < 1 or num_patches % frames:
        raise ValueError(
            f"{op}: frames must be a positive divisor of num_patches ({num_patches}) for tube "
            f"masking, got {frames}"
        )
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, _NUMBER):
        raise TypeError(
            f"{op}: mask_ratio must be a float in [0, 1), got {type(mask_ratio).__name__}"
        )
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"{op}: mask_ratio must lie in [0, 1), got {mask_ratio}")
    spatial = num_patches // frames
    if noise is None:
        if device is None:
            device = generator.device if generator is not None else "cpu"
        noise = torch.rand(batch, spatial, generator=generator, device=device)
    else:
        check_tensor(op, "noise", noise)
        if not noise.is_floating_point():
            raise TypeError(f"{op}: noise must be a floating-point tensor, got {noise.dtype}")
        if tuple(noise.shape) != (batch, spatial):
            raise ValueError(
                f"{op}: noise must be (B, L / frames) = ({batch}, {spatial}), "
                f"got shape {tuple(noise.shape)}"
            )
    return _reference.random_masking(noise.detach(), mask_ratio, frames)


def running_cell_masking(
    batch: int,
    frames: int,
    height: int,
    width: int,
    mask_ratio: float = 0.5,
    *,
    phase: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> torch.Tensor:
    """VideoMAE V2's decoder masking ("running cell"): which patches the decoder skips.

    Each 2 x 2 cell of the spatial grid drops ``4 * mask_ratio`` of its 4 patches, and the
    dropped positions rotate by one position per time slot, so over 4 slots every patch is
    decoded equally often and the decoder still sees every region of every frame.

    Args:
        batch: B. frames, height, width: the patch grid (T', h, w), h and w even.
        mask_ratio: the share of patches the decoder drops: 0.25, 0.5 (VideoMAE V2) or 0.75.
        phase: optional (B,) int64 in [0, 4), each sample's pointer into the cell's queue;
            default uniform random from ``generator`` on ``device`` (the paper draws it per
            sample; pass your own for reproducibility).

    Returns:
        ``mask`` (B, T' * h * w) float32, 1 = not decoded, patch ``l = (t * h + y) * w + x``
        (the layout of :func:`random_masking`'s ``mask``). No host sync.

    Dual masking: the decoder reconstructs the patches that the encoder removed and this
    mask keeps, ``mask_enc * (1 - mask_dec)``, and the loss covers those only (the paper's
    choice; VideoMAE V2's code also decodes the few encoder-visible ones it keeps). With tube
    masking and T' a multiple of 4 every sample then decodes the same number of patches:
    ``(L - K) * (1 - mask_ratio)``. :class:`fastvl.models.MaskedAutoencoderViT` does this with
    ``decoder_mask_ratio``.
    """
    op = "running_cell_masking"
    for name, value in (("batch", batch), ("frames", frames), ("height", height),
                        ("width", width)):
        check_int(op, name, value)
    if batch < 0 or frames < 1:
        raise ValueError(f"{op}: batch must be >= 0 and frames >= 1, got {batch} and {frames}")
    if height < 2 or width < 2 or height % 2 or width % 2:
        raise ValueError(
            f"{op}: height and width must be even and >= 2 (2 x 2 cells), got {height} x {width}"
        )
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, _NUMBER):
        raise TypeError(f"{op}: mask_ratio must be a float, got {type(mask_ratio).__name__}")
    masked_per_cell = 4 * mask_ratio
    if masked_per_cell not in (1, 2, 3):
        raise ValueError(
            f"{op}: mask_ratio must be 0.25, 0.5 or 0.75 (1 to 3 of each cell's 4 patches), "
            f"got {mask_ratio}"
        )
    if phase is None:
        if device is None:
            device = generator.device if generator is not None else "cpu"
        phase = torch.randint(0, 4, (batch,), generator=generator, device=device)
    else:
        check_tensor(op, "phase", phase)
        if phase.dtype != torch.int64 or tuple(phase.shape) != (batch,):
            raise ValueError(
                f"{op}: phase must be int64 of shape (B,) = ({batch},), got {phase.dtype} "
                f"{tuple(phase.shape)}"
            )
        if host_readable(phase) and phase.numel() and not bool(
                ((phase >= 0) & (phase < 4)).all()):
            raise ValueError(f"{op}: phase values must lie in [0, 4)")
    return _reference.running_cell_mask(phase, frames, height, width, int(masked_per_cell))


# ---- unshuffle_with_mask_token -----------------------------------------------------------
# Every implementation is called as fn(x, ids_restore, mask_token, pos_embed, num_prefix_tokens)
# with validated arguments in their public shapes.


def _unshuffle_torch_impl(x, ids_restore, mask_token, pos_embed, num_prefix_tokens):
    return _reference.unshuffle_with_mask_token(
        x, ids_restore, mask_token, num_prefix_tokens, pos_embed
    )


def _unshuffle_out_dtype(x, mask_token, pos_embed) -> torch.dtype:
    dtype = x.dtype
    if mask_token.dtype != dtype:  # (promote_types is an op call: skipped when not needed)
        dtype = torch.promote_types(dtype, mask_token.dtype)
    if pos_embed is not None and pos_embed.dtype != dtype:
        dtype = torch.promote_types(dtype, pos_embed.dtype)
    return dtype


def _unshuffle_fwd_fake(x, ids_restore, mask_token, pos_embed, num_prefix_tokens):
    shape = (x.shape[0], num_prefix_tokens + ids_restore.shape[1], x.shape[2])
    return x.new_empty(shape, dtype=_unshuffle_out_dtype(x, mask_token, pos_embed))


def _unshuffle_bwd_fake(grad_out, ids_restore, num_prefix_tokens, num_visible, compute_dpos):
    batch, num_rows, dim = grad_out.shape
    dx = grad_out.new_empty(batch, num_prefix_tokens + num_visible, dim)
    dtoken_rows = grad_out.new_empty(num_rows, dim, dtype=torch.float32)
    dpos = grad_out.new_empty((num_rows, dim) if compute_dpos else (0,), dtype=torch.float32)
    return dx, dtoken_rows, dpos


UNSHUFFLE_WITH_MASK_TOKEN.implement("torch", _unshuffle_torch_impl, Supports(dtype_of="x"))


def _unshuffle_kernel_impl(forward_op, forward_kernels, backward_op, backward_kernels):
    """A kernel backend's implementation from its forward / backward ops (fake impls and the
    gradient attached here) and the functions they compute.

    forward: (x, ids_restore, mask_token (D,), pos_embed (P + L, D) | None, P) -> out;
    backward: (grad_out, ids_restore, P, num_visible, compute_dpos) -> (dx in grad_out's
    dtype, float32 mask-token gradient rows (R, D), float32 dpos (S * (P + L), D) or (0,)):
    the mask-token gradient is the sum of the rows, dpos the sum of its S blocks of P + L
    rows (S = 1 for triton; the batch chunks of the cuda kernel).
    """

    def setup_context(ctx, inputs, output):
        x, ids_restore, mask_token, pos_embed, num_prefix_tokens = inputs
        ctx.save_for_backward(ids_restore)
        ctx.num_prefix_tokens = num_prefix_tokens
        ctx.num_visible = x.shape[1] - num_prefix_tokens
        ctx.dtypes = (x.dtype, mask_token.dtype, None if pos_embed is None else pos_embed.dtype)

    def backward(ctx, grad_out):
        (ids_restore,) = ctx.saved_tensors
        x_dtype, token_dtype, pos_dtype = ctx.dtypes
        compute_dpos = pos_dtype is not None and ctx.needs_input_grad[3]
        dx, dtoken_rows, dpos = backward_kernels_op(
            grad_out, ids_restore, ctx.num_prefix_tokens, ctx.num_visible, compute_dpos
        )
        dtoken = dtoken_rows.sum(dim=0).to(token_dtype)
        if compute_dpos:
            num_rows, dim = grad_out.shape[1:]
            if dpos.shape[0] != num_rows:
                dpos = dpos.view(-1, num_rows, dim).sum(dim=0)
            dpos = dpos.to(pos_dtype)
        return dx.to(x_dtype), None, dtoken, dpos if compute_dpos else None, None

    torch.library.register_fake(forward_op, _unshuffle_fwd_fake)
    forward = EagerOp(forward_op, forward_kernels, setup_context, backward,
                      grad_inputs=(0, 2, 3))
    backward_kernels_op = EagerOp(backward_op, backward_kernels)

    def implementation(x, ids_restore, mask_token, pos_embed, num_prefix_tokens):
        dim = x.shape[-1]
        pos = None if pos_embed is None else pos_embed.reshape(-1, dim)
        return forward(x, ids_restore, mask_token.reshape(dim), pos, num_prefix_tokens)

    return implementation


if TRITON_IMPORT_ERROR is None:
    from fastvl.kernels import masking as _kernels

    def _unshuffle_forward_kernels(x, ids_restore, mask_token, pos_embed, num_prefix_tokens):
        return _kernels.unshuffle_forward(
            x, ids_restore, mask_token, pos_embed, num_prefix_tokens,
            _unshuffle_out_dtype(x, mask_token, pos_embed),
        )

    @torch.library.triton_op("fastvl::unshuffle_with_mask_token_fwd_triton", mutates_args=())
    def unshuffle_with_mask_token_fwd_triton(
        x: torch.Tensor,
        ids_restore: torch.Tensor,
        mask_token: torch.Tensor,
        pos_embed: Optional[torch.Tensor],
        num_prefix_tokens: int,
    ) -> torch.Tensor:
        """x (B, P + K, D), ids_restore (B, L), mask_token (D,), pos_embed (P + L, D) | None
        -> (B, P + L, D) contiguous, dtype promoted over the inputs."""
        return _unshuffle_forward_kernels(x, ids_restore, mask_token, pos_embed,
                                          num_prefix_tokens)

    @torch.library.triton_op("fastvl::unshuffle_with_mask_token_bwd_triton", mutates_args=())
    def unshuffle_with_mask_token_bwd_triton(
        grad_out: torch.Tensor,
        ids_restore: torch.Tensor,
        num_prefix_tokens: int,
        num_visible: int,
        compute_dpos: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (dx (B, P + K, D) in grad_out's dtype, float32 mask-token gradient per position
        (P + L, D), float32 dpos (P + L, D) or empty (0,) unless ``compute_dpos``)."""
        return _kernels.unshuffle_backward(
            grad_out, ids_restore, num_prefix_tokens, num_visible, compute_dpos
        )

    torch.library.register_fake(unshuffle_with_mask_token_bwd_triton, _unshuffle_bwd_fake)
    UNSHUFFLE_WITH_MASK_TOKEN.implement(
        "triton",
        _unshuffle_kernel_impl(unshuffle_with_mask_token_fwd_triton, _unshuffle_forward_kernels,
                               unshuffle_with_mask_token_bwd_triton, _kernels.unshuffle_backward),
        Supports(dtypes=KERNEL_DTYPES, dtype_of="x"),
    )


# The cuda backward's batch chunks: enough (chunk, position) row groups to fill a GPU when
# P + L is small (about 2**20 elements per pass over the batch), at most one per sample.
_UNSHUFFLE_ELEMENTS_PER_PASS = 1 << 20


def unshuffle_batch_chunks(batch: int, num_rows: int, dim: int) -> int:
    """How many batch chunks the cuda backward of a (batch, num_rows, dim) gradient sums in
    separately (each chunk's samples in order; the caller adds the chunks)."""
    wanted = -(-_UNSHUFFLE_ELEMENTS_PER_PASS // max(num_rows * dim, 1))
    return max(1, min(batch, wanted))


def _unshuffle_cuda_bwd_fake(grad_out, ids_restore, num_prefix_tokens, num_visible,
                             compute_dpos, batch_chunks):
    batch, num_rows, dim = grad_out.shape
    dx = grad_out.new_empty(batch, num_prefix_tokens + num_visible, dim)
    partials = (batch_chunks * num_rows, dim)
    dtoken_rows = grad_out.new_empty(partials, dtype=torch.float32)
    dpos = grad_out.new_empty(partials if compute_dpos else (0,), dtype=torch.float32)
    return dx, dtoken_rows, dpos


if _extension.is_built():
    _cuda_unshuffle_fwd = torch.ops.fastvl.unshuffle_with_mask_token_fwd_cuda.default
    _cuda_unshuffle_bwd = torch.ops.fastvl.unshuffle_with_mask_token_bwd_cuda.default
    torch.library.register_fake(_cuda_unshuffle_bwd, _unshuffle_cuda_bwd_fake)

    def _unshuffle_cuda_backward(grad_out, ids_restore, num_prefix_tokens, num_visible,
                                 compute_dpos):
        chunks = unshuffle_batch_chunks(*grad_out.shape)
        return _cuda_unshuffle_bwd(grad_out, ids_restore, num_prefix_tokens, num_visible,
                                   compute_dpos, chunks)

    UNSHUFFLE_WITH_MASK_TOKEN.implement(
        "cuda",
        _unshuffle_kernel_impl(_cuda_unshuffle_fwd, _cuda_unshuffle_fwd,
                               _unshuffle_cuda_backward, _unshuffle_cuda_backward),
        Supports(dtypes=KERNEL_DTYPES, dtype_of="x"),
    )


def _check_same_device(op: str, name: str, t, x, x_name: str = "x") -> None:
    if t.device != x.device:
        raise ValueError(f"{op}: {x_name} is on {x.device} but {name} is on {t.device}")


def _check_restore_values(ids_restore: torch.Tensor) -> None:
    """Each row of ids_restore must be a permutation of [0, L); checked only where the values
    can be read without a device sync (CPU tensors outside torch.compile)."""
    if ids_restore.numel() == 0 or not host_readable(ids_restore):
        return
    expected = torch.arange(ids_restore.shape[1], device=ids_restore.device)
    if not torch.equal(ids_restore.sort(dim=1).values, expected.expand_as(ids_restore)):
        raise ValueError(
            "unshuffle_with_mask_token: every row of ids_restore must be a permutation of "
            f"[0, L) = [0, {ids_restore.shape[1]}) (as random_masking returns)"
        )


def _validate_unshuffle(x, ids_restore, mask_token, num_prefix_tokens, pos_embed) -> None:
    op = "unshuffle_with_mask_token"
    check_float_tensor(op, "x", x)
    check_tensor(op, "ids_restore", ids_restore)
    check_float_tensor(op, "mask_token", mask_token)
    check_int(op, "num_prefix_tokens", num_prefix_tokens)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, P + K, D), got shape {tuple(x.shape)}")
    batch, num_x_rows, dim = x.shape
    if ids_restore.dtype != torch.int64:
        raise TypeError(f"{op}: ids_restore must be torch.int64, got {ids_restore.dtype}")
    if ids_restore.dim() != 2 or ids_restore.shape[0] != batch:
        raise ValueError(
            f"{op}: ids_restore must be (B, L) with B = {batch}, got shape "
            f"{tuple(ids_restore.shape)}"
        )
    num_patches = ids_restore.shape[1]
    if not 0 <= num_prefix_tokens <= num_x_rows:
        raise ValueError(
            f"{op}: num_prefix_tokens must lie in [0, x.shape[1]] = [0, {num_x_rows}], "
            f"got {num_prefix_tokens}"
        )
    if num_x_rows - num_prefix_tokens > num_patches:
        raise ValueError(
            f"{op}: x holds {num_x_rows - num_prefix_tokens} patch tokens after "
            f"{num_prefix_tokens} prefix tokens, more than the L = {num_patches} of ids_restore"
        )
    if tuple(mask_token.shape) not in ((dim,), (1, 1, dim)):
        raise ValueError(
            f"{op}: mask_token must be (D,) or (1, 1, D) with D = {dim}, got shape "
            f"{tuple(mask_token.shape)}"
        )
    _check_same_device(op, "ids_restore", ids_restore, x)
    _check_same_device(op, "mask_token", mask_token, x)
    if pos_embed is not None:
        check_float_tensor(op, "pos_embed", pos_embed)
        rows = num_prefix_tokens + num_patches
        if tuple(pos_embed.shape) not in ((rows, dim), (1, rows, dim)):
            raise ValueError(
                f"{op}: pos_embed must be (P + L, D) or (1, P + L, D) = (1, {rows}, {dim}), "
                f"got shape {tuple(pos_embed.shape)}"
            )
        _check_same_device(op, "pos_embed", pos_embed, x)


def unshuffle_with_mask_token(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    *,
    num_prefix_tokens: int = 1,
    pos_embed: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """MAE's decoder input: the encoder's tokens back in place, the mask token elsewhere.

    Args:
        x: (B, P + K, D) encoder output: P prefix tokens (class token, registers), then the
            K kept patches in ``ids_keep`` order (as :func:`random_masking` returns them).
        ids_restore: (B, L) int64, each row a permutation of [0, L): patch l is
            ``x[:, P + ids_restore[:, l]]`` if ``ids_restore[:, l] < K``, else masked.
        mask_token: (D,) or (1, 1, D), the learned mask embedding.
        num_prefix_tokens: P, kept in front unchanged (MAE: 1).
        pos_embed: optional (P + L, D) or (1, P + L, D) decoder positions, added to every
            row (MAE's ``x + decoder_pos_embed``).
        backend: "auto", "cuda", "triton" or "torch".

    Returns:
        (B, P + L, D) in the promotion of the inputs' dtypes (contiguous on cuda / triton).
        Differentiable in x (a gather of the gradient at the visible positions), mask_token
        (the gradient summed over the masked rows) and pos_embed (summed over the batch);
        the cuda / triton backwards sum in float32 in a fixed order (deterministic, no
        atomics; cuda sums batch chunks first, :func:`unshuffle_batch_chunks`).

    ids_restore is checked to hold permutations only on CPU outside torch.compile (no host
    sync); on a GPU a row that is not a permutation leaves rows of x's gradient unwritten.
    """
    fn = memoized(
        UNSHUFFLE_WITH_MASK_TOKEN,
        call_key((x, ids_restore, mask_token, pos_embed), num_prefix_tokens, backend),
        lambda: _resolve_unshuffle(x, ids_restore, mask_token, num_prefix_tokens, pos_embed,
                                   backend),
    )
    _check_restore_values(ids_restore)
    return fn(x, ids_restore, mask_token, pos_embed, num_prefix_tokens)


def _resolve_unshuffle(x, ids_restore, mask_token, num_prefix_tokens, pos_embed, backend):
    _validate_unshuffle(x, ids_restore, mask_token, num_prefix_tokens, pos_embed)
    args = (x, ids_restore, mask_token, pos_embed, num_prefix_tokens)
    return UNSHUFFLE_WITH_MASK_TOKEN.select(backend, x.device, *args)


# ---- masked_pixel_loss -------------------------------------------------------------------
# Every implementation is called as fn(pred, imgs, mask, patch_size, norm_pix, eps, eps_style)
# with validated arguments and patch_size a tuple ((ph, pw) or (pt, ph, pw)).


MASKED_PIXEL_LOSS.implement("torch", _reference.masked_pixel_loss, Supports(dtype_of="pred"))


def _row_error_fake(pred, imgs, patch_index, row_weight, patch_size, norm, eps):
    return pred.new_empty(pred.shape[:2], dtype=torch.float32)


def _pixel_loss_bwd_fake(grad_rows, pred, imgs, patch_index, patch_size, norm, eps):
    return pred.new_empty(pred.shape)


if TRITON_IMPORT_ERROR is None:

    @torch.library.triton_op("fastvl::masked_pixel_row_error_triton", mutates_args=())
    def masked_pixel_row_error_triton(
        pred: torch.Tensor,
        imgs: torch.Tensor,
        patch_index: Optional[torch.Tensor],
        row_weight: torch.Tensor,
        patch_size: list[int],
        norm: int,
        eps: float,
    ) -> torch.Tensor:
        """pred (B, R, N), imgs (B, C, [T,] H, W), patch_index (B, R) int64 | None (row r is
        patch r), row_weight (B, R) float32 (rows of weight 0 are skipped), norm 0 / 1 / 2
        (none, mae, videomae) -> float32 (B, R): mean((pred - target) ** 2) per row."""
        return _kernels.pixel_loss_forward(
            pred, imgs, patch_index, row_weight, patch_size, norm, eps
        )

    @torch.library.triton_op("fastvl::masked_pixel_row_error_bwd_triton", mutates_args=())
    def masked_pixel_row_error_bwd_triton(
        grad_rows: torch.Tensor,
        pred: torch.Tensor,
        imgs: torch.Tensor,
        patch_index: Optional[torch.Tensor],
        patch_size: list[int],
        norm: int,
        eps: float,
    ) -> torch.Tensor:
        """grad_rows (B, R) -> dpred (B, R, N) in pred's dtype; zero rows where grad is 0."""
        return _kernels.pixel_loss_backward(
            grad_rows, pred, imgs, patch_index, patch_size, norm, eps
        )

    def _row_error_setup_context(ctx, inputs, output):
        pred, imgs, patch_index, row_weight, patch_size, norm, eps = inputs
        ctx.save_for_backward(pred, imgs, patch_index)
        ctx.patch_size, ctx.norm, ctx.eps = patch_size, norm, eps

    def _row_error_backward(ctx, grad_rows):
        pred, imgs, patch_index = ctx.saved_tensors
        dpred = _row_error_grad(
            grad_rows, pred, imgs, patch_index, ctx.patch_size, ctx.norm, ctx.eps
        )
        return dpred, None, None, None, None, None, None

    torch.library.register_fake(masked_pixel_row_error_triton, _row_error_fake)
    torch.library.register_fake(masked_pixel_row_error_bwd_triton, _pixel_loss_bwd_fake)
    _row_error = EagerOp(masked_pixel_row_error_triton, _kernels.pixel_loss_forward,
                         _row_error_setup_context, _row_error_backward, grad_inputs=(0,))
    _row_error_grad = EagerOp(masked_pixel_row_error_bwd_triton, _kernels.pixel_loss_backward)

    def _loss_triton_impl(pred, imgs, mask, patch_size, norm_pix, eps, eps_style):
        index, weight = _reference.loss_rows(mask, pred.shape[1], torch.float32)
        if index is not None:
            index = index.contiguous()
        row_error = _row_error(
            pred, imgs.detach(), index, weight.contiguous(), list(patch_size),
            EPS_STYLES[eps_style] if norm_pix else 0, float(eps),
        )
        return _reference.weighted_mean(row_error, weight)

    MASKED_PIXEL_LOSS.implement(
        "triton", _loss_triton_impl, Supports(dtypes=KERNEL_DTYPES, dtype_of="pred")
    )


def _normalize_patch_size(op: str, patch_size, imgs: torch.Tensor) -> tuple:
    """int p -> (p, p) for images; a tuple must have one entry per spatial dim of imgs."""
    spatial = imgs.dim() - 2
    layout = "(ph, pw)" if spatial == 2 else "(pt, ph, pw)"
    if is_int(patch_size) and spatial == 2:
        patch_size = (patch_size, patch_size)
    if not (isinstance(patch_size, (tuple, list)) and len(patch_size) == spatial
            and all([is_int(p) for p in patch_size])):
        hint = "an int or " if spatial == 2 else ""
        raise TypeError(
            f"{op}: patch_size must be {hint}a tuple {layout} of ints for imgs of shape "
            f"{tuple(imgs.shape)}, got {patch_size!r}"
        )
    if min(patch_size) < 1:
        raise ValueError(f"{op}: patch_size entries must be >= 1, got {tuple(patch_size)}")
    for size, p in zip(imgs.shape[2:], patch_size):
        if size % p:
            raise ValueError(
                f"{op}: image size {tuple(imgs.shape[2:])} is not divisible by the patch "
                f"size {tuple(patch_size)}"
            )
    return tuple(patch_size)


def _check_mask_rows(mask: torch.Tensor, num_rows: int) -> None:
    """With pred holding only masked rows, every sample must mask exactly num_rows patches;
    checked only where the values can be read without a device sync."""
    if not host_readable(mask):
        return
    counts = (mask != 0).sum(dim=1)
    if counts.numel() and not bool((counts == num_rows).all()):
        raise ValueError(
            f"masked_pixel_loss: pred has {num_rows} rows (only the masked patches), but the "
            f"samples mask {sorted(set(counts.tolist()))} patches; every sample must mask "
            f"exactly {num_rows}"
        )


def _check_imgs_constant(imgs: torch.Tensor) -> None:
    if imgs.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "masked_pixel_loss: imgs requires grad, but the targets are constants (no gradient "
            "flows to imgs); pass imgs.detach()"
        )


def _validate_loss(pred, imgs, mask, patch_size, norm_pix, eps, eps_style) -> tuple:
    """The checks that read no values (the value checks: :func:`_check_mask_rows`); returns
    patch_size as a tuple."""
    op = "masked_pixel_loss"
    check_float_tensor(op, "pred", pred)
    check_float_tensor(op, "imgs", imgs)
    check_tensor(op, "mask", mask)
    if imgs.dim() not in (4, 5):
        raise ValueError(
            f"{op}: imgs must be (B, C, H, W) or (B, C, T, H, W), got shape {tuple(imgs.shape)}"
        )
    _check_imgs_constant(imgs)
    patch_size = _normalize_patch_size(op, patch_size, imgs)
    batch, channels = imgs.shape[:2]
    num_patches = math.prod([s // p for s, p in zip(imgs.shape[2:], patch_size)])
    patch_dim = math.prod(patch_size) * channels
    if mask.dtype.is_complex or not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise TypeError(
            f"{op}: mask must be a float (0/1 or weights) or bool tensor, got {mask.dtype}"
        )
    if tuple(mask.shape) != (batch, num_patches):
        raise ValueError(
            f"{op}: mask must be (B, L) = ({batch}, {num_patches}), got shape {tuple(mask.shape)}"
        )
    if pred.dim() != 3 or pred.shape[0] != batch or pred.shape[2] != patch_dim \
            or pred.shape[1] > num_patches:
        raise ValueError(
            f"{op}: pred must be (B, L, N) = ({batch}, {num_patches}, {patch_dim}) or (B, M, N) "
            f"with M <= L rows for the masked patches only, got shape {tuple(pred.shape)}"
        )
    for name, t in (("imgs", imgs), ("mask", mask)):
        _check_same_device(op, name, t, pred, "pred")
    if not isinstance(norm_pix, bool):
        raise TypeError(f"{op}: norm_pix must be a bool, got {type(norm_pix).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, _NUMBER) or not 0 <= eps < math.inf:
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    if eps_style not in EPS_STYLES:
        raise ValueError(f"{op}: eps_style must be 'mae' or 'videomae', got {eps_style!r}")
    if norm_pix:
        count = patch_dim if eps_style == "mae" else math.prod(patch_size)
        if count < 2:
            raise ValueError(
                f"{op}: norm_pix with eps_style={eps_style!r} needs at least 2 values per "
                f"statistic (unbiased variance), but a patch gives {count}"
            )
    return patch_size


def masked_pixel_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size,
    *,
    norm_pix: bool = True,
    eps: float = 1e-6,
    eps_style: str = "mae",
    backend: str = "auto",
) -> torch.Tensor:
    """MAE's reconstruction loss, targets read straight from the image.

    ``loss = sum_l mask[b, l] * mean_n (pred[b, l, n] - target[b, l, n]) ** 2 / sum mask``:
    the mean squared error over the masked patches only (MAE's definition; with a 0/1 mask
    and equal counts per sample also VideoMAE's ``MSELoss`` on the masked rows).

    Args:
        pred: (B, L, N) predictions for every patch, or (B, M, N) with M < L for the masked
            patches only, in ascending patch order (the decoder head ran on masked rows
            only); then every sample must mask exactly M patches (checked on CPU tensors).
            N = pt * ph * pw * C, each patch flattened **channel last**, (pt, ph, pw, C)
            (see :func:`fastvl.reference.masking.patchify`).
        imgs: (B, C, H, W), or video (B, C, T, H, W) cut into (pt, ph, pw) tubelets, any
            strides. Sizes must be multiples of the patch. A constant: raises if it requires
            grad (pass ``imgs.detach()``).
        mask: (B, L) float (1 = masked; other values weight the rows) or bool, e.g. from
            :func:`random_masking`. Not differentiable.
        patch_size: int p (images: (p, p)), (ph, pw), or (pt, ph, pw) for video.
        norm_pix: normalise each target patch by its own mean and unbiased variance.
        eps, eps_style: eps a finite number >= 0; ``"mae"``: statistics over the whole
            patch, ``(x - mean) / sqrt(var + eps)`` (MAE); ``"videomae"``: statistics per
            channel over the patch's pixels, ``(x - mean) / (sqrt(var) + eps)`` (VideoMAE).
        backend: "auto", "triton" or "torch".

    Returns:
        A 0-dim float32 tensor (float64 for float64 pred), 0 when no patch is masked.
        Differentiable in pred only. Rows of weight 0 do not take part on any backend:
        their pred and image values (NaN included) change neither the loss nor the
        gradient. The triton kernels reduce in float32, skip the rows that do not count and
        write pred's gradient in pred's dtype.
    """
    key = call_key((pred, imgs, mask), patch_size, norm_pix, eps, eps_style, backend)
    patch_size, fn = memoized(
        MASKED_PIXEL_LOSS, key,
        lambda: _resolve_loss(pred, imgs, mask, patch_size, norm_pix, eps, eps_style, backend),
    )
    _check_imgs_constant(imgs)
    if pred.shape[1] != mask.shape[1]:
        _check_mask_rows(mask, pred.shape[1])
    return fn(pred, imgs, mask, patch_size, norm_pix, eps, eps_style)


def _resolve_loss(pred, imgs, mask, patch_size, norm_pix, eps, eps_style, backend):
    """(patch_size as a tuple, the implementation) of a call whose arguments pass the checks
    that read no values (and need not be repeated for the same shapes, dtypes and flags)."""
    patch_size = _validate_loss(pred, imgs, mask, patch_size, norm_pix, eps, eps_style)
    args = (pred, imgs, mask, patch_size, norm_pix, eps, eps_style)
    return patch_size, MASKED_PIXEL_LOSS.select(backend, pred.device, *args)
