"""FlashAttention-2 style attention in Triton: the forward kernel and the shared helpers.

Shapes: q (B, H, Nq, D), k/v (B, Hkv, Nk, D), query head h reads kv head h // (H // Hkv).
Any batch/head/token strides are served; the last dim must be contiguous (the launchers copy
otherwise). D is padded to a power of two (>= 16) in registers, with masks (the forward splits
some head dims instead, see below).

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
list (:func:`forward_configs`); interpreted launches use fixed small blocks. Two layouts of the
forward are chosen from shapes alone (never from values; :func:`forced_forward_layout` forces
them in tests):

* GQA packing (``PACK_GQA``, :func:`_pack_gqa`): when H > Hkv and there are fewer than 64
  queries per head (``Nq``, or ``max_seqlen_q`` for packed sequences: decode, short prompts)
  with a head dim that is a multiple of 16, a head's query block would be mostly padding, so
  one program takes the query rows of a kv head's whole group, token-major (row r = token
  r // group of head kvh * group + r % group; grid (cdiv(Nq * group, BLOCK_M), B * Hkv)), and
  each K/V tile is loaded once for the group.
  Masks and causal tile skipping use each row's token; a block may hold part of a token's
  heads. Dense and packed-sequence calls alike; only with a key bias shared by the heads
  ((B, Nk) / (total_k,)) or none: a per-head bias keeps the per-head layout. Packed launches
  tune over their own list (64-row tiles, :data:`_PACKED_FWD_CONFIGS`).
* Split head dims (``BLOCK_DT``, :func:`_head_dim_tiles`): a head dim that is not a power of two
  runs as a power-of-two main tile (``BLOCK_D``) plus a power-of-two tail (``BLOCK_DT`` >= 16,
  ``tl.dot``'s minimum) for multiples of 16 where that is narrower than the padded power of
  two: 80 = 64 + 16, 96 = 64 + 32, 48 = 32 + 16, 144 = 128 + 16, 160 = 128 + 32,
  192 = 128 + 64 (padded work 128 -> 80, 128 -> 96, 64 -> 48, 256 -> 144 / 160 / 192); q,
  K^T, V and the accumulator are two tiles each, the scores ``dot(q0, k0t) + dot(q1, k1t)``.
  Powers of two (``BLOCK_DT`` 0) compile as before; 112 (64 + 64) keeps the 128-wide tile;
  head dims that are not multiples of 16 stay padded (their padding waste: 40 -> 64 is 37%,
  72 -> 128 44%, 88 -> 128 31%), see :func:`_default_head_dim_tiles`. The configuration
  lists stay keyed by the padded size (sm_80 swaps its 64 x 128 tile for 64 x 64 at 96).

A query row with no visible key keeps ``m = -inf``; the exponentials are then shifted by 0
(never ``-inf - -inf``), so the row's sum is 0, its output 0, its lse -inf and, in backward,
its probabilities are exactly 0 (the kernels read its lse as +inf).

The backward is in :mod:`fastvl.kernels.attention_backward`; the key-mass pass in
:mod:`fastvl.kernels.attention_key_mass`. Both use the helpers below (logits, masks, layouts).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastvl._outputs import empty_output
from fastvl.kernels import cdiv, gpu_arch, gpu_sizes, launchable

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Interpreted (CPU) launches use small blocks, different for queries and keys, so that the
# tests' small shapes still span several blocks of each kind (the backward's are in
# :mod:`fastvl.kernels.attention_backward`).
_INTERPRETER_FWD_BLOCKS = (32, 16)


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


# Packed GQA launches (``PACK_GQA``: few queries per head, see :func:`_pack_gqa`): the rows'
# token / head indices stay live across the key loop, so the 128-row and 64 x 128 tiles spill;
# 64 rows (wgmma's minimum) with at most 64 keys do not, on sm_80 and sm_90 alike (nor do the
# float32 tiles, with one stage: two spill at head dim 48 on sm_90).
_PACKED_FWD_CONFIGS = {
    (False, 64): [(64, 64, 4, 3), (64, 32, 4, 2)],
    (False, 128): [(64, 64, 8, 2), (64, 32, 4, 2)],
    (False, 256): [(64, 32, 4, 2)],
    (True, 64): [(16, 32, 4, 1), (32, 16, 4, 1)],
    (True, 128): [(16, 16, 4, 1)],
    (True, 256): [(16, 16, 4, 1)],
}
# sm_80 with a split head dim of tail 32 (96): the 64 x 128 tile spills; 64 x 64 instead.
_SM80_TAIL32_SWAP = {(64, 128, 8, 2): (64, 64, 8, 2)}


def forward_configs(head_dim: int, dtype: torch.dtype, arch=None, pack_gqa: bool = False) -> list:
    """The forward's GPU configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) for
    ``sm_<arch>`` (80, 90; later architectures use sm_90's), or for every architecture (None),
    in a fixed order; ``pack_gqa``: those of packed GQA launches (the same on every arch)."""
    fp32 = dtype == torch.float32
    key = (fp32, max(64, _block_d(head_dim)))
    if pack_gqa:
        return list(_PACKED_FWD_CONFIGS[key])

    def per_arch(major):
        configs = _FWD_CONFIGS[major][key]
        if major == 80 and not fp32 and _default_head_dim_tiles(head_dim)[1] == 32:
            configs = [_SM80_TAIL32_SWAP.get(c, c) for c in configs]
        return configs

    if arch is not None:
        return list(per_arch(90 if arch >= 90 else 80))
    return list(dict.fromkeys(c for major in _FWD_CONFIGS for c in per_arch(major)))


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


_FORCED_PACK_GQA = None
_FORCED_HEAD_SPLIT = None
_FORCED_TMA = None


@contextlib.contextmanager
def forced_forward_layout(*, pack_gqa=None, split_head_dim=None, tma=None):
    """Test hook: forward launches in the block pack the GQA groups (:func:`_pack_gqa`), split
    the head dim (:func:`_head_dim_tiles`) and load K / V through TMA descriptors
    (:func:`_use_tma`) as told (True / False) instead of by the shape rules; None keeps a
    rule. Where a layout cannot apply it is not used: packing with a per-head key bias,
    splitting a power-of-two head dim, descriptors of misaligned rows."""
    global _FORCED_PACK_GQA, _FORCED_HEAD_SPLIT, _FORCED_TMA
    previous = _FORCED_PACK_GQA, _FORCED_HEAD_SPLIT, _FORCED_TMA
    _FORCED_PACK_GQA, _FORCED_HEAD_SPLIT, _FORCED_TMA = pack_gqa, split_head_dim, tma
    try:
        yield
    finally:
        _FORCED_PACK_GQA, _FORCED_HEAD_SPLIT, _FORCED_TMA = previous


def _tma_aligned(t: torch.Tensor) -> bool:
    """Whether every row a descriptor may start at is 16-byte aligned: the data pointer and
    every stride but the last (contiguous) one (their gcd, in elements of 1, 2 or 4 bytes)."""
    unaligned = 16 // t.element_size() - 1
    return t.data_ptr() % 16 == 0 and not math.gcd(*t.stride()[:-1]) & unaligned


def _use_tma(k, v, device: torch.device) -> bool:
    """Whether the forward loads K / V tiles through TMA tensor descriptors: on sm_90 and later
    (or recording for it), with an installed Triton that has device-side descriptors, plain
    tensors (not traced: under torch.compile the pointer path runs) and 16-byte aligned rows.
    The pointer path serves everything else (sm_80, odd strides)."""
    if _FORCED_TMA is not None:
        wanted = _FORCED_TMA
    else:
        wanted = gpu_sizes(device) and gpu_arch(device) >= 90
    return (wanted and _HAS_TENSOR_DESCRIPTORS and type(k) is torch.Tensor
            and type(v) is torch.Tensor and _tma_aligned(k) and _tma_aligned(v))


_HAS_TENSOR_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")


def _ensure_descriptor_allocator() -> None:
    """Device-side descriptors live in a global scratch buffer that Triton allocates through
    ``triton.set_allocator`` (per thread context): install a torch allocator unless one is set."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(
            lambda size, alignment, stream: torch.empty(size, device="cuda", dtype=torch.int8))


