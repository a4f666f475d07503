"""FlashAttention-2 style attention in Triton: forward, and backward in three kernels.

Shapes: q (B, H, Nq, D), k/v (B, Hkv, Nk, D), query head h reads kv head h // (H // Hkv).
Any batch/head/token strides are served; the last dim must be contiguous (the launchers copy
otherwise). D is padded to a power of two (>= 16) in registers, with masks.

Packed variable-length batches (``VARLEN``): q (total_q, H, D), k/v (total_k, Hkv, D) and int32
``cu_seqlens_q`` / ``cu_seqlens_k`` (B + 1,). Each program reads the first token and length of
its sequence from them (:func:`_sequence`); the grid covers the longest sequence, and blocks
past the end of a shorter one return at once. Everything below then holds per sequence, with
that sequence's ``Nq`` and ``Nk``. Per-row outputs are token-major: lse (total_q, H), the
key-bias gradient (total_k, H).

Logits are kept in base 2: ``s2 = log2(e) * (scale * q.k + key_bias + mask)``, so softmax uses
``exp2``. ``lse`` (natural log) is stored per query row in float32. The masks (see
:mod:`fastvl.reference.attention` for the exact definition, ``offset = Nk - Nq``):

* hard causal: key j is masked for query i when ``j > i + offset`` (bottom-right aligned),
  unless ``j < prefix_len[b]`` (prefix-LM); key blocks entirely in the future of a query
  block are skipped (forward and dQ), as are query blocks entirely before a key block (dK/dV);
* soft causal (0 < strength < 1): the same future keys get ``log(1 - strength)`` added and
  nothing is skipped.

Forward: per query block, first the key tiles that every row sees whole (in bounds, not in
anyone's future: logits are one multiply-add, ``qk * log2(e) * scale + log2(e) * bias``, the
bias read once per key tile as a vector), then the masked tiles (the causal diagonal and the
tail). On a GPU Triton's autotuner picks its tiles, warps and stages from a per-architecture
list (:func:`forward_configs`); interpreted launches use fixed small blocks.

A query row with no visible key keeps ``m = -inf``; the exponentials are then shifted by 0
(never ``-inf - -inf``), so the row's sum is 0, its output 0, its lse -inf and, in backward,
its probabilities are exactly 0 (the kernels read its lse as +inf).

Backward: ``delta = rowsum(dO * O) - dlse`` (preprocess kernel), then one kernel per key
block (all query heads of the kv group looped inside, so GQA needs no atomics and no extra
memory) for dK, dV and the per-head key-bias gradient ``sum_i dS``, then one kernel per query
block for dQ, each recomputing ``P = exp(S - lse)`` and ``dS = P * (dP - delta)``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastvl._outputs import empty_output
from fastvl.kernels import cdiv, gpu_sizes, launchable

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Interpreted (CPU) launches use small blocks, different for queries and keys, so that the
# tests' small shapes still span several blocks of each kind.
_INTERPRETER_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (int(head_dim) - 1).bit_length())


# Forward configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) that Triton's autotuner
# chooses from on a GPU, per architecture and (float32 inputs, BLOCK_D >= 64). float32 runs
# ieee dots on the CUDA cores, whose operands take far more registers than tensor-core ones:
# smaller tiles. Up to head dim 128 every configuration of both lists compiles without spills
# for both sm_80 and sm_90 (tests/test_triton_gpu_compile.py records and compiles them all).
_SM90_FWD_CONFIGS = {
    (False, 64): [(128, 64, 8, 3), (64, 64, 4, 4)],
    (False, 128): [(128, 64, 8, 3), (64, 128, 8, 2)],
    (False, 256): [(64, 64, 4, 2), (64, 32, 4, 2)],
    (True, 64): [(16, 32, 4, 2), (32, 16, 4, 2)],
    (True, 128): [(16, 16, 4, 1)],
    (True, 256): [(16, 16, 4, 1)],
}
_FWD_CONFIGS = {
    90: _SM90_FWD_CONFIGS,
    # sm_80: the same, except 3 stages for the 64 x 64 tile
    80: {**_SM90_FWD_CONFIGS, (False, 64): [(128, 64, 8, 3), (64, 64, 4, 3)]},
}


def forward_configs(head_dim: int, dtype: torch.dtype, arch=None) -> list:
    """The forward's GPU configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) for
    ``sm_<arch>`` (80, 90; later architectures use sm_90's), or for every architecture (None),
    in a fixed order."""
    key = (dtype == torch.float32, max(64, _block_d(head_dim)))
    if arch is not None:
        return list(_FWD_CONFIGS[90 if arch >= 90 else 80][key])
    return list(dict.fromkeys(c for per_arch in _FWD_CONFIGS.values() for c in per_arch[key]))


_FORCED_FWD_CONFIG = None


@contextlib.contextmanager
def forced_forward_config(config):
    """Test hook: forward launches in the block use ``config`` (one of
    :func:`forward_configs`), on any device, instead of the autotuner's or interpreter's."""
    global _FORCED_FWD_CONFIG
    previous, _FORCED_FWD_CONFIG = _FORCED_FWD_CONFIG, tuple(config)
    try:
        yield
    finally:
        _FORCED_FWD_CONFIG = previous


_TUNED_FWD: dict = {}


def _tuned_forward(head_dim: int, dtype: torch.dtype, device: torch.device):
    """The forward kernel autotuned over :func:`forward_configs` of the device's architecture
    (one autotuner per device, dtype and head dim class, cached), keyed on the constexprs that
    change the work and the sequence-length buckets (and, as Triton does, the pointer dtypes)."""
    key = (device, dtype == torch.float32, max(64, _block_d(head_dim)))
    tuned = _TUNED_FWD.get(key)
    if tuned is None:
        major, minor = torch.cuda.get_device_capability(device)
        configs = [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
            for m, n, w, st in forward_configs(head_dim, dtype, major * 10 + minor)
        ]
        tuned = _TUNED_FWD[key] = triton.autotune(
            configs, key=["BLOCK_D", "CAUSAL", "SOFT", "HAS_BIAS", "q_bucket", "k_bucket"],
        )(_attn_fwd_kernel)
    return tuned


def _seqlen_bucket(n):
    """A sequence length's autotuning bucket: 256-token steps up to 4096 (SymInt-safe)."""
    return min(cdiv(n, 256), 16)


_CONFIGS: dict = {}


def _config(kind: str, head_dim: int, dtype: torch.dtype, device: torch.device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one backward kernel kind (cached per
    kind, head dim, dtype and whether GPU sizes apply)."""
    key = (kind, int(head_dim), dtype, gpu_sizes(device))
    config = _CONFIGS.get(key)
    if config is None:
        config = _CONFIGS[key] = _choose_config(kind, head_dim, dtype, key[-1])
    return config


def _choose_config(kind: str, head_dim: int, dtype: torch.dtype, gpu: bool):
    if not gpu:
        block_m, block_n = _INTERPRETER_BLOCKS[kind]
        return block_m, block_n, 4, 1
    block_d = _block_d(head_dim)
    wide = block_d * (2 if dtype == torch.float32 else 1)  # fp32 tiles need 2x registers/smem
    if kind == "dkdv":
        if wide <= 64:
            return 64, 128, 8, 2
        if wide <= 128:
            return 32, 128, 8, 2
        return 32, 32, 4, 1
    if wide <= 64:  # dq
        return 128, 64, 8, 2
    if wide <= 128:
        return 128, 32, 8, 2
    return 32, 32, 4, 1


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs must not be rounded to tf32 (ieee); Triton ignores it for fp16/bf16.
    return "ieee"


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _token_strides(t: torch.Tensor, packed: bool):
    """(batch, head, token) strides of a (B, H, N, ...) tensor, or of a packed (total, H, ...)
    one (batch stride 0: packed sequences are found by their first token instead)."""
    strides = t.stride()
    if packed:
        return 0, strides[1], strides[0]
    return strides[:3]


def _bias_strides(key_bias, packed: bool):
    """(batch, head, key) strides of key_bias, (B, Nk) / (B, H, Nk) or packed (total_k,) /
    (total_k, H); head stride 0 for a bias shared by the heads."""
    if key_bias is None:
        return 0, 0, 0
    strides = key_bias.stride()
    if packed:
        return 0, strides[1] if len(strides) == 2 else 0, strides[0]
    if len(strides) == 2:
        return strides[0], 0, strides[1]
    return strides


def _mask_params(causal: bool, causal_strength: float, prefix_len):
    """(CAUSAL, SOFT, HAS_PREFIX, future_bias in base 2) of a call."""
    strength = float(causal_strength)
    if not causal or strength <= 0.0:
        return False, False, False, 0.0
    soft = strength < 1.0
    future_bias = math.log1p(-strength) * 1.4426950408889634 if soft else 0.0
    return True, soft, prefix_len is not None, future_bias


@triton.jit
def _key_bias2(bias_row_ptr, offs_n, n_valid, stride_bn, HAS_BIAS: tl.constexpr,
               KEY_AXIS: tl.constexpr):
    """``log2(e) * key_bias`` of keys ``offs_n`` (0 past the end) as a 2D tensor broadcasting
    over the tile whose axis ``KEY_AXIS`` holds the keys: one vector load per key tile. Without
    a bias -0.0, which an add folds away (``x + -0.0 == x``)."""
    if HAS_BIAS:
        kb = tl.load(bias_row_ptr + offs_n * stride_bn, mask=n_valid, other=0.0)
        return tl.expand_dims(kb.to(tl.float32) * LOG2E, 1 - KEY_AXIS)
    else:
        return -0.0


@triton.jit
def _masked_logits(
    s, q_idx, k_idx, num_keys, offset, prefix, future_bias,
    CAUSAL: tl.constexpr, SOFT: tl.constexpr, HAS_PREFIX: tl.constexpr,
):
    """The key-bound and causal masks on base-2 logits ``s`` of one tile; -inf = masked.

    ``q_idx`` / ``k_idx``: the query / key indices as 2D tensors broadcasting to the tile,
    (M, 1) and (1, N) for a query-major tile, (1, M) and (N, 1) for a key-major one.
    """
    if CAUSAL:
        future = k_idx > q_idx + offset
        if HAS_PREFIX:
            future = future & (k_idx >= prefix)
        if SOFT:
            s = tl.where(future, s + future_bias, s)
        else:
            s = tl.where(future, float("-inf"), s)
    return tl.where(k_idx < num_keys, s, float("-inf"))


@triton.jit
def _load_prefix(prefix_ptr, b, num_keys):
    """prefix_len[b] clamped to [0, Nk] (any integer dtype, so int64 values never wrap)."""
    prefix = tl.load(prefix_ptr + b)
    return tl.minimum(tl.maximum(prefix, 0), num_keys).to(tl.int32)


@triton.jit
def _sequence(cu_seqlens_ptr, b, num_tokens, VARLEN: tl.constexpr):
    """(first token, length) of sequence b: from cu_seqlens when VARLEN, else (0, num_tokens)."""
    if VARLEN:
        first = tl.load(cu_seqlens_ptr + b)
        return first, tl.load(cu_seqlens_ptr + b + 1) - first
    else:
        return 0, num_tokens


@triton.jit
def _sequence_offset(b, first, stride_b, stride_n, VARLEN: tl.constexpr):
    """Element offset of sequence b in a tensor: batch b, or packed from token ``first``."""
    if VARLEN:
        return first.to(tl.int64) * stride_n
    else:
        return b * stride_b


@triton.jit
def _rows(offs, bh, h, first, num_heads, num_tokens, VARLEN: tl.constexpr):
    """Flat row of (sequence, head h, token offs) in a contiguous per-row tensor:
    (B, H, N) with ``bh = b * H + h``, or packed token-major (total, H)."""
    if VARLEN:
        return (first + offs).to(tl.int64) * num_heads + h
    else:
        return bh.to(tl.int64) * num_tokens + offs


@triton.jit
def _visible_key_end(start_m, num_keys, offset, prefix, BLOCK_M: tl.constexpr,
                     SKIP: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """Exclusive end of the keys that queries [start_m, start_m + BLOCK_M) may see."""
    if SKIP:
        end = tl.minimum(num_keys, start_m + BLOCK_M + offset)
        if HAS_PREFIX:
            end = tl.maximum(end, tl.minimum(prefix, num_keys))
        return tl.maximum(end, 0)
    else:
        return num_keys


@triton.jit
def _full_key_end(start_m, num_keys, offset, prefix, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """End of the key tiles that every query of [start_m, start_m + BLOCK_M) sees unmasked:
    whole tiles of keys j < Nk with j <= start_m + offset (or j < prefix), a multiple of
    BLOCK_N; the tiles from there on need the masks."""
    end = num_keys
    if CAUSAL:
        end = tl.minimum(end, start_m + offset + 1)
        if HAS_PREFIX:
            end = tl.maximum(end, tl.minimum(prefix, num_keys))
    return tl.maximum(end, 0) // BLOCK_N * BLOCK_N


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, k_base, v_base, bias_row_ptr, start_n_lo, start_n_hi, offs_m,
    num_keys, head_dim, offset, prefix, stride_kn, stride_vn, stride_bn, qk_scale, future_bias,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, SOFT: tl.constexpr, HAS_PREFIX: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) over the key tiles [start_n_lo, start_n_hi).

    Unmasked tiles (``MASKED`` False) hold keys that are in bounds and visible to every query
    row: the logits are one multiply-add, ``qk * log2(e) * scale + log2(e) * bias``. Masked
    tiles (the tail and the causal diagonal) add the bounds check and the masks. The K^T and V
    addresses are computed in the loop from 1D offsets: no address tiles live across it.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    for start_n in range(start_n_lo, start_n_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_valid = offs_n < num_keys
        kt_mask = d_valid[:, None]
        v_mask = d_valid[None, :]
        if MASKED:
            kt_mask = kt_mask & n_valid[None, :]
            v_mask = v_mask & n_valid[:, None]
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=kt_mask,
                     other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=v_mask, other=0.0)
        kb2 = _key_bias2(bias_row_ptr, offs_n, n_valid, stride_bn, HAS_BIAS, 1)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale + kb2
        if MASKED:
            s = _masked_logits(s, offs_m[:, None], offs_n[None, :], num_keys, offset, prefix,
                               future_bias, CAUSAL, SOFT, HAS_PREFIX)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Shift a still fully masked row by 0: exp2(-inf - 0) = 0, never exp2(-inf + inf).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - shift[:, None])
        rescale = tl.math.exp2(m_i - shift)
        l_i = l_i * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["q_bucket", "k_bucket"])
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, prefix_ptr, cu_q_ptr, cu_k_ptr, out_ptr, lse_ptr,
    num_heads, group, num_queries, num_keys, head_dim, q_bucket, k_bucket,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bn,
    qk_scale, future_bias,
    CAUSAL: tl.constexpr, SOFT: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr,
    SKIP: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One query block of one head: the unmasked key tiles first, then the masked ones (the
    causal diagonal and the tail) up to the last visible key (hard causal skips the rest).
    ``q_bucket`` / ``k_bucket``: the autotuner's sequence-length keys, unused here."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # inductor passes Python floats as fp64
    future_bias = tl.cast(future_bias, tl.float32)
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    first_q, num_queries = _sequence(cu_q_ptr, b, num_queries, VARLEN)
    if VARLEN:
        if start_m >= num_queries:
            return
    first_k, num_keys = _sequence(cu_k_ptr, b, num_keys, VARLEN)
    kvh = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    m_valid = offs_m < num_queries

    q_base = q_ptr + _sequence_offset(b, first_q, stride_qb, stride_qm, VARLEN) + h * stride_qh
    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=m_valid[:, None] & d_valid[None, :], other=0.0,
    )
    k_base = k_ptr + _sequence_offset(b, first_k, stride_kb, stride_kn, VARLEN) + kvh * stride_kh
    v_base = v_ptr + _sequence_offset(b, first_k, stride_vb, stride_vn, VARLEN) + kvh * stride_vh
    bias_row_ptr = (bias_ptr + _sequence_offset(b, first_k, stride_bb, stride_bn, VARLEN)
                    + h * stride_bh)
    prefix = 0
    if HAS_PREFIX:
        prefix = _load_prefix(prefix_ptr, b, num_keys)
    offset = num_keys - num_queries
    full_end = _full_key_end(start_m, num_keys, offset, prefix, BLOCK_N, CAUSAL, HAS_PREFIX)
    end_n = _visible_key_end(start_m, num_keys, offset, prefix, BLOCK_M, SKIP, HAS_PREFIX)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, bias_row_ptr, 0, full_end, offs_m,
        num_keys, head_dim, offset, prefix, stride_kn, stride_vn, stride_bn, qk_scale,
        future_bias, False, CAUSAL, SOFT, HAS_PREFIX, HAS_BIAS, BLOCK_N, BLOCK_D, DOT_PRECISION,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, bias_row_ptr, full_end, end_n, offs_m,
        num_keys, head_dim, offset, prefix, stride_kn, stride_vn, stride_bn, qk_scale,
        future_bias, True, CAUSAL, SOFT, HAS_PREFIX, HAS_BIAS, BLOCK_N, BLOCK_D, DOT_PRECISION,
    )

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    row = _rows(offs_m, bh, h, first_q, num_heads, num_queries, VARLEN)
    tl.store(lse_ptr + row, lse, mask=m_valid)
    tl.store(
        out_ptr + row[:, None] * head_dim + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_valid[:, None] & d_valid[None, :],
    )


@triton.jit
def _attn_bwd_delta_kernel(
    out_ptr, dout_ptr, dlse_ptr, cu_q_ptr, delta_ptr,
    num_heads, num_queries, head_dim,
    stride_ob, stride_oh, stride_om,
    stride_db, stride_dh, stride_dm,
    stride_lb, stride_lh, stride_lm,
    HAS_DLSE: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse, float32 and laid out like lse."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    first_q, num_queries = _sequence(cu_q_ptr, b, num_queries, VARLEN)
    if VARLEN:
        if start_m >= num_queries:
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < num_queries
    mask = m_valid[:, None] & (offs_d < head_dim)[None, :]
    o_ptrs = (out_ptr + _sequence_offset(b, first_q, stride_ob, stride_om, VARLEN)
              + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :])
    do_ptrs = (dout_ptr + _sequence_offset(b, first_q, stride_db, stride_dm, VARLEN)
               + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :])
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptrs, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row = _rows(offs_m, bh, h, first_q, num_heads, num_queries, VARLEN)
    if HAS_DLSE:
        dlse_ptrs = (dlse_ptr + _sequence_offset(b, first_q, stride_lb, stride_lm, VARLEN)
                     + h * stride_lh + offs_m * stride_lm)
        delta -= tl.load(dlse_ptrs, mask=m_valid, other=0.0).to(tl.float32)
    tl.store(delta_ptr + row, delta, mask=m_valid)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, prefix_ptr, cu_q_ptr, cu_k_ptr, dout_ptr, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr, dbias_ptr,
    num_heads, num_kv_heads, group, num_queries, num_keys, head_dim,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bn,
    stride_db, stride_dh, stride_dm,
    qk_scale, future_bias, sm_scale,
    CAUSAL: tl.constexpr, SOFT: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr,
    SKIP: tl.constexpr, HAS_DBIAS: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key block of one kv head: dK, dV summed over the group's query heads, dbias per head."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # inductor passes Python floats as fp64
    future_bias = tl.cast(future_bias, tl.float32)
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    b = (bkv // num_kv_heads).to(tl.int64)
    kvh = (bkv % num_kv_heads).to(tl.int64)
    first_k, num_keys = _sequence(cu_k_ptr, b, num_keys, VARLEN)
    if VARLEN:
        if start_n >= num_keys:
            return
    first_q, num_queries = _sequence(cu_q_ptr, b, num_queries, VARLEN)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    n_valid = offs_n < num_keys
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k_base = k_ptr + _sequence_offset(b, first_k, stride_kb, stride_kn, VARLEN) + kvh * stride_kh
    v_base = v_ptr + _sequence_offset(b, first_k, stride_vb, stride_vn, VARLEN) + kvh * stride_vh
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    q_seq_ptr = q_ptr + _sequence_offset(b, first_q, stride_qb, stride_qm, VARLEN)
    do_seq_ptr = dout_ptr + _sequence_offset(b, first_q, stride_db, stride_dm, VARLEN)
    bias_seq_ptr = bias_ptr + _sequence_offset(b, first_k, stride_bb, stride_bn, VARLEN)
    prefix = 0
    if HAS_PREFIX:
        prefix = _load_prefix(prefix_ptr, b, num_keys)
    offset = num_keys - num_queries
    start_m_lo = 0
    if SKIP:
        # Queries before start_n - offset see none of these keys (unless they are a prefix).
        first = tl.maximum(start_n - offset, 0)
        if HAS_PREFIX:
            first = tl.where(start_n < prefix, 0, first)
        start_m_lo = (first // BLOCK_M) * BLOCK_M

    # Key-major tiles (BLOCK_N keys x BLOCK_M queries): S^T = K Q^T, so that dV += P^T dO and
    # dK += dS^T Q are plain products with no transposed register tiles.
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, group):
        h = kvh * group + g
        bh = b * num_heads + h
        q_base = q_seq_ptr + h * stride_qh
        do_base = do_seq_ptr + h * stride_dh
        kb2 = _key_bias2(bias_seq_ptr + h * stride_bh, offs_n, n_valid, stride_bn, HAS_BIAS, 0)
        dbias = tl.zeros([BLOCK_N], tl.float32)
        for start_m in range(start_m_lo, num_queries, BLOCK_M):
            offs_m = start_m + offs_m0
            m_valid = offs_m < num_queries
            qt = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None],
                         mask=m_valid[None, :] & d_valid[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dm + offs_d[None, :],
                         mask=m_valid[:, None] & d_valid[None, :], other=0.0)
            row = _rows(offs_m, bh, h, first_q, num_heads, num_queries, VARLEN)
            # Padded rows and rows without a visible key read lse = +inf, so their P is 0.
            lse = tl.load(lse_ptr + row, mask=m_valid, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
            delta = tl.load(delta_ptr + row, mask=m_valid, other=0.0)
            qkt = tl.dot(k, qt, input_precision=DOT_PRECISION)
            st = _masked_logits(qkt * qk_scale + kb2, offs_m[None, :], offs_n[:, None], num_keys,
                                offset, prefix, future_bias, CAUSAL, SOFT, HAS_PREFIX)
            pt = tl.math.exp2(st - lse2[None, :])
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
            if HAS_DBIAS:
                dbias += tl.sum(dst, 1)
        if HAS_DBIAS:
            dbias_rows = _rows(offs_n, bh, h, first_k, num_heads, num_keys, VARLEN)
            tl.store(dbias_ptr + dbias_rows, dbias, mask=n_valid)

    kv_rows = _rows(offs_n, bkv, kvh, first_k, num_kv_heads, num_keys, VARLEN)
    out_offs = kv_rows[:, None] * head_dim + offs_d[None, :]
    dk *= tl.cast(sm_scale, tl.float32)
    tl.store(dk_ptr + out_offs, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, prefix_ptr, cu_q_ptr, cu_k_ptr, dout_ptr, lse_ptr, delta_ptr,
    dq_ptr,
    num_heads, group, num_queries, num_keys, head_dim,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bn,
    stride_db, stride_dh, stride_dm,
    qk_scale, future_bias, sm_scale,
    CAUSAL: tl.constexpr, SOFT: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr,
    SKIP: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One query block of one head: dQ = scale * sum_j dS K, over the visible key blocks."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # inductor passes Python floats as fp64
    future_bias = tl.cast(future_bias, tl.float32)
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    first_q, num_queries = _sequence(cu_q_ptr, b, num_queries, VARLEN)
    if VARLEN:
        if start_m >= num_queries:
            return
    first_k, num_keys = _sequence(cu_k_ptr, b, num_keys, VARLEN)
    kvh = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    m_valid = offs_m < num_queries
    q_mask = m_valid[:, None] & d_valid[None, :]
    q_ptrs = (q_ptr + _sequence_offset(b, first_q, stride_qb, stride_qm, VARLEN)
              + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :])
    do_ptrs = (dout_ptr + _sequence_offset(b, first_q, stride_db, stride_dm, VARLEN)
               + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :])
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    do = tl.load(do_ptrs, mask=q_mask, other=0.0)
    row = _rows(offs_m, bh, h, first_q, num_heads, num_queries, VARLEN)
    lse = tl.load(lse_ptr + row, mask=m_valid, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(delta_ptr + row, mask=m_valid, other=0.0)

    k_base = k_ptr + _sequence_offset(b, first_k, stride_kb, stride_kn, VARLEN) + kvh * stride_kh
    v_base = v_ptr + _sequence_offset(b, first_k, stride_vb, stride_vn, VARLEN) + kvh * stride_vh
    kt_ptrs = k_base + offs_n0[None, :] * stride_kn + offs_d[:, None]
    vt_ptrs = v_base + offs_n0[None, :] * stride_vn + offs_d[:, None]
    bias_row_ptr = (bias_ptr + _sequence_offset(b, first_k, stride_bb, stride_bn, VARLEN)
                    + h * stride_bh)
    prefix = 0
    if HAS_PREFIX:
        prefix = _load_prefix(prefix_ptr, b, num_keys)
    offset = num_keys - num_queries
    end_n = _visible_key_end(start_m, num_keys, offset, prefix, BLOCK_M, SKIP, HAS_PREFIX)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + offs_n0
        n_valid = offs_n < num_keys
        t_mask = n_valid[None, :] & d_valid[:, None]
        kt = tl.load(kt_ptrs + start_n * stride_kn, mask=t_mask, other=0.0)
        vt = tl.load(vt_ptrs + start_n * stride_vn, mask=t_mask, other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        kb2 = _key_bias2(bias_row_ptr, offs_n, n_valid, stride_bn, HAS_BIAS, 1)
        s = _masked_logits(qk * qk_scale + kb2, offs_m[:, None], offs_n[None, :], num_keys,
                           offset, prefix, future_bias, CAUSAL, SOFT, HAS_PREFIX)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)

    tl.store(dq_ptr + row[:, None] * head_dim + offs_d[None, :],
             (dq * tl.cast(sm_scale, tl.float32)).to(dq_ptr.dtype.element_ty), mask=q_mask)


# ---- launchers ---------------------------------------------------------------------------
# Both launchers serve two layouts. Dense: q (B, H, Nq, D), k/v (B, Hkv, Nk, D), key_bias
# (B, Nk) or (B, H, Nk). Packed (``cu_seqlens_q`` given): q (total_q, H, D), k/v
# (total_k, Hkv, D), int32 ``cu_seqlens_q`` / ``cu_seqlens_k`` (B + 1,) that the caller
# guarantees valid (start at 0, non-decreasing, end at total, lengths <= ``max_seqlen_*``),
# key_bias (total_k,) or (total_k, H). Per-row tensors have shape ``q.shape[:-1]``:
# (B, H, Nq) dense, (total_q, H) packed. ``eager=True``: nothing traces the call, launch the
# kernels directly (see :func:`launchable`).


def _layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """(batch, grid queries, grid keys, cu_seqlens_q, cu_seqlens_k, VARLEN): the dense sizes,
    or the packed maxima; q stands in for the cu_seqlens pointers of a dense call."""
    if cu_seqlens_q is None:
        return q.shape[0], q.shape[2], k.shape[2], q, q, False
    batch = cu_seqlens_q.shape[0] - 1
    return batch, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k, True


def attention_forward(q, k, v, key_bias, prefix_len, scale: float, causal: bool,
                      causal_strength: float, cu_seqlens_q=None, cu_seqlens_k=None,
                      max_seqlen_q: int = 0, max_seqlen_k: int = 0, *, eager: bool = False):
    """-> (out, contiguous in q's shape and dtype; lse float32 of shape q.shape[:-1]).

    Dense or packed layout (see above). ``key_bias``: None or any float dtype and strides.
    ``prefix_len``: None or an integer (B,) tensor (used only with a hard or soft causal mask).
    """
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    batch, num_queries, num_keys, cu_q, cu_k, varlen = _layout(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    shape, dtype, device = q.shape, q.dtype, q.device
    heads, kv_heads, head_dim = shape[1], k.shape[1], shape[-1]
    out = empty_output(shape, dtype=dtype, device=device)
    lse = empty_output(shape[:-1], dtype=torch.float32, device=device)
    if out.numel() == 0:
        if lse.numel():
            lse.fill_(float("-inf"))
        return out, lse
    is_causal, soft, has_prefix, future_bias = _mask_params(causal, causal_strength, prefix_len)
    args = (
        q, k, v,
        key_bias if key_bias is not None else q,
        prefix_len if has_prefix else q,
        cu_q, cu_k, out, lse,
        heads, heads // kv_heads, num_queries, num_keys, head_dim,
        _seqlen_bucket(num_queries), _seqlen_bucket(num_keys),
        *_token_strides(q, varlen), *_token_strides(k, varlen), *_token_strides(v, varlen),
        *_bias_strides(key_bias, varlen),
        scale * 1.4426950408889634, future_bias,
    )
    constants = dict(
        CAUSAL=is_causal, SOFT=soft, HAS_PREFIX=has_prefix, HAS_BIAS=key_bias is not None,
        SKIP=is_causal and not soft, VARLEN=varlen, BLOCK_D=_block_d(head_dim),
        DOT_PRECISION=_dot_precision(dtype),
    )
    if _FORCED_FWD_CONFIG is not None:
        configs = [_FORCED_FWD_CONFIG]
    elif device.type == "cuda":
        launchable(_tuned_forward(head_dim, dtype, device), wrap_triton, eager)[
            lambda meta: (cdiv(num_queries, meta["BLOCK_M"]), batch * heads)
        ](*args, **constants)
        return out, lse
    elif gpu_sizes(device):  # recording what GPUs compile: every configuration they may pick
        configs = forward_configs(head_dim, dtype)
    else:
        configs = [(*_INTERPRETER_BLOCKS["fwd"], 4, 1)]
    for block_m, block_n, warps, stages in configs:
        launchable(_attn_fwd_kernel, wrap_triton, eager)[(cdiv(num_queries, block_m),
                                                          batch * heads)](
            *args, **constants, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=warps, num_stages=stages,
        )
    return out, lse


def attention_backward(grad_out, grad_lse, q, k, v, out, lse, key_bias, prefix_len,
                       scale: float, causal: bool, causal_strength: float, compute_dbias: bool,
                       cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int = 0,
                       max_seqlen_k: int = 0, *, eager: bool = False):
    """-> (dq, dk, dv, dbias): contiguous, in q's dtype; dbias float32 per head and key,
    (B, H, Nk) dense or (total_k, H) packed, or None.

    Dense or packed layout (see above). ``grad_lse`` (lse's shape, any strides, e.g. an
    expanded gradient of ``lse.sum()``), or None, adds the gradient of the returned lse.
    """
    q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    batch, num_queries, num_keys, cu_q, cu_k, varlen = _layout(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[-1]
    device = q.device
    dq = empty_output(q.shape, dtype=q.dtype, device=device)
    dk = empty_output(k.shape, dtype=k.dtype, device=device)
    dv = empty_output(v.shape, dtype=v.dtype, device=device)
    dbias = None
    if compute_dbias:
        dbias_shape = (k.shape[0], heads) if varlen else (batch, heads, num_keys)
        dbias = empty_output(dbias_shape, dtype=torch.float32, device=device)
    if q.numel() == 0 or k.numel() == 0:
        # Nothing to attend to or from: every gradient is zero.
        for t in (dq, dk, dv, dbias):
            if t is not None:
                t.zero_()
        return dq, dk, dv, dbias

    is_causal, soft, has_prefix, future_bias = _mask_params(causal, causal_strength, prefix_len)
    block_d = _block_d(head_dim)
    group = heads // kv_heads
    bias_arg = key_bias if key_bias is not None else q
    prefix_arg = prefix_len if has_prefix else q
    common_strides = (
        *_token_strides(q, varlen), *_token_strides(k, varlen), *_token_strides(v, varlen),
        *_bias_strides(key_bias, varlen), *_token_strides(grad_out, varlen),
    )
    masks = dict(CAUSAL=is_causal, SOFT=soft, HAS_PREFIX=has_prefix,
                 HAS_BIAS=key_bias is not None, SKIP=is_causal and not soft, VARLEN=varlen)
    qk_scale = scale * 1.4426950408889634

    delta = empty_output(lse.shape, dtype=torch.float32, device=device)
    delta_block = max(16, min(128, 8192 // block_d)) if gpu_sizes(device) else 16
    delta_grid = (cdiv(num_queries, delta_block), batch * heads)
    launchable(_attn_bwd_delta_kernel, wrap_triton, eager)[delta_grid](
        out, grad_out, grad_lse if grad_lse is not None else lse, cu_q, delta,
        heads, num_queries, head_dim,
        *_token_strides(out, varlen), *_token_strides(grad_out, varlen),
        *(_token_strides(grad_lse, varlen) if grad_lse is not None else (0, 0, 0)),
        HAS_DLSE=grad_lse is not None, VARLEN=varlen, BLOCK_M=delta_block, BLOCK_D=block_d,
    )

    block_m, block_n, warps, stages = _config("dkdv", head_dim, q.dtype, device)
    dkdv_grid = (cdiv(num_keys, block_n), batch * kv_heads)
    launchable(_attn_bwd_dkdv_kernel, wrap_triton, eager)[dkdv_grid](
        q, k, v, bias_arg, prefix_arg, cu_q, cu_k, grad_out, lse, delta,
        dk, dv, dbias if dbias is not None else dk,
        heads, kv_heads, group, num_queries, num_keys, head_dim,
        *common_strides,
        qk_scale, future_bias, scale,
        **masks, HAS_DBIAS=dbias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )

    block_m, block_n, warps, stages = _config("dq", head_dim, q.dtype, device)
    dq_grid = (cdiv(num_queries, block_m), batch * heads)
    launchable(_attn_bwd_dq_kernel, wrap_triton, eager)[dq_grid](
        q, k, v, bias_arg, prefix_arg, cu_q, cu_k, grad_out, lse, delta, dq,
        heads, group, num_queries, num_keys, head_dim,
        *common_strides,
        qk_scale, future_bias, scale,
        **masks,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv, dbias
