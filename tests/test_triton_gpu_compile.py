"""Triton kernels of every family compile for the GPUs they are meant for, checked without one.

Each family's ops run interpreted on the CPU with the launch configurations a GPU would use
(:func:`fastvl.triton_aot.gpu_launch_sizes`); the launches they make are recorded and compiled
with Triton's real compiler and ptxas for sm_80 (A100) and sm_90 (H100 / H200), in float16,
bfloat16 (the fp16 launches retyped: the interpreter runs no bf16 ``tl.dot``) and float32.
The LoRA kernels have the same check in tests/test_lora_ops.py. The values computed here are
not checked (the other tests do that); what is checked is that a GPU compiler accepts them.
"""

from __future__ import annotations

import pytest
import torch

from fastvl.ops import (
    attention,
    attention_key_mass,
    gather_tokens,
    masked_patch_embed,
    masked_pixel_loss,
    pitome_match,
    random_masking,
    tome_match,
    tome_merge,
    tome_unmerge,
    unshuffle_with_mask_token,
    varlen_attention,
)
from fastvl.testing import random_tensor
from tests.conftest import DEVICE, require_backend
from tests.samples_attention import deterministic_algorithms

ARCHS = (80, 90)


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _leaf(*shape, dtype, seed):
    return random_tensor(*shape, dtype=dtype, device=DEVICE, generator=_gen(seed),
                         requires_grad=True)


def _backward(*outputs):
    sum(out.float().sum() for out in outputs).backward()


def _attention_calls(dtype):
    """Forward + backward of the attention ops over the options that change constexprs."""
    from fastvl.kernels.attention_backward import forced_group_split

    for head_dim in (64, 80, 128):
        q = _leaf(1, 4, 40, head_dim, dtype=dtype, seed=1)
        k, v = (_leaf(1, 2, 40, head_dim, dtype=dtype, seed=s) for s in (2, 3))  # GQA
        bias = _leaf(1, 40, dtype=torch.float32, seed=4)
        out, lse = attention(q, k, v, causal=True, key_bias=bias, return_lse=True,
                             backend="triton")
        _backward(out, lse)
        _backward(attention(q, k, v, causal=True, causal_strength=0.5, prefix_len=5,
                            backend="triton"))
        _backward(attention(q, k, v, backend="triton"))
        with forced_group_split(False), deterministic_algorithms(True):  # the other paths
            _backward(attention(q, k, v, causal=True, key_bias=bias, backend="triton"))
    q = _leaf(40, 4, 64, dtype=dtype, seed=5)
    k, v = (_leaf(40, 2, 64, dtype=dtype, seed=s) for s in (6, 7))
    cu = torch.tensor([0, 15, 40], dtype=torch.int32, device=DEVICE)
    _backward(varlen_attention(q, k, v, cu, cu, 25, 25, causal=True, backend="triton"))
    q, k = (_leaf(2, 4, 40, 64, dtype=dtype, seed=s) for s in (8, 9))
    with torch.no_grad():
        _, lse = attention(q, k, k, return_lse=True, backend="triton")
        attention_key_mass(q, k, lse, query_start=39, backend="triton")
        attention_key_mass(q, k, lse, causal=True, head_reduce=None, backend="triton")
        weights = random_tensor(2, 4, 40, device=DEVICE, generator=_gen(5))
        attention_key_mass(q, k, lse, head_reduce="max", query_weights=weights, backend="triton")


def _token_calls(dtype):
    """ToMe, token gathering and the MAE ops, forward + backward."""
    x = _leaf(2, 50, 96, dtype=dtype, seed=10)
    plan = tome_match(x.detach(), 8, backend="triton")
    merged, size = tome_merge(plan, x, backend="triton")
    _backward(tome_unmerge(plan, merged, backend="triton"), size)
    index = torch.randint(0, 50, (2, 20), generator=_gen(11), device=DEVICE)
    _backward(gather_tokens(x, index, backend="triton"))

    ids_keep, ids_restore, mask = random_masking(2, 16, 0.75, generator=_gen(12), device=DEVICE)
    imgs = _leaf(2, 3, 32, 32, dtype=dtype, seed=13)
    weight = _leaf(48, 3, 8, 8, dtype=dtype, seed=14)
    bias, cls = _leaf(48, dtype=dtype, seed=15), _leaf(1, 1, 48, dtype=dtype, seed=16)
    pos = _leaf(1, 17, 48, dtype=dtype, seed=17)
    embedded = masked_patch_embed(imgs, weight, bias, pos, ids_keep, 8, cls_token=cls,
                                  backend="triton")
    token = _leaf(48, dtype=dtype, seed=18)
    decoder_in = unshuffle_with_mask_token(embedded, ids_restore, token, pos_embed=pos,
                                           backend="triton")
    pred = decoder_in[:, 1:, :].reshape(2, 16, 48)[..., :1].expand(2, 16, 192).contiguous()
    _backward(masked_pixel_loss(pred, imgs.detach(), mask, 8, backend="triton"))
    pitome_match(x.detach(), 8, margin=0.5, backend="triton")