# Fewer queries per head than this: pack the GQA group's heads into one query block.
_PACK_GQA_MAX_QUERIES = 64


def _pack_gqa(heads: int, kv_heads: int, num_queries, head_dim: int, key_bias,
              packed: bool) -> bool:
    """Whether the forward packs each GQA group's query heads into one query block (grid
    B * Hkv): when H > Hkv, fewer than 64 queries per head (``Nq``, or ``max_seqlen_q`` for
    packed sequences), a head dim that is a multiple of 16 (else the gathered rows' loads
    are not vectorised and spill badly) and the key bias is absent or shared by the heads
    (head stride 0). :func:`forced_forward_layout` overrides all but the last condition."""
    if _bias_strides(key_bias, packed)[1] != 0:
        return False
    if _FORCED_PACK_GQA is not None:
        return bool(_FORCED_PACK_GQA)
    return (heads > kv_heads and num_queries < _PACK_GQA_MAX_QUERIES
            and int(head_dim) % 16 == 0)


def _default_head_dim_tiles(head_dim: int, split=None) -> tuple:
    """(BLOCK_D, BLOCK_DT): the head dim's main tile and its tail tile (0: none). A multiple of
    16 that is not a power of two is split into its largest power of two and the rest's next
    power of two when that is narrower than the single padded tile: 48 = 32 + 16,
    80 = 64 + 16, 96 = 64 + 32, 144 = 128 + 16, 160 = 128 + 32, 192 = 128 + 64, 176 -> 128 + 64;
    not 112 (64 + 64 = 128). Other head dims keep the padded tile (40 -> 64, 72 / 88 -> 128):
    their rows are not 16-element aligned, so the loads are not vectorised and a split tail
    (88 -> 64 + 32) spills on sm_80. ``split`` True / False: split any non-power of two
    above 16 (tail >= 16) / none."""
    padded = _block_d(head_dim)
    main = max(16, 1 << (int(head_dim).bit_length() - 1))
    if head_dim <= main:
        return padded, 0
    tail = _block_d(head_dim - main)
    if split is None:
        split = head_dim % 16 == 0 and main + tail < padded
    return (main, tail) if split else (padded, 0)


