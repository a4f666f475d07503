"""attention cases: ViT encoders, ToMe key bias, LLaMA prefill, peak throughput; key mass.

Every implementation runs on the same q, k, v (B, H, N, D) (peers with a (B, N, H, D) layout
get contiguous copies of the same values, made outside the timed region):

* ``fastvl[<backend>]``: :func:`fastvl.ops.attention` on each backend that can serve the call;
* ``sdpa``: ``F.scaled_dot_product_attention`` as PyTorch dispatches it (the baseline), and
  ``sdpa[flash|efficient|cudnn|math]`` forced to one backend with ``sdpa_kernel``; a backend
  that cannot serve the call is listed as not run with PyTorch's reason;
* ``flex_attention``: ``torch.compile``\\ d once per case, outside the timed region (score_mod
  for the key bias, a block mask for causal);
* ``xformers`` (``memory_efficient_attention``) and ``flash_attn`` (``flash_attn_func``) when
  installed, skipped with the reason otherwise.

Before timing, the runner checks every result against the baseline's with the per-dtype
tolerances of :data:`TOLERANCES`. forward+backward returns the gradients of
``sum(out * grad_out)`` w.r.t. q, k, v for a random ``grad_out``.

FLOPs follow flash-attn's benchmarks: forward ``4 * B * H * D * pairs`` (``pairs`` = query-key
pairs computed: ``N^2``, ``N (N + 1) / 2`` causal), backward 2.5x forward.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastvl.ops
from fastvl.bench.cases import (
    BACKWARD,
    FASTVL_IMPLS,
    FORWARD,
    Built,
    Scale,
    fastvl_impls,
    register_case,
    requires_module,
    with_backward,
)
from fastvl.ops import attention

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
BASELINE = "sdpa"
IMPLS = (
    *FASTVL_IMPLS,
    BASELINE,
    *(f"sdpa[{name}]" for name in SDPA_BACKENDS),
    "flex_attention",
    "xformers",
    "flash_attn",
)
# (rtol, atol) of the check against the baseline: two correct implementations in the same
# dtype differ by a few roundings of values of size ~1 (fp32 allows a TF32 peer on GPUs).
TOLERANCES = {
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 4e-2),
    torch.float32: (1e-3, 1e-3),
    torch.float64: (1e-7, 1e-7),
}
FLEX_CPU_QUICK_REASON = (
    "torch.compile of FlexAttention for the CPU builds C++ for every shape (seconds to tens "
    "of seconds per case): not part of the --quick smoke test on CPU (runs at CPU scale)"
)
BACKWARD_FLOP_FACTOR = 2.5  # backward FLOPs / forward FLOPs (5 matmuls vs 2)


@dataclass(frozen=True)
class Workload:
    """The shape of one attention case at full (GPU) scale."""

    batch: int
    heads: int
    kv_heads: int
    tokens: int
    head_dim: int
    causal: bool = False
    key_bias: bool = False

    def scaled(self, scale: Scale) -> "Workload":
        """Batch through ``scale.batch``; kv heads, GQA group size (at least 2 if it was),
        tokens and head dim (at least 8) through ``scale.size``."""
        group = self.heads // self.kv_heads
        group = scale.size(group, minimum=min(group, 2))
        kv_heads = scale.size(self.kv_heads)
        return Workload(
            scale.batch(self.batch), kv_heads * group, kv_heads, scale.size(self.tokens),
            scale.size(self.head_dim, minimum=8), self.causal, self.key_bias,
        )

    def describe(self) -> str:
        kv = f", Hkv {self.kv_heads}" if self.kv_heads != self.heads else ""
        return f"B {self.batch}, H {self.heads}{kv}, N {self.tokens}, D {self.head_dim}"


def visible_pairs(
    num_queries: int, num_keys: int, causal: bool, rows: Optional[range] = None
) -> int:
    """Query-key pairs of query ``rows`` (default: all) that a (bottom-right) causal mask
    leaves visible: query i sees keys ``j <= i + Nk - Nq``."""
    rows = range(num_queries) if rows is None else rows
    if not causal:
        return len(rows) * num_keys
    offset = num_keys - num_queries
    return sum(max(0, min(num_keys, i + offset + 1)) for i in rows)


def attention_flops(batch, heads, num_queries, num_keys, head_dim, causal, mode) -> float:
    """FLOPs of one attention call (flash-attn's count; causal counts visible pairs only)."""
    pairs = visible_pairs(num_queries, num_keys, causal)
    forward = 4.0 * batch * heads * head_dim * pairs
    return forward * (1.0 + BACKWARD_FLOP_FACTOR) if mode == BACKWARD else forward


def _reason_from(exc: BaseException, caught: list) -> str:
    """A one-line reason from an exception and the warnings raised before it."""
    lines = [str(w.message).strip() for w in caught if str(w.message).strip()]
    message = str(exc).strip().splitlines()
    lines.append(f"{type(exc).__name__}: {message[0] if message else ''}")
    return " ".join(dict.fromkeys(lines))[:400]


def _add_if_runs(built: Built, name: str, fn: Callable[[], Any], prefix: str = "") -> None:
    """Call ``fn`` once (the warm-up: compiles, picks kernels); add it if it runs, else
    record why not. Each peer decides by itself whether it can serve the call."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except Exception as exc:  # the peer's own "cannot do this" (or a failure), reported
            built.skip(name, prefix + _reason_from(exc, caught))
            return
    built.add(name, fn)


def _sdpa_forced(backend: SDPBackend, call: Callable[[], Any]) -> Callable[[], Any]:
    def run():
        with sdpa_kernel(backend):
            return call()

    return run


def _compile_flex():
    """A freshly compiled ``flex_attention``. Dynamo's caches are reset first so every case
    compiles its own graph instead of piling up recompilations (and their guard checks) on
    one function; the previous case's compiled FlexAttention is dropped."""
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    return torch.compile(flex_attention, dynamic=False)


def _bnhd_peer(forward, q, k, v, backward, grad_out):
    """Run ``forward(q, k, v)`` of a (B, N, H, D) layout library on contiguous copies of q, k,
    v; returns a callable whose results are in the (B, H, N, D) layout of the others."""
    copies = [t.detach().transpose(1, 2).contiguous().requires_grad_(backward) for t in (q, k, v)]

    def run_forward():
        return forward(*copies).transpose(1, 2)

    if not backward:
        return run_forward
    grads = with_backward(run_forward, copies, grad_out)
    return lambda: tuple(g.transpose(1, 2) for g in grads())


def _build_attention(device, dtype, scale: Scale, mode: str, full: Workload) -> Built:
    shape = full.scaled(scale)
    B, H, Hkv, N, D = shape.batch, shape.heads, shape.kv_heads, shape.tokens, shape.head_dim
    gqa = H != Hkv
    backward = mode == BACKWARD
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=generator, device=device, dtype=dtype)

    q = randn(B, H, N, D).requires_grad_(backward)
    k = randn(B, Hkv, N, D).requires_grad_(backward)
    v = randn(B, Hkv, N, D).requires_grad_(backward)
    grad_out = randn(B, H, N, D)
    key_bias = None
    if full.key_bias:  # ToMe proportional attention: log of the merged token sizes
        sizes = torch.randint(1, 9, (B, N), generator=generator, device=device)
        key_bias = sizes.to(dtype).log()

    element = q.element_size()
    moved = element * (2 * q.numel() + k.numel() + v.numel())  # read q, k, v; write out
    if key_bias is not None:
        moved += key_bias.numel() * element
    if backward:  # read q, k, v, out, grad_out (+ lse); write dq, dk, dv
        moved += element * (4 * q.numel() + 2 * (k.numel() + v.numel())) + 4 * B * H * N
    rtol, atol = TOLERANCES[dtype]
    shapes = {"q": [B, H, N, D], "k": [B, Hkv, N, D], "v": [B, Hkv, N, D]}
    if key_bias is not None:
        shapes["key_bias"] = [B, N]
    built = Built(
        shapes=shapes,
        bytes=moved,
        flops=attention_flops(B, H, N, N, D, full.causal, mode),
        rtol=rtol,
        atol=atol,
    )

    def finish(forward):
        return with_backward(forward, (q, k, v), grad_out) if backward else forward

    # fastvl: the arguments as ATTENTION's implementations receive them (see fastvl.ops.attention)
    op_args = (q, k, v, key_bias, None, 1.0 / math.sqrt(D), full.causal, 1.0, False, None, 0.0)
    fastvl_impls(
        built, "attention", device, op_args,
        lambda backend: finish(lambda: attention(
            q, k, v, causal=full.causal, key_bias=key_bias, backend=backend
        )),
    )

    # torch SDPA: the key bias as a float mask (B, 1, 1, N) expanded over heads and queries
    mask = None if key_bias is None else key_bias[:, None, None, :].expand(B, H, N, N)
    sdpa_kwargs = {"attn_mask": mask, "is_causal": full.causal}
    if gqa:
        sdpa_kwargs["enable_gqa"] = True

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)

    built.add(BASELINE, finish(sdpa))
    for name, backend in SDPA_BACKENDS.items():
        _add_if_runs(
            built, f"sdpa[{name}]", finish(_sdpa_forced(backend, sdpa)),
            prefix=f"SDPA's {name} backend cannot serve this call: ",
        )

    if device.type == "cpu" and scale.name == "quick":
        built.skip("flex_attention", FLEX_CPU_QUICK_REASON)
    else:
        _add_flex(built, finish, q, k, v, key_bias, full.causal, gqa)
    _add_xformers(built, q, k, v, mask, full.causal, backward, grad_out)
    _add_flash_attn(built, q, k, v, key_bias, full.causal, backward, grad_out)
    return built


