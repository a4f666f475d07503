"""keep_topk_tokens, topk_token_index and topk_candidate_index against fastvl.reference.pruning.

Which tokens are kept, and in which order, must match the reference exactly, ties included;
gathered tokens are copies, so they must be exact too. The fused (EViT) token is a weighted
sum: its error against float64 is at most 2x (forward) / 3x (gradients) the error of the
same math done by PyTorch in the low-precision dtype, plus a small absolute floor. Outputs
are poisoned first. On a CPU machine the triton gather runs in the interpreter (small
shapes, fp16/fp32); bf16, large shapes and CUDA graphs are `gpu` tests.
"""

from __future__ import annotations

import pytest
import torch

from fastvl import reference
from fastvl.ops import (
    BackendNotSupportedError,
    keep_topk_tokens,
    similarity_prune_scores,
    topk_candidate_index,
    topk_token_index,
)
from fastvl.testing import (
    ERROR_FLOOR,
    assert_within_reference_error,
    poison_outputs,
    random_index,
    random_tensor,
)
from tests.conftest import DEVICE, require_backend

ALL_BACKENDS = ("torch", "triton", "cuda")
CPU_DTYPES = (torch.float32, torch.float16)
GPU_DTYPES = CPU_DTYPES + (torch.bfloat16,)
DTYPES = GPU_DTYPES if DEVICE.type == "cuda" else CPU_DTYPES


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _scores(batch, num_scored, *, ties, generator, dtype=torch.float32):
    """Distinct normal scores, or small integers so that most rows have many ties."""
    if ties:
        values = torch.randint(0, 4, (batch, num_scored), generator=generator, device=DEVICE)
        return values.to(dtype)
    return random_tensor(batch, num_scored, dtype=dtype, device=DEVICE, generator=generator)


# ---- selection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_tokens, num_prefix", [(1, 1), (7, 0), (7, 1), (197, 1), (197, 5), (577, 1)]
)
@pytest.mark.parametrize("ties", [False, True])
def test_topk_token_index_matches_reference(num_tokens, num_prefix, ties):
    num_scored = num_tokens - num_prefix
    scores = _scores(3, num_scored, ties=ties, generator=_gen(num_tokens))
    for keep in sorted({0, 1 if num_scored else 0, num_scored // 3, num_scored}):
        index = topk_token_index(scores, keep, num_prefix_tokens=num_prefix)
        expected = reference.topk_token_index(scores, keep, num_prefix_tokens=num_prefix)
        assert index.dtype == torch.int64 and index.shape == (3, num_prefix + keep)
        assert torch.equal(index, expected), f"keep={keep}"


def test_ties_go_to_the_earlier_token_and_nan_ranks_first():
    scores = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0, 5.0]], device=DEVICE)
    for keep, expected in [
        (2, [[0, 2, 4], [0, 1, 2]]),
        (3, [[0, 2, 3, 4], [0, 1, 2, 3]]),
    ]:
        expected = torch.tensor(expected, device=DEVICE)
        assert torch.equal(topk_token_index(scores, keep), expected)
        assert torch.equal(reference.topk_token_index(scores, keep), expected)
    with_nan = torch.tensor([[1.0, float("nan"), 2.0]], device=DEVICE)
    assert topk_token_index(with_nan, 1, num_prefix_tokens=0).tolist() == [[1]]


def test_fused_token_is_the_score_weighted_sum_of_the_dropped_tokens():
    x = torch.arange(10.0, device=DEVICE).view(1, 5, 2)  # token t = (2t, 2t + 1)
    scores = torch.tensor([[0.5, 0.2, 0.9, 0.3]], device=DEVICE)  # tokens 1..4
    for impl in (keep_topk_tokens, reference.keep_topk_tokens):
        x_kept, index = impl(x, scores, 2, fuse_rest=True)
        assert index.tolist() == [[0, 1, 3]]
        fused = 0.2 * x[0, 2] + 0.3 * x[0, 4]
        expected = torch.stack([x[0, 0], x[0, 1], x[0, 3], fused]).unsqueeze(0)
        torch.testing.assert_close(x_kept, expected)


