"""The ops' GPU hot paths never synchronise with the host (CUDA-graph safe).

Without a GPU: CPU tensors take the path a GPU would (``gpu_path``: GPU dispatch, Triton
launches skipped) under a detector that raises on every host read of tensor values and every
value-dependent op (:func:`fastvl.testing.no_host_sync`). With a GPU: the same calls under
``torch.cuda.set_sync_debug_mode("error")`` and captured in a CUDA graph.
"""

import pytest
import torch

import fastvl.ops as ops
from fastvl.ops import registry
from fastvl.testing import HostSyncError, no_host_sync, random_tensor

from tests.conftest import DEVICE


def _leaf(*shape, device):
    return random_tensor(*shape, device=device, requires_grad=True)


def _hot_paths(device):
    """name -> a call of one op with its optional value checks off, forward and backward."""
    q, k, v = (_leaf(2, 4, 9, 16, device=device) for _ in range(3))
    kv = _leaf(2, 2, 9, 16, device=device)
    x = _leaf(2, 9, 16, device=device)
    index = torch.randint(0, 9, (2, 4), device=device)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    packed = _leaf(9, 4, 16, device=device)
    imgs = random_tensor(2, 3, 8, 8, device=device)
    weight, bias = _leaf(16, 3, 4, 4, device=device), _leaf(16, device=device)
    ids_keep = torch.tensor([[0, 2], [3, 1]], device=device)
    ids_restore = torch.tensor([[0, 2, 1, 3], [3, 1, 0, 2]], device=device)
    mask = torch.tensor([[0.0, 1, 1, 0], [1, 0, 1, 0]], device=device)
    pred = _leaf(2, 4, 48, device=device)
    lin_w, lora_a, lora_b = (_leaf(*s, device=device) for s in ((8, 16), (4, 16), (8, 4)))
    route = torch.tensor([0, 1, -1, 0] * 4 + [1, 1], device=device)
    stacked_a, stacked_b = _leaf(2, 4, 16, device=device), _leaf(2, 8, 4, device=device)
    x2d = _leaf(18, 16, device=device)

    def grad(out, *inputs):
        out = out[0] if isinstance(out, tuple) else out
        return torch.autograd.grad(out.float().sum(), inputs, allow_unused=True)

    def tome():
        plan = ops.tome_match(x, 2)
        merged, size = ops.tome_merge(plan, x)
        return grad(merged, x)

    return {
        "attention (auto)": lambda: grad(ops.attention(q, kv, kv, causal=True), q, kv),
        "attention (triton, key bias, lse)": lambda: grad(ops.attention(
            q, k, v, key_bias=x[..., 0], return_lse=True, backend="triton"), q, k, v),
        "varlen_attention": lambda: grad(ops.varlen_attention(
            packed, packed, packed, cu, cu, 5, 5, causal=True, backend="triton"), packed),
        "attention_key_mass": lambda: ops.attention_key_mass(
            q, k, torch.zeros(2, 4, 9, device=device), backend="triton"),
        "attention_graph_rank": lambda: ops.attention_graph_rank(
            q, k, torch.zeros(2, 4, 9, device=device), iterations=3, backend="triton"),
        "running_cell_masking": lambda: ops.running_cell_masking(
            2, 4, 2, 2, phase=torch.tensor([0, 3], device=device)),
        "gather_tokens": lambda: grad(ops.gather_tokens(x, index, check_bounds=False), x),
        "tome_match + tome_merge": tome,
        "keep_topk_tokens": lambda: grad(ops.keep_topk_tokens(x, x[:, 1:, 0], 3), x),
        "random_masking": lambda: ops.random_masking(2, 16, 0.75, device=device),
        "masked_patch_embed": lambda: grad(ops.masked_patch_embed(
            imgs, weight, bias, None, ids_keep, 4, check_bounds=False), weight, bias),
        "unshuffle_with_mask_token": lambda: grad(ops.unshuffle_with_mask_token(
            x[:, :3], ids_restore, x[0, 0]), x),
        "masked_pixel_loss": lambda: grad(ops.masked_pixel_loss(pred, imgs, mask, 4), pred),
        "lora_linear": lambda: grad(ops.lora_linear(x2d, lin_w, None, lora_a, lora_b, 2.0),
                                    x2d, lora_a, lora_b),
        "routed_lora_linear": lambda: grad(ops.routed_lora_linear(
            x2d, lin_w, None, stacked_a, stacked_b, 2.0, route, check_route=False),
            x2d, stacked_a, stacked_b),
    }


HOT_PATHS = tuple(_hot_paths("cpu"))


def test_detector_catches_host_reads():
    t = torch.arange(4)
    for read in (lambda: t.sum().item(), t.tolist, lambda: bool(t[1]), t.nonzero,
                 lambda: t[t > 1]):
        with pytest.raises(HostSyncError), no_host_sync():
            read()
    with no_host_sync():
        (t * 2).cumsum(0)  # no read: fine


@pytest.mark.skipif(registry.TRITON_IMPORT_ERROR is not None, reason="needs triton")
@pytest.mark.parametrize("name", HOT_PATHS)
def test_gpu_hot_path_has_no_host_sync(name):
    from fastvl.bench.host_overhead import gpu_path

    call = _hot_paths("cpu")[name]
    with gpu_path(), no_host_sync():
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("name", HOT_PATHS)
def test_cuda_graph_capture_and_no_sync(name):
    call = _hot_paths(DEVICE)[name]
    call()  # warm up: compiles kernels, fills caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        call()
    graph.replay()
    torch.cuda.synchronize()


def test_optional_value_checks_are_the_only_syncs():
    """What the checks cost: with check_bounds on, gather_tokens reads its index once."""
    from fastvl.bench.host_overhead import gpu_path

    x, index = random_tensor(2, 9, 16), torch.randint(0, 9, (2, 4))
    with gpu_path(), pytest.raises(HostSyncError), no_host_sync():
        ops.gather_tokens(x, index)