def _add_flex(built, finish, q, k, v, key_bias, causal, gqa) -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    N = q.shape[2]
    flex = _compile_flex()
    kwargs: dict[str, Any] = {"enable_gqa": gqa}
    if key_bias is not None:
        def add_key_bias(score, b, h, q_idx, kv_idx):
            return score + key_bias[b, kv_idx]

        kwargs["score_mod"] = add_key_bias
    if causal:
        def causal_mask(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        kwargs["block_mask"] = create_block_mask(causal_mask, None, None, N, N, device=q.device)
    _add_if_runs(built, "flex_attention", finish(lambda: flex(q, k, v, **kwargs)))
    built.traffic_unknown["flex_attention"] = (
        "compiled by torch.compile, whose kernels the traffic counter does not see")


def _add_xformers(built, q, k, v, mask, causal, backward, grad_out) -> None:
    missing = requires_module("xformers.ops")
    if missing:
        built.skip("xformers", missing)
        return
    import xformers.ops as xops

    B, H, N, D = q.shape
    Hkv = k.shape[1]
    attn_bias = xops.LowerTriangularMask() if causal else mask  # top-left = bottom-right here

    def forward(qt, kt, vt):  # (B, N, H, D); GQA through xformers' (B, N, G, H/G, D) layout
        if Hkv == H:
            return xops.memory_efficient_attention(qt, kt, vt, attn_bias=attn_bias)
        group = H // Hkv
        q5 = qt.view(B, N, Hkv, group, D)
        k5, v5 = (t[:, :, :, None].expand(B, N, Hkv, group, D) for t in (kt, vt))
        out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=attn_bias)
        return out.reshape(B, N, H, D)

    _add_if_runs(built, "xformers", _bnhd_peer(forward, q, k, v, backward, grad_out))