# ---- forward and backward on every backend -----------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fuse_rest", [False, True])
def test_forward_matches_reference(backend, dtype, fuse_rest):
    require_backend("gather_tokens", backend)
    g = _gen(1)
    batch, num_tokens, channels, num_prefix, keep = 2, 37, 24, 1, 13
    x = random_tensor(batch, num_tokens, channels, dtype=dtype, device=DEVICE, generator=g)
    scores = _scores(batch, num_tokens - num_prefix, ties=False, generator=g, dtype=dtype)
    with poison_outputs():
        x_kept, index = keep_topk_tokens(
            x, scores, keep, num_prefix_tokens=num_prefix, fuse_rest=fuse_rest, backend=backend
        )
    expected, expected_index = reference.keep_topk_tokens(
        x.double(), scores.double(), keep, num_prefix_tokens=num_prefix, fuse_rest=fuse_rest
    )
    assert torch.equal(index, expected_index)
    assert x_kept.dtype == dtype and x_kept.shape == expected.shape
    kept = num_prefix + keep
    torch.testing.assert_close(x_kept[:, :kept].double(), expected[:, :kept], rtol=0, atol=0)
    if fuse_rest:
        low_precision, _ = reference.keep_topk_tokens(
            x, scores, keep, num_prefix_tokens=num_prefix, fuse_rest=True
        )
        assert_within_reference_error(
            x_kept[:, kept:], expected[:, kept:], low_precision[:, kept:],
            factor=2, atol=ERROR_FLOOR[dtype], name="fused token",
        )


def _grads(fn, x, scores, grad_out):
    x = x.detach().requires_grad_(True)
    scores = scores.detach().requires_grad_(True)
    x_kept, _ = fn(x, scores)
    grad_x, grad_scores = torch.autograd.grad(x_kept, (x, scores), grad_out, allow_unused=True)
    return grad_x, grad_scores


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fuse_rest", [False, True])
def test_backward_matches_reference(backend, dtype, fuse_rest):
    require_backend("gather_tokens", backend)
    g = _gen(2)
    batch, num_tokens, channels, num_prefix, keep = 2, 29, 20, 2, 9
    x = random_tensor(batch, num_tokens, channels, dtype=dtype, device=DEVICE, generator=g)
    scores = _scores(batch, num_tokens - num_prefix, ties=False, generator=g, dtype=dtype)
    out_tokens = num_prefix + keep + int(fuse_rest)
    grad_out = random_tensor(batch, out_tokens, channels, dtype=dtype, device=DEVICE, generator=g)
    options = dict(num_prefix_tokens=num_prefix, fuse_rest=fuse_rest)

    grad_x, grad_scores = _grads(
        lambda a, s: keep_topk_tokens(a, s, keep, backend=backend, **options),
        x, scores, grad_out,
    )
    reference_grads = [
        _grads(lambda a, s: reference.keep_topk_tokens(a, s, keep, **options), *inputs)
        for inputs in ((x.double(), scores.double(), grad_out.double()), (x, scores, grad_out))
    ]
    (expected_x, expected_scores), (low_x, low_scores) = reference_grads
    assert grad_x.dtype == dtype
    assert_within_reference_error(grad_x, expected_x, low_x, factor=3, atol=ERROR_FLOOR[dtype],
                                  name="grad x")
    if fuse_rest:
        assert_within_reference_error(grad_scores, expected_scores, low_scores, factor=3,
                                      atol=ERROR_FLOOR[dtype], name="grad scores")
        kept_columns = topk_token_index(scores, keep, num_prefix_tokens=num_prefix)[:, num_prefix:]
        assert torch.count_nonzero(grad_scores.gather(1, kept_columns - num_prefix)) == 0
    else:
        assert grad_scores is None  # the selection itself carries no gradient


@pytest.mark.parametrize("fuse_rest", [False, True])
def test_gradcheck_float64(fuse_rest):
    g = _gen(3)
    x = random_tensor(2, 9, 3, dtype=torch.float64, device=DEVICE, generator=g,
                      requires_grad=True)
    scores = random_tensor(2, 8, dtype=torch.float64, device=DEVICE, generator=g,
                           requires_grad=fuse_rest)

    def fn(tokens, token_scores):
        return keep_topk_tokens(tokens, token_scores, 3, fuse_rest=fuse_rest, backend="torch")[0]

    assert torch.autograd.gradcheck(fn, (x, scores))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "batch, num_tokens, num_prefix, keep",
    [(2, 6, 1, 0), (2, 6, 1, 5), (2, 3, 3, 0), (0, 6, 1, 2), (2, 6, 0, 6)],
)
def test_edge_counts(backend, batch, num_tokens, num_prefix, keep):
    """Nothing kept, nothing dropped (fused token 0), no scored token, empty batch."""
    require_backend("gather_tokens", backend)
    g = _gen(4)
    x = random_tensor(batch, num_tokens, 5, device=DEVICE, generator=g, requires_grad=True)
    scores = random_tensor(batch, num_tokens - num_prefix, device=DEVICE, generator=g,
                           requires_grad=True)
    with poison_outputs():
        x_kept, index = keep_topk_tokens(x, scores, keep, num_prefix_tokens=num_prefix,
                                         fuse_rest=True, backend=backend)
    expected, expected_index = reference.keep_topk_tokens(
        x, scores, keep, num_prefix_tokens=num_prefix, fuse_rest=True
    )
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(x_kept, expected)
    x_kept.sum().backward()
    expected_grads = torch.autograd.grad(expected.sum(), (x, scores))
    torch.testing.assert_close(x.grad, expected_grads[0])
    torch.testing.assert_close(scores.grad, expected_grads[1])