def _head_dim_tiles(head_dim: int) -> tuple:
    """:func:`_default_head_dim_tiles`, or as :func:`forced_forward_layout` says."""
    return _default_head_dim_tiles(head_dim, _FORCED_HEAD_SPLIT)


_TUNED_FWD: dict = {}


def _tuned_forward(head_dim: int, dtype: torch.dtype, device: torch.device, pack_gqa: bool):
    """The forward kernel autotuned over :func:`forward_configs` of the device's architecture
    (one autotuner per device and configuration list; looked up per device, dtype class, head
    dim and layout), keyed on the constexprs that change the work and the sequence-length
    buckets (and, as Triton does, the pointer dtypes)."""
    key = (device, dtype == torch.float32, int(head_dim), pack_gqa)
    tuned = _TUNED_FWD.get(key)
    if tuned is None:
        configs = tuple(forward_configs(head_dim, dtype, gpu_arch(device), pack_gqa))
        tuned = _TUNED_FWD.get((device, configs))
        if tuned is None:  # one autotuner per configuration list
            tuned = _TUNED_FWD[(device, configs)] = triton.autotune(
                [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                 for m, n, w, st in configs],
                key=["BLOCK_D", "BLOCK_DT", "PACK_GQA", "TMA", "CAUSAL", "SOFT", "HAS_BIAS",
                     "q_bucket", "k_bucket"],
            )(_attn_fwd_kernel)
        _TUNED_FWD[key] = tuned
    return tuned


def _seqlen_bucket(n):
    """A sequence length's autotuning bucket: 256-token steps up to 4096 (SymInt-safe)."""
    return min(cdiv(n, 256), 16)


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
def _group_rows(offs, g, bh, h, first, num_heads, num_tokens, VARLEN: tl.constexpr):
    """:func:`_rows` of packed GQA rows: tokens ``offs`` of heads ``h + g`` (``bh = b * H + h``
    and ``h`` scalars, ``g`` per row), as a 64-bit scalar base plus 32-bit row offsets."""
    if VARLEN:
        return (first.to(tl.int64) * num_heads + h) + (offs * num_heads + g)
    else:
        return bh.to(tl.int64) * num_tokens + (g * num_tokens + offs)