def _add_flash_attn(built, q, k, v, key_bias, causal, backward, grad_out) -> None:
    missing = requires_module("flash_attn")
    if missing:
        built.skip("flash_attn", missing)
        return
    if key_bias is not None:
        built.skip("flash_attn", "flash_attn_func has no additive attention bias")
        return
    from flash_attn import flash_attn_func

    def forward(qt, kt, vt):  # (B, N, H, D), GQA native
        return flash_attn_func(qt, kt, vt, causal=causal)

    _add_if_runs(built, "flash_attn", _bnhd_peer(forward, q, k, v, backward, grad_out))


def _attention_case(name: str, description: str, workload: Workload, dtypes=None) -> None:
    @register_case(
        op="attention",
        name=name,
        description=f"{description} ({workload.describe()}; batch / 8 on CPU).",
        impls=IMPLS,
        baseline=BASELINE,
        dtypes=dtypes,
    )
    def build(device, dtype, scale, mode):
        return _build_attention(device, dtype, scale, mode, workload)


def _gpu_bf16_only(device: torch.device) -> tuple[torch.dtype, ...]:
    return (torch.bfloat16,) if device.type == "cuda" else ()


_attention_case("vit-b16", "ViT-B/16 at 224 px self-attention", Workload(64, 12, 12, 197, 64))
_attention_case(
    "vit-l14-336", "ViT-L/14 at 336 px self-attention", Workload(32, 16, 16, 577, 64)
)
_attention_case(
    "vit-h14", "ViT-H/14 at 224 px self-attention, head dim 80", Workload(32, 16, 16, 257, 80)
)
_attention_case(
    "vit-b16-tome-bias",
    "ViT-B/16 with ToMe proportional attention: key_bias = log(token size); SDPA gets it as a "
    "float mask (B, 1, 1, N) expanded to (B, H, N, N), FlexAttention as a score_mod",
    Workload(64, 12, 12, 197, 64, key_bias=True),
)
_attention_case(
    "llama-prefill",
    "LLaMA-style prefill: causal, GQA 32 query / 8 kv heads (SDPA with enable_gqa=True)",
    Workload(2, 32, 8, 2048, 128, causal=True),
)
_attention_case(
    "dense-n4096-d128",
    "Dense attention at N 4096, D 128 in bfloat16: the peak-throughput target (GPU only)",
    Workload(4, 16, 16, 4096, 128),
    dtypes=_gpu_bf16_only,
)