def test_mixed_dtypes_keep_the_dtype_of_x():
    g = _gen(5)
    x = random_tensor(2, 11, 8, dtype=torch.float16, device=DEVICE, generator=g)
    scores = random_tensor(2, 10, device=DEVICE, generator=g)  # float32
    x_kept, _ = keep_topk_tokens(x, scores, 4, fuse_rest=True)
    expected, _ = reference.keep_topk_tokens(x.double(), scores.double(), 4, fuse_rest=True)
    assert x_kept.dtype == torch.float16
    torch.testing.assert_close(x_kept.double(), expected, rtol=2e-3, atol=2e-3)


# ---- candidates (FastV) ------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_candidate_index_matches_reference(shared, ties):
    g = _gen(6 + 2 * shared + ties)
    batch, num_tokens, num_candidates = 3, 40, 17
    scores = _scores(batch, num_tokens, ties=ties, generator=g)
    # Unsorted, different positions per row (or one shared row).
    candidates = random_index(1 if shared else batch, num_candidates, num_tokens,
                              device=DEVICE, generator=g)
    if shared:
        candidates = candidates[0]
    for keep in (0, 5, num_candidates):
        index = topk_candidate_index(scores, candidates, keep)
        expected = reference.topk_candidate_index(scores, candidates, keep)
        assert index.shape == (batch, num_tokens - num_candidates + keep)
        assert torch.equal(index, expected), f"keep={keep}"


def test_candidate_ties_follow_the_candidate_order():
    scores = torch.tensor([[9.0, 1.0, 2.0, 9.0, 2.0, 0.0]], device=DEVICE)
    candidates = torch.tensor([[4, 1, 2, 5]], device=DEVICE)  # scores 2, 1, 2, 0
    for impl in (topk_candidate_index, reference.topk_candidate_index):
        assert impl(scores, candidates, 1).tolist() == [[0, 3, 4]]
        assert impl(scores, candidates, 2).tolist() == [[0, 2, 3, 4]]


# ---- torch.compile -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiles_without_graph_breaks(backend):
    require_backend("gather_tokens", backend)
    torch._dynamo.reset()
    if DEVICE.type == "cuda":
        compiler = "inductor"
    else:
        compiler = "aot_eager" if backend == "torch" else "eager"
    g = _gen(8)
    x = random_tensor(2, 13, 8, device=DEVICE, generator=g, requires_grad=True)
    scores = random_tensor(2, 12, device=DEVICE, generator=g, requires_grad=True)
    candidates = torch.tensor([3, 5, 6, 9], device=DEVICE)

    def fn(tokens, token_scores):
        x_kept, index = keep_topk_tokens(tokens, token_scores, 5, fuse_rest=True,
                                         backend=backend)
        full_scores = torch.nn.functional.pad(token_scores, (1, 0))
        return x_kept * 2, index, topk_candidate_index(full_scores, candidates, 2)

    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    out, index, candidate_index = compiled(x, scores)
    expected, expected_index = reference.keep_topk_tokens(x, scores, 5, fuse_rest=True)
    assert torch.equal(index, expected_index)
    expected_candidates = reference.topk_candidate_index(
        torch.nn.functional.pad(scores, (1, 0)), candidates, 2
    )
    assert torch.equal(candidate_index, expected_candidates)
    torch.testing.assert_close(out, expected * 2)
    out.sum().backward()
    expected_grads = torch.autograd.grad((expected * 2).sum(), (x, scores))
    torch.testing.assert_close(x.grad, expected_grads[0])
    torch.testing.assert_close(scores.grad, expected_grads[1])


# ---- bad input -------------------------------------------------------------------------


def _pruning_inputs():
    return random_tensor(2, 5, 3), random_tensor(2, 4)