@pytest.fixture(scope="module")
def gpu_launches():
    """{family: launches} of interpreted fp16 and fp32 runs with GPU launch sizes, plus
    their bf16 twins."""
    if DEVICE.type != "cpu":
        pytest.skip("checks GPU compilation on machines without one (a GPU runs the kernels)")
    require_backend("attention", "triton")
    from fastvl import kernels, triton_aot
    from fastvl.kernels import attention as attention_kernels
    from fastvl.kernels import (
        attention_backward, attention_key_mass, gather, masking, patch_embed, pitome, tome,
    )

    families = {
        "attention": ((attention_kernels, attention_backward, attention_key_mass),
                      _attention_calls),
        "tokens": ((tome, gather, masking, patch_embed, pitome), _token_calls),
    }
    recorded = {}
    for family, (modules, calls) in families.items():
        with triton_aot.gpu_launch_sizes(), triton_aot.recorded_launches(*modules) as launches:
            for dtype in (torch.float16, torch.float32):
                calls(dtype)
        assert kernels.gpu_sizes(torch.device("cpu")) is False
        recorded[family] = launches + triton_aot.with_pointer_type(launches, "fp16", "bf16")
    return recorded


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", ["attention", "tokens"])
def test_kernels_compile_for_gpus(family, arch, gpu_launches):
    from fastvl import triton_aot

    launches = gpu_launches[family]
    assert len({launch["kernel"] for launch in launches}) >= 5
    assert triton_aot.compile_errors(launches, arch) == []


def test_launches_compile_with_a_real_launchs_specialisation():
    """Recorded launches carry what ``JITFunction.run`` derives from the argument values (ints
    equal to 1 as constants, 16-divisible ints and 16-byte aligned pointers marked "D"), and
    the compiler gets it: the key-mass kernel at its GPU sizes needs fewer registers than
    the same launch compiled without it (sm_90 today: 72 against 114)."""
    if DEVICE.type != "cpu":
        pytest.skip("checks GPU compilation on machines without one")
    require_backend("attention_key_mass", "triton")
    from fastvl import triton_aot
    from fastvl.kernels import attention_key_mass as kernels

    q = random_tensor(2, 4, 40, 64, dtype=torch.float16, generator=_gen(20))
    k = random_tensor(2, 4, 40, 64, dtype=torch.float16, generator=_gen(21))
    lse = random_tensor(2, 4, 40, dtype=torch.float32, generator=_gen(22))
    with triton_aot.gpu_launch_sizes(), triton_aot.recorded_launches(kernels) as launches:
        attention_key_mass(q, k, lse, query_start=39, backend="triton")
        attention_key_mass(q[..., 1:, :], k, lse[..., 1:], query_start=30, backend="triton")
    aligned, offset = launches
    assert aligned["constants"]["group"] == 1 and aligned["signature"]["group"] == "constexpr"
    assert {"q_ptr", "k_ptr", "head_dim", "stride_qm"} <= set(aligned["attrs"])
    assert "num_queries" not in aligned["attrs"]  # 40 is not a multiple of 16
    # q[..., 1:, :] starts 64 fp16 values (128 bytes) in: aligned; lse[..., 1:] 4 bytes in.
    assert "q_ptr" in offset["attrs"] and "lse_ptr" not in offset["attrs"]

    plain = dict(aligned, attrs={}, constants=dict(aligned["constants"]),
                 signature=dict(aligned["signature"]))
    for name in ("group", "stride_lm"):
        del plain["constants"][name]
        plain["signature"][name] = "i32"
    specialised, unspecialised = triton_aot.resource_usage([aligned, plain], 90)
    assert "group=1" in specialised["constants"]
    assert specialised["registers"] < unspecialised["registers"], (specialised, unspecialised)