@triton.jit
def _head_mask(offs_d, head_dim, WHOLE: tl.constexpr):
    """``offs_d < head_dim``, or a constant all-true mask (folded away) when the tile lies
    wholly inside the head dim (``WHOLE``: the main tile of a split head dim)."""
    if WHOLE:
        return tl.full(offs_d.shape, 1, tl.int1)
    else:
        return offs_d < head_dim


@triton.jit
def _rows_descriptor(base, num_rows, head_dim, stride_row, BLOCK_ROWS: tl.constexpr,
                     BLOCK_COLS: tl.constexpr):
    """A TMA tensor descriptor of the (num_rows, head_dim) rows at ``base`` (row stride
    ``stride_row``, contiguous columns), loading (BLOCK_ROWS, BLOCK_COLS) tiles."""
    return tl.make_tensor_descriptor(base, shape=[num_rows, head_dim], strides=[stride_row, 1],
                                     block_shape=[BLOCK_ROWS, BLOCK_COLS])


@triton.jit
def _fwd_tiles(
    acc, acc1, l_i, m_i, q, q1, k_base, v_base, k1_desc, v1_desc, bias_row_ptr, start_n_lo,
    start_n_hi, offs_m,
    num_keys, head_dim, offset, prefix, stride_kn, stride_vn, stride_bn, qk_scale, future_bias,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, SOFT: tl.constexpr, HAS_PREFIX: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of (acc, acc1, l_i, m_i) over the key tiles [start_n_lo, start_n_hi).

    Unmasked tiles (``MASKED`` False) hold keys that are in bounds and visible to every query
    row: the logits are one multiply-add, ``qk * log2(e) * scale + log2(e) * bias``. Masked
    tiles (the tail and the causal diagonal) add the bounds check and the masks. The K^T and V
    addresses are computed in the loop from 1D offsets: no address tiles live across it.
    ``offs_m``: the query (token) index of each row. With a head-dim tail (``BLOCK_DT`` > 0)
    head dims [BLOCK_D, BLOCK_D + BLOCK_DT) live in (q1, acc1) and their own K^T / V tiles;
    else q1 / acc1 are unused placeholders. ``TMA``: k_base / v_base (and k1_desc / v1_desc
    for the tail) are tensor descriptors of the (Nk, D) K / V rows, whose loads fill the
    out-of-bounds keys and head dims with zeros: no masks, no address arithmetic.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = _head_mask(offs_d, head_dim, BLOCK_DT > 0)
    for start_n in range(start_n_lo, start_n_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_valid = offs_n < num_keys
        kt_mask = d_valid[:, None]
        v_mask = d_valid[None, :]
        if MASKED:
            kt_mask = kt_mask & n_valid[None, :]
            v_mask = v_mask & n_valid[:, None]
        if TMA:
            kt = tl.trans(k_base.load([start_n, 0]))
            v = v_base.load([start_n, 0])
        else:
            kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=kt_mask,
                         other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=v_mask,
                        other=0.0)
        kb2 = _key_bias2(bias_row_ptr, offs_n, n_valid, stride_bn, HAS_BIAS, 1)
        if BLOCK_DT > 0:
            offs_dt = BLOCK_D + tl.arange(0, BLOCK_DT)
            dt_valid = offs_dt < head_dim
            kt1_mask = dt_valid[:, None]
            v1_mask = dt_valid[None, :]
            if MASKED:
                kt1_mask = kt1_mask & n_valid[None, :]
                v1_mask = v1_mask & n_valid[:, None]
            if TMA:
                kt1 = tl.trans(k1_desc.load([start_n, BLOCK_D]))
                v1 = v1_desc.load([start_n, BLOCK_D])
            else:
                kt1 = tl.load(k_base + offs_n[None, :] * stride_kn + offs_dt[:, None],
                              mask=kt1_mask, other=0.0)
                v1 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dt[None, :],
                             mask=v1_mask, other=0.0)
            qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
            qk = tl.dot(q1, kt1, qk, input_precision=DOT_PRECISION)
            s = qk * qk_scale + kb2
        else:
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
        p = p.to(v.dtype)
        acc = acc * rescale[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        if BLOCK_DT > 0:
            acc1 = acc1 * rescale[:, None] + tl.dot(p, v1, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, acc1, l_i, m_i


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
    SKIP: tl.constexpr, VARLEN: tl.constexpr, PACK_GQA: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One query block of one head (or, ``PACK_GQA``, of one kv head's whole query-head group:
    row r is token r // group of head kvh * group + r % group): the unmasked key tiles first,
    then the masked ones (the causal diagonal and the tail) up to the last visible key (hard
    causal skips the rest). ``q_bucket`` / ``k_bucket``: the autotuner's sequence-length keys,
    unused here."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # inductor passes Python floats as fp64
    future_bias = tl.cast(future_bias, tl.float32)
    start_r = tl.program_id(0) * BLOCK_M
    if PACK_GQA:
        kv_heads = num_heads // group
        b = (tl.program_id(1) // kv_heads).to(tl.int64)
        kvh = (tl.program_id(1) % kv_heads).to(tl.int64)
        h = kvh * group  # the group's first head; row r: head h + g[r], token offs_m[r]
        bh = b * num_heads + h
        packed = start_r + tl.arange(0, BLOCK_M)
        offs_m = packed // group
        g = packed - offs_m * group
        tok_lo = start_r // group
        tok_hi = (start_r + BLOCK_M - 1) // group + 1
    else:
        bh = tl.program_id(1)
        b = (bh // num_heads).to(tl.int64)
        h = (bh % num_heads).to(tl.int64)
        kvh = h // group
        offs_m = start_r + tl.arange(0, BLOCK_M)
        g = 0
        tok_lo = start_r
        tok_hi = start_r + BLOCK_M
    first_q, num_queries = _sequence(cu_q_ptr, b, num_queries, VARLEN)
    if VARLEN:
        if tok_lo >= num_queries:
            return
    first_k, num_keys = _sequence(cu_k_ptr, b, num_keys, VARLEN)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = _head_mask(offs_d, head_dim, BLOCK_DT > 0)
    m_valid = offs_m < num_queries

    q_rows = (q_ptr + _sequence_offset(b, first_q, stride_qb, stride_qm, VARLEN)
              + h * stride_qh + (g * stride_qh + offs_m * stride_qm))
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=m_valid[:, None] & d_valid[None, :],
                other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if BLOCK_DT > 0:
        offs_dt = BLOCK_D + tl.arange(0, BLOCK_DT)
        dt_valid = offs_dt < head_dim
        q1 = tl.load(q_rows[:, None] + offs_dt[None, :],
                     mask=m_valid[:, None] & dt_valid[None, :], other=0.0)
        acc1 = tl.zeros([BLOCK_M, BLOCK_DT], tl.float32)
    else:
        q1 = tl.zeros([1, 1], tl.float32)  # placeholders, unused
        acc1 = tl.zeros([1, 1], tl.float32)
    k_base = k_ptr + _sequence_offset(b, first_k, stride_kb, stride_kn, VARLEN) + kvh * stride_kh
    v_base = v_ptr + _sequence_offset(b, first_k, stride_vb, stride_vn, VARLEN) + kvh * stride_vh
    k1_desc = k_base  # the tail's K / V sources (TMA: descriptors with the tail's block)
    v1_desc = v_base
    if TMA:
        k_base = _rows_descriptor(k_base, num_keys, head_dim, stride_kn, BLOCK_N, BLOCK_D)
        v_base = _rows_descriptor(v_base, num_keys, head_dim, stride_vn, BLOCK_N, BLOCK_D)
        if BLOCK_DT > 0:
            k1_desc = _rows_descriptor(k1_desc, num_keys, head_dim, stride_kn, BLOCK_N, BLOCK_DT)
            v1_desc = _rows_descriptor(v1_desc, num_keys, head_dim, stride_vn, BLOCK_N, BLOCK_DT)
    bias_row_ptr = bias_ptr + _sequence_offset(b, first_k, stride_bb, stride_bn, VARLEN)
    bias_row_ptr += h * stride_bh  # packed: only a bias shared by the heads (stride_bh 0)
    prefix = 0
    if HAS_PREFIX:
        prefix = _load_prefix(prefix_ptr, b, num_keys)
    offset = num_keys - num_queries
    # Keys seen whole by every token of [tok_lo, tok_hi), and the end of those any one sees.
    full_end = _full_key_end(tok_lo, num_keys, offset, prefix, BLOCK_N, CAUSAL, HAS_PREFIX)
    end_n = _visible_key_end(tok_hi - BLOCK_M, num_keys, offset, prefix, BLOCK_M, SKIP,
                             HAS_PREFIX)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc, acc1, l_i, m_i = _fwd_tiles(
        acc, acc1, l_i, m_i, q, q1, k_base, v_base, k1_desc, v1_desc, bias_row_ptr, 0, full_end,
        offs_m,
        num_keys, head_dim, offset, prefix, stride_kn, stride_vn, stride_bn, qk_scale,
        future_bias, False, CAUSAL, SOFT, HAS_PREFIX, HAS_BIAS, BLOCK_N, BLOCK_D, BLOCK_DT,
        TMA, DOT_PRECISION,
    )
    acc, acc1, l_i, m_i = _fwd_tiles(
        acc, acc1, l_i, m_i, q, q1, k_base, v_base, k1_desc, v1_desc, bias_row_ptr, full_end,
        end_n, offs_m,
        num_keys, head_dim, offset, prefix, stride_kn, stride_vn, stride_bn, qk_scale,
        future_bias, True, CAUSAL, SOFT, HAS_PREFIX, HAS_BIAS, BLOCK_N, BLOCK_D, BLOCK_DT,
        TMA, DOT_PRECISION,
    )

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    if PACK_GQA:
        row = _group_rows(offs_m, g, bh, h, first_q, num_heads, num_queries, VARLEN)
    else:
        row = _rows(offs_m, bh, h, first_q, num_heads, num_queries, VARLEN)
    tl.store(lse_ptr + row, lse, mask=m_valid)
    out_rows = out_ptr + row * head_dim
    tl.store(
        out_rows[:, None] + offs_d[None, :],
        (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
        mask=m_valid[:, None] & d_valid[None, :],
    )
    if BLOCK_DT > 0:
        tl.store(
            out_rows[:, None] + offs_dt[None, :],
            (acc1 / l_safe[:, None]).to(out_ptr.dtype.element_ty),
            mask=m_valid[:, None] & dt_valid[None, :],
        )


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
    group = heads // kv_heads
    pack = _pack_gqa(heads, kv_heads, num_queries, head_dim, key_bias, varlen)
    # Grid: (query blocks, sequences x heads), or (packed row blocks, sequences x kv heads).
    grid_rows, grid_heads = (num_queries * group, kv_heads) if pack else (num_queries, heads)
    block_d, block_dt = _head_dim_tiles(head_dim)
    args = (
        q, k, v,
        key_bias if key_bias is not None else q,
        prefix_len if has_prefix else q,
        cu_q, cu_k, out, lse,
        heads, group, num_queries, num_keys, head_dim,
        _seqlen_bucket(num_queries), _seqlen_bucket(num_keys),
        *_token_strides(q, varlen), *_token_strides(k, varlen), *_token_strides(v, varlen),
        *_bias_strides(key_bias, varlen),
        scale * 1.4426950408889634, future_bias,
    )
    constants = dict(
        CAUSAL=is_causal, SOFT=soft, HAS_PREFIX=has_prefix, HAS_BIAS=key_bias is not None,
        SKIP=is_causal and not soft, VARLEN=varlen, PACK_GQA=pack, TMA=_use_tma(k, v, device),
        BLOCK_D=block_d, BLOCK_DT=block_dt, DOT_PRECISION=_dot_precision(dtype),
    )
    if constants["TMA"] and device.type == "cuda":
        _ensure_descriptor_allocator()
    if _FORCED_FWD_CONFIG is not None:
        configs = [_FORCED_FWD_CONFIG]
    elif device.type == "cuda":
        launchable(_tuned_forward(head_dim, dtype, device, pack), wrap_triton, eager)[
            lambda meta: (cdiv(grid_rows, meta["BLOCK_M"]), batch * grid_heads)
        ](*args, **constants)
        return out, lse
    elif gpu_sizes(device):  # recording what a GPU compiles: every configuration it may pick
        configs = forward_configs(head_dim, dtype, gpu_arch(device), pack)
    else:
        configs = [(*_INTERPRETER_FWD_BLOCKS, 4, 1)]
    for block_m, block_n, warps, stages in configs:
        launchable(_attn_fwd_kernel, wrap_triton, eager)[(cdiv(grid_rows, block_m),
                                                          batch * grid_heads)](
            *args, **constants, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=warps, num_stages=stages,
        )
    return out, lse