@pytest.mark.parametrize(
    "make_args, kwargs, error, match",
    [
        (lambda x, s: (x, s, -1), {}, ValueError,
         r"keep must lie in \[0, N - num_prefix_tokens\] = \[0, 4\], got -1"),
        (lambda x, s: (x, s, 5), {}, ValueError, r"keep must lie in .* = \[0, 4\], got 5"),
        (lambda x, s: (x, s, 2.0), {}, TypeError, r"keep must be an int \(a token count\)"),
        (lambda x, s: (x, s, True), {}, TypeError, r"keep must be an int"),
        (lambda x, s: (x, s, torch.tensor(2)), {}, TypeError, r"keep must be an int"),
        (lambda x, s: (x, torch.cat([s, s[:, :1]], 1), 2), {}, ValueError,
         r"scores must be \(B, N - num_prefix_tokens\) = \(2, 4\).*got shape \(2, 5\)"),
        (lambda x, s: (x, s[:1], 2), {}, ValueError, r"got shape \(1, 4\)"),
        (lambda x, s: (x, s[0], 2), {}, ValueError, r"scores must be 2-D"),
        (lambda x, s: (x, s.long(), 2), {}, TypeError, r"scores must be a floating-point"),
        (lambda x, s: (x, s.tolist(), 2), {}, TypeError, r"scores must be a torch.Tensor"),
        (lambda x, s: (x[0], s, 2), {}, ValueError, r"x must be \(B, N, C\)"),
        (lambda x, s: (x.long(), s, 2), {}, TypeError, r"x must be a floating-point"),
        (lambda x, s: (x.tolist(), s, 2), {}, TypeError, r"x must be a torch.Tensor"),
        (lambda x, s: (x, s.to("meta"), 2), {}, ValueError, r"x is on cpu but scores is on meta"),
        (lambda x, s: (x, s, 2), {"num_prefix_tokens": 6}, ValueError,
         r"num_prefix_tokens must lie in \[0, N\] = \[0, 5\], got 6"),
        (lambda x, s: (x, s, 2), {"num_prefix_tokens": -1}, ValueError,
         r"num_prefix_tokens must lie in"),
        (lambda x, s: (x, s, 2), {"fuse_rest": 1}, TypeError, r"fuse_rest must be a bool"),
        (lambda x, s: (x, s, 2), {"backend": "cudnn"}, ValueError,
         r"backend must be 'auto' or one of"),
    ],
)
def test_keep_topk_tokens_bad_inputs(make_args, kwargs, error, match):
    x, scores = _pruning_inputs()
    with pytest.raises(error, match=f"keep_topk_tokens: .*{match}"):
        keep_topk_tokens(*make_args(x, scores), **kwargs)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((torch.randn(4), 2), {}, ValueError, r"scores must be 2-D"),
        ((torch.randn(2, 4), 5), {}, ValueError,
         r"keep must lie in \[0, scores.shape\[1\]\] = \[0, 4\], got 5"),
        ((torch.randn(2, 4), 2), {"num_prefix_tokens": -1}, ValueError,
         r"num_prefix_tokens must be >= 0, got -1"),
        ((torch.randn(2, 4), 2), {"num_prefix_tokens": 1.0}, TypeError,
         r"num_prefix_tokens must be an int"),
    ],
)
def test_topk_token_index_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=f"topk_token_index: {match}"):
        topk_token_index(*args, **kwargs)


@pytest.mark.parametrize(
    "candidates, keep, error, match",
    [
        ([[0, 2, 4], [1, 3, 5]], 4, ValueError,
         r"keep must lie in \[0, M \(the number of candidates\)\] = \[0, 3\], got 4"),
        ([[0, 2, 6], [1, 3, 5]], 1, ValueError,
         r"candidates must lie in \[0, 6\) .* from 0 to 6"),
        ([[0, 2, -1], [1, 3, 5]], 1, ValueError, r"from -1 to 5"),
        ([[0, 2, 2], [1, 3, 5]], 1, ValueError, r"must not repeat .* found 1 repeat"),
        ([[0, 2, 4]] * 3, 1, ValueError, r"candidates must be \(B, M\) = \(2, M\) or \(M,\)"),
        ([[[0, 2, 4]]] * 2, 1, ValueError, r"candidates must be \(B, M\)"),
        ([0, 1, 2, 3, 4, 5, 0], 1, ValueError, r"7 candidates cannot be unique .* N = 6"),
        ("int32", 1, TypeError, r"candidates must be torch.int64, got torch.int32"),
        ("list", 1, TypeError, r"candidates must be a torch.Tensor"),
    ],
)
def test_topk_candidate_index_bad_inputs(candidates, keep, error, match):
    if candidates == "list":
        candidates = [0, 1]
    elif candidates == "int32":
        candidates = torch.tensor([0, 1], dtype=torch.int32)
    else:
        candidates = torch.tensor(candidates)
    with pytest.raises(error, match=f"topk_candidate_index: .*{match}"):
        topk_candidate_index(torch.randn(2, 6), candidates, keep)