# --------------------------------------------------------------------------- key mass
# attention_key_mass(q, k, lse, ...) -> (B, Nk): the attention each key receives from a range
# of queries, mean over heads, recomputed from the lse of the attention call. The PyTorch
# baseline is what pruning code writes without it: materialise softmax(q k^T) of the
# selected query rows (matmul in the input dtype, softmax in float32 as autocast runs it)
# and sum. The lse comes from fastvl's attention and the causal mask rows are precomputed,
# both outside the timed region (a model has them from its attention call / mask cache).

KEY_MASS_BASELINE = "torch softmax"
KEY_MASS_IMPLS = (*FASTVL_IMPLS, KEY_MASS_BASELINE)


def _build_key_mass(device, dtype, scale: Scale, mode: str, full: Workload, first_query: int):
    shape = full.scaled(scale)
    B, H, Hkv, N, D = shape.batch, shape.heads, shape.kv_heads, shape.tokens, shape.head_dim
    start = min(N - 1, scale.size(first_query, minimum=0))
    rows = range(start, N)
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(B, heads, N, D, generator=generator, device=device, dtype=dtype)
        for heads in (H, Hkv, Hkv)
    )
    causal = full.causal
    _, lse = attention(q, k, v, causal=causal, return_lse=True)
    softmax_scale = 1.0 / math.sqrt(D)

    element = q.element_size()
    rtol, atol = TOLERANCES[dtype]
    built = Built(
        shapes={"q": [B, H, N, D], "k": [B, Hkv, N, D], "lse": [B, H, N],
                "queries": [start, N], "out": [B, N]},
        # read the selected q rows, k and their lse; write the float32 (B, Nk) mass
        bytes=element * (B * H * len(rows) * D + k.numel()) + 4 * (B * H * len(rows) + B * N),
        flops=2.0 * B * H * D * visible_pairs(N, N, causal, rows),  # q k^T of the rows
        rtol=rtol,
        atol=atol,
    )
    op_args = (q, k, lse, None, None, softmax_scale, causal, 1.0, start, N, "mean")
    fastvl_impls(
        built, "attention_key_mass", device, op_args,
        lambda backend: lambda: fastvl.ops.attention_key_mass(
            q, k, lse, causal=causal, query_start=start, backend=backend
        ),
    )

    q_rows = q[:, :, start:]
    k_heads = k.repeat_interleave(H // Hkv, dim=1) if H != Hkv else k
    mask = None
    if causal:
        future = torch.arange(N, device=device) > torch.arange(start, N, device=device)[:, None]
        mask = torch.zeros(len(rows), N, device=device).masked_fill_(future, -math.inf)

    def materialised_softmax():
        scores = (q_rows @ k_heads.transpose(-1, -2)).float() * softmax_scale
        if mask is not None:
            scores = scores + mask
        return scores.softmax(dim=-1).sum(dim=2).mean(dim=1)

    built.add(KEY_MASS_BASELINE, materialised_softmax)
    return built


def _key_mass_case(name: str, description: str, workload: Workload, first_query: int) -> None:
    @register_case(
        op="attention_key_mass",
        name=name,
        description=(
            f"{description} ({workload.describe()}, queries {first_query}..{workload.tokens}; "
            "batch / 8 on CPU). The PyTorch baseline gets k with its kv heads already "
            "expanded (repeat_interleave, outside the timed call, as the model's attention "
            "has it)."
        ),
        impls=KEY_MASS_IMPLS,
        baseline=KEY_MASS_BASELINE,
        modes=(FORWARD,),
    )
    def build(device, dtype, scale, mode):
        return _build_key_mass(device, dtype, scale, mode, workload, first_query)


if hasattr(fastvl.ops, "attention_key_mass"):  # registered once that op exists
    _key_mass_case(
        "vit-b16-all-queries",
        "ViT-B/16 token importance (VisionZip / ToMe-style pruning): mass each token receives "
        "from all queries, mean over heads",
        Workload(256, 12, 12, 197, 64),
        first_query=0,
    )
    _key_mass_case(
        "llava-prefill-fastv",
        "LLaVA-style prefill with 576 image tokens at 35..611 (FastV): mass each key receives "
        "from the text queries after the image, causal, GQA 32 / 8 heads",
        Workload(2, 32, 8, 2048, 128, causal=True),
        first_query=611,
    )