def test_unavailable_gather_backend_lists_reasons():
    x, scores = _pruning_inputs()
    if DEVICE.type != "cpu":
        pytest.skip("the cuda backend can serve a GPU machine's tensors")
    with pytest.raises(BackendNotSupportedError, match="CUDA device") as info:
        keep_topk_tokens(x, scores, 2, backend="cuda")
    assert info.value.op == "gather_tokens" and info.value.reasons


# ---- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", [(64, 197, 1, 98, 768), (8, 577, 5, 200, 1024)])
def test_gpu_large_shapes(backend, dtype, shape):
    if backend != "auto":
        require_backend("gather_tokens", backend)
    batch, num_tokens, num_prefix, keep, channels = shape
    g = _gen(9)
    x = random_tensor(batch, num_tokens, channels, dtype=dtype, device=DEVICE, generator=g)
    scores = _scores(batch, num_tokens - num_prefix, ties=True, generator=g, dtype=dtype)
    with poison_outputs():
        x_kept, index = keep_topk_tokens(x, scores, keep, num_prefix_tokens=num_prefix,
                                         fuse_rest=True, backend=backend)
    expected, expected_index = reference.keep_topk_tokens(
        x.double(), scores.double(), keep, num_prefix_tokens=num_prefix, fuse_rest=True
    )
    low_precision, _ = reference.keep_topk_tokens(
        x, scores, keep, num_prefix_tokens=num_prefix, fuse_rest=True
    )
    assert torch.equal(index, expected_index)
    kept = num_prefix + keep
    torch.testing.assert_close(x_kept[:, :kept].double(), expected[:, :kept], rtol=0, atol=0)
    assert_within_reference_error(x_kept[:, kept:], expected[:, kept:], low_precision[:, kept:],
                                  factor=2, atol=ERROR_FLOOR[dtype], name="fused token")


@pytest.mark.gpu
def test_gpu_no_host_sync_and_cuda_graph_capture():
    g = _gen(10)
    x = random_tensor(4, 197, 64, device=DEVICE, generator=g)
    scores = random_tensor(4, 196, device=DEVICE, generator=g)
    candidates = torch.arange(20, 120, device=DEVICE)

    def step():
        x_kept, index = keep_topk_tokens(x, scores, 50, fuse_rest=True)
        return x_kept, index, topk_candidate_index(scores, candidates, 30, check_candidates=False)

    eager = step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    scores.copy_(random_tensor(4, 196, device=DEVICE, generator=g))
    graph.replay()
    fresh = step()
    for got, want in zip(captured, fresh):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(captured[1], eager[1])  # the replay saw the new scores


# ---- similarity_prune_scores (Zero-TPrune's similarity stage) -------------------------------


@pytest.mark.parametrize("num_tokens", [1, 2, 7, 16])
def test_similarity_prune_scores_against_loops(num_tokens):
    g = torch.Generator().manual_seed(num_tokens)
    importance = torch.rand(3, num_tokens, generator=g)
    importance[0, :2] = 0.5  # a tie: the lower index counts as more important
    keys = torch.randn(3, num_tokens, 6, generator=g, dtype=torch.float64)
    scores = similarity_prune_scores(importance, keys)
    assert scores.dtype == torch.float32 and scores.shape == (3, num_tokens)
    for b in range(3):
        order = sorted(range(num_tokens), key=lambda j: (-float(importance[b, j]), j))
        kept = order[:(num_tokens + 1) // 2]
        unit = keys[b] / keys[b].norm(dim=-1, keepdim=True)
        for j in range(num_tokens):
            if j in kept:
                assert scores[b, j] == float("inf")
            else:
                best = max(float(unit[j] @ unit[i]) for i in kept)
                assert abs(float(scores[b, j]) + best) < 1e-6


@pytest.mark.parametrize("args, error, match", [
    ((torch.rand(2, 5), torch.rand(2, 4, 3)), ValueError, r"importance must be \(B, M\) and keys"),
    ((torch.rand(2, 5), torch.rand(2, 5)), ValueError, r"keys \(B, M, D\)"),
    ((torch.rand(2, 5), torch.ones(2, 5, 3, dtype=torch.int64)), TypeError,
     r"keys must be a floating"),
    ((torch.rand(2, 5), torch.rand(2, 5, 3, device="meta")), ValueError,
     r"importance is on cpu but keys is on meta"),
])
def test_similarity_prune_scores_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        similarity_prune_scores(*args)
