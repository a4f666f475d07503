"""tome_match / tome_merge / tome_unmerge on every backend against a naive ToMe oracle.

The oracle (:func:`_naive_tome`) is ToMe's bipartite soft matching written one sample at a
time with Python loops in float64 (normalise, dot, best partner, sort the edges, average the
groups); it checks the plan exactly and the merged values by the error rule: a kernel's max
error against the float64 oracle is at most 2x (forward) / 3x (gradients) the error of
:mod:`fastvl.reference.tome` run in the kernel's dtype, plus a small absolute floor. Outputs
are poisoned first. Random data makes near-ties improbable (the plans then agree exactly);
exact ties are built from duplicated dyadic vectors, whose dot products are exact.

On a CPU machine the Triton kernels run in the interpreter with 16-wide blocks, so the small
shapes here span several A, B and channel blocks; bf16 and large shapes are `gpu` tests.
"""

from __future__ import annotations

import pytest
import torch

from fastvl.ops import BackendNotSupportedError, gather_tokens
from fastvl.ops.tome import TomePlan, tome_match, tome_merge, tome_merge_source, tome_unmerge
from fastvl.reference import tome as reference
from fastvl.testing import (
    ERROR_FLOOR,
    assert_opcheck,
    assert_within_reference_error,
    poison_outputs,
    random_tensor,
)
from tests.conftest import DEVICE, require_backend

ALL_BACKENDS = ("torch", "triton")


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _merge_matrix(dest, size, num_merged):
    """The merge as a dense float64 map: (B, M, N) with row j holding ``s_i / sum s`` at the
    tokens i with dest i = j, and the sums (B, M). merged = W @ x; unmerge = one-hot(dest)."""
    batch, num_tokens = dest.shape
    size = torch.ones(batch, num_tokens) if size is None else size.double().cpu()
    counts = torch.zeros(batch, num_merged, num_tokens, dtype=torch.float64)
    for b in range(batch):
        for i in range(num_tokens):
            counts[b, int(dest[b, i]), i] = size[b, i]
    totals = counts.sum(-1)
    return (counts / totals.unsqueeze(-1)).to(DEVICE), totals.to(DEVICE)


def _one_hot(dest, num_merged):
    """(B, M, N) float64: 1 where token i goes to merged token j."""
    return (dest.unsqueeze(1) == torch.arange(num_merged, device=dest.device)[:, None]).double()


def _naive_tome(metric, x, size, r, num_prefix_tokens, token_order="tome"):
    """-> (dest (B, N) int64, merged (B, M, C) float64, size_merged (B, M) float64).

    Merged token order: "tome", ToMe's [prefix, unmerged A (by position, or by descending
    score without prefix tokens, as ToMe), B]; "spatial" (and r = 0): the survivors in
    position order.
    """
    batch, num_tokens, channels = x.shape
    metric = metric.double().cpu()
    dests = []
    for b in range(batch):
        unit = metric[b] / metric[b].norm(dim=1, keepdim=True)
        set_a = [i for i in range(num_prefix_tokens, num_tokens) if i % 2 == 0]
        set_b = [i for i in range(num_prefix_tokens, num_tokens) if i % 2 == 1]
        partner, score = {}, {}
        for i in set_a:
            sims = [float(unit[i] @ unit[j]) for j in set_b]
            best = max(range(len(set_b)), key=lambda k: (sims[k], -k))  # lowest B on ties
            partner[i], score[i] = set_b[best], sims[best]
        ranked = sorted(set_a, key=lambda i: (-score[i], i))  # lowest A on ties
        merged_away = ranked[:r]
        if token_order == "spatial" or r == 0:  # ToMe does nothing for r = 0
            kept = [i for i in range(num_tokens) if i not in merged_away]
        else:
            unmerged_a = ranked[r:] if num_prefix_tokens == 0 else sorted(ranked[r:])
            kept = list(range(num_prefix_tokens)) + unmerged_a + set_b
        position = {token: j for j, token in enumerate(kept)}
        dests.append([position[partner[i] if i in merged_away else i] for i in range(num_tokens)])
    dest = torch.tensor(dests, dtype=torch.int64).view(batch, num_tokens)
    weights, totals = _merge_matrix(dest, size, num_tokens - r)
    return dest.to(DEVICE), weights @ x.double(), totals


def _assert_near(actual, expected64, name, ulps=16):
    """The torch backend against the float64 oracle: within ``ulps`` units of actual's dtype,
    relative to the largest expected magnitude (a sum of a few terms, rounded a few times)."""
    scale = expected64.abs().max().item() if expected64.numel() else 0.0
    tol = ulps * torch.finfo(actual.dtype).eps * max(scale, 1.0)
    torch.testing.assert_close(actual.double(), expected64, rtol=0, atol=tol, msg=name)


def _check_plan_structure(plan: TomePlan, num_prefix_tokens: int) -> None:
    batch, num_tokens = plan.dest.shape
    num_merged = plan.num_merged_tokens
    assert plan.offsets.shape == (batch, num_merged + 1) and plan.sources.shape == plan.dest.shape
    assert all(t.dtype == torch.int64 and t.is_contiguous() for t in plan)
    counts = torch.zeros(batch, num_merged, dtype=torch.int64, device=plan.dest.device)
    counts.scatter_add_(1, plan.dest, torch.ones_like(plan.dest))
    torch.testing.assert_close(plan.offsets.diff(dim=1), counts, rtol=0, atol=0)
    assert (plan.offsets[:, 0] == 0).all() and (counts >= 1).all()
    # sources: a stable sort of the tokens by destination
    expected_sources = torch.sort(plan.dest, dim=1, stable=True).indices
    torch.testing.assert_close(plan.sources, expected_sources, rtol=0, atol=0)
    prefix = torch.arange(num_prefix_tokens, device=plan.dest.device).expand(batch, -1)
    torch.testing.assert_close(plan.dest[:, :num_prefix_tokens], prefix, rtol=0, atol=0)


def _inputs(batch, num_tokens, channels, metric_channels, dtype, seed, sized):
    g = _gen(seed)
    metric = random_tensor(batch, num_tokens, metric_channels, dtype=dtype, device=DEVICE,
                           generator=g)
    x = random_tensor(batch, num_tokens, channels, dtype=dtype, device=DEVICE, generator=g)
    size = None
    if sized:  # whole patch counts, as after earlier merges
        size = torch.randint(1, 5, (batch, num_tokens), generator=g, device=DEVICE).float()
    return metric, x, size


# (B, N, C of x, C of metric, num_prefix_tokens, r, dtype, sized): r = 0, r at its cap,
# every prefix parity, N in {1, 7, 197-like odd, even}, channels spanning several blocks.
CASES = [
    (2, 37, 24, 20, 1, 9, torch.float32, True),
    (2, 50, 40, 33, 0, 25, torch.float32, False),  # r at the cap, no prefix
    (1, 41, 72, 72, 5, 18, torch.float16, True),  # cls + 4 registers, r at the cap
    (3, 23, 16, 8, 2, 0, torch.float32, True),  # r = 0: identity
    (2, 7, 16, 16, 1, 3, torch.float16, False),  # N = 7, r at the cap
    (2, 60, 8, 64, 2, 29, torch.float16, True),  # cls + distillation, r at the cap
    (1, 1, 5, 4, 1, 0, torch.float32, False),  # N = 1: nothing to merge
]


def _case_id(case):
    batch, n, c, cm, prefix, r, dtype, sized = case
    return f"{str(dtype)[6:]}-b{batch}n{n}c{c}m{cm}-p{prefix}r{r}{'-sized' if sized else ''}"


@pytest.mark.parametrize("token_order", ["tome", "spatial"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_match_merge_unmerge_against_naive(backend, case, token_order):
    require_backend("tome_match", backend)
    batch, num_tokens, channels, metric_channels, prefix, r, dtype, sized = case
    metric, x, size = _inputs(batch, num_tokens, channels, metric_channels, dtype, 0, sized)
    with poison_outputs():
        plan = tome_match(metric, r, num_prefix_tokens=prefix, token_order=token_order,
                          backend=backend)
        merged, size_merged = tome_merge(plan, x, size, backend=backend)
        restored = tome_unmerge(plan, merged, backend=backend)
    dest64, merged64, size64 = _naive_tome(metric, x, size, r, prefix, token_order)
    assert isinstance(plan, TomePlan) and plan.num_merged_tokens == num_tokens - r
    torch.testing.assert_close(plan.dest, dest64, rtol=0, atol=0)
    _check_plan_structure(plan, prefix)

    assert merged.shape == (batch, num_tokens - r, channels) and merged.dtype == dtype
    assert size_merged.dtype == torch.float32
    torch.testing.assert_close(size_merged.double(), size64, rtol=0, atol=0)
    low, _ = reference.tome_merge(plan, x, size)
    assert_within_reference_error(merged, merged64, low, factor=2, atol=ERROR_FLOOR[dtype],
                                  name="merged")
    _assert_near(merged, merged64, "merged")
    # A token merged with nothing is copied exactly (so r = 0 returns x).
    alone = (plan.offsets.diff(dim=1) == 1)
    own = plan.sources.gather(1, plan.offsets[:, :-1])
    torch.testing.assert_close(merged[alone], x.gather(1, own.unsqueeze(-1).expand(
        -1, -1, channels))[alone], rtol=0, atol=0)
    if r == 0:
        torch.testing.assert_close(merged, x, rtol=0, atol=0)
    # Unmerge: every token gets its group's value, exactly.
    torch.testing.assert_close(restored, merged.gather(1, plan.dest.unsqueeze(-1).expand(
        -1, -1, channels)), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ties_break_to_lowest_index(backend):
    """Duplicated B tokens: the lowest B position wins (across and inside tiles); equal A
    scores: the lowest A positions merge first."""
    require_backend("tome_match", backend)
    batch, num_tokens, channels, prefix = 2, 81, 16, 1  # A and B: 40 tokens, 3 tiles of 16
    g = _gen(1)
    # Multiples of 1/64 below 4 in magnitude: every dot product is exact in float32.
    metric = (random_tensor(batch, num_tokens, channels, device=DEVICE, generator=g) * 64)
    metric = metric.round().clamp(-250, 250) / 64
    a_pos, b_pos = (lambda j: 2 + 2 * j), (lambda j: 1 + 2 * j)
    v, w = metric[:, b_pos(3)].clone(), metric[:, b_pos(5)].clone()
    metric[:, b_pos(30)] = v  # duplicate in another tile
    metric[:, b_pos(9)] = w  # duplicate in the same tile
    for j in (20, 2, 7):  # identical A tokens: tied scores (cosine 1)
        metric[:, a_pos(j)] = v
    metric[:, a_pos(11)] = w
    metric[:, a_pos(11), :3] += 1 / 64  # closest to w, but below the cosine-1 ties
    if backend == "torch":
        score, partner = reference.best_partners(metric, prefix)
    else:
        score, partner = torch.ops.fastvl.tome_best_partners_triton(metric, prefix)
    for j in (2, 7, 20):
        assert (partner[:, j] == b_pos(3)).all()
        torch.testing.assert_close(score[:, j], score[:, 2], rtol=0, atol=0)
    assert (partner[:, 11] == b_pos(5)).all()

    plan = tome_match(metric, 2, num_prefix_tokens=prefix, backend=backend)
    dest64, _, _ = _naive_tome(metric, metric, None, 2, prefix)
    torch.testing.assert_close(plan.dest, dest64, rtol=0, atol=0)
    target = plan.dest[:, b_pos(3)]
    assert (plan.dest[:, a_pos(2)] == target).all() and (plan.dest[:, a_pos(7)] == target).all()
    assert (plan.dest[:, a_pos(20)] != target).all()  # the third tie stays
    assert (plan.offsets.diff(dim=1).amax(dim=1) == 3).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_zero_vectors_have_zero_similarity(backend):
    require_backend("tome_match", backend)
    metric = random_tensor(1, 9, 16, device=DEVICE, generator=_gen(2))
    metric[:, 1] = 0  # a zero B token: cosine 0 with everything, never NaN
    metric[:, 4] = 0  # a zero A token: score 0, partner the first B token
    if backend == "torch":
        score, partner = reference.best_partners(metric, 0)
    else:
        score, partner = torch.ops.fastvl.tome_best_partners_triton(metric, 0)
    assert torch.isfinite(score).all() and score[0, 2] == 0 and partner[0, 2] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradients_against_float64(backend, dtype):
    """merge (with sizes) then unmerge: gradients to x and to the merged tokens."""
    require_backend("tome_merge", backend)
    metric, x, size = _inputs(2, 45, 40, 24, dtype, 3, sized=True)
    plan = tome_match(metric, 17, num_prefix_tokens=1, backend="torch")
    g = _gen(4)
    grad_merged = random_tensor(2, 28, 40, dtype=dtype, device=DEVICE, generator=g)
    grad_restored = random_tensor(2, 45, 40, dtype=dtype, device=DEVICE, generator=g)

    def grads(impl_backend, x_in):
        x_in = x_in.detach().requires_grad_(True)
        merged, _ = tome_merge(plan, x_in, size, backend=impl_backend)
        merged_leaf = merged.detach().requires_grad_(True)
        restored = tome_unmerge(plan, merged_leaf, backend=impl_backend)
        (gx,) = torch.autograd.grad(merged, x_in, grad_merged.to(x_in.dtype))
        (gm,) = torch.autograd.grad(restored, merged_leaf, grad_restored.to(x_in.dtype))
        return gx, gm

    with poison_outputs():
        got = grads(backend, x)
    weights, _ = _merge_matrix(plan.dest, size, 28)
    want64 = (weights.transpose(1, 2) @ grad_merged.double(),  # merge: W; its adjoint: W^T
              _one_hot(plan.dest, 28) @ grad_restored.double())  # unmerge's adjoint: a sum
    low = grads("torch", x)
    for name, actual, expected, lp in zip(("grad x", "grad merged"), got, want64, low):
        assert actual.dtype == dtype
        assert_within_reference_error(actual, expected, lp, factor=3, atol=ERROR_FLOOR[dtype] * 10,
                                      name=name)
        _assert_near(actual, expected, name)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradcheck_and_double_backward(backend):
    """gradcheck on the torch backend in float64; the kernels' double backward matches it."""
    require_backend("tome_merge", backend)
    metric, x, size = _inputs(2, 13, 5, 6, torch.float64, 5, sized=True)
    plan = tome_match(metric, 5, num_prefix_tokens=1, backend="torch")
    y = random_tensor(2, 8, 5, dtype=torch.float64, device=DEVICE, generator=_gen(6))
    if backend == "torch":
        assert torch.autograd.gradcheck(
            lambda t: tome_merge(plan, t, size, backend="torch")[0], (x.requires_grad_(True),)
        )
        assert torch.autograd.gradcheck(
            lambda t: tome_unmerge(plan, t, backend="torch"), (y.requires_grad_(True),)
        )
        return
    # Both ops are linear, so their double backward maps the grad-of-grad back through the
    # same weights; compare the triton chain with the torch one (float32).
    results = {}
    for impl in ("torch", "triton"):
        x32 = x.float().requires_grad_(True)
        y32 = y.float().requires_grad_(True)
        merged, _ = tome_merge(plan, x32, size.float(), backend=impl)
        restored = tome_unmerge(plan, y32, backend=impl)
        g1 = torch.ones_like(merged, requires_grad=True)
        g2 = torch.ones_like(restored, requires_grad=True)
        (gx,) = torch.autograd.grad(merged, x32, g1, create_graph=True)
        (gy,) = torch.autograd.grad(restored, y32, g2, create_graph=True)
        h = random_tensor(*gx.shape, device=DEVICE, generator=_gen(7))
        k = random_tensor(*gy.shape, device=DEVICE, generator=_gen(8))
        results[impl] = torch.autograd.grad((gx * h).sum() + (gy * k).sum(), (g1, g2))
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_round_trip_and_source_tracking(backend):
    """Two merge steps, then back: unmerge twice == paint the original patches by source."""
    require_backend("tome_merge", backend)
    metric, x, _ = _inputs(2, 33, 12, 12, torch.float32, 9, sized=False)
    plan1 = tome_match(metric, 12, num_prefix_tokens=1, backend=backend)
    x1, size1 = tome_merge(plan1, x, backend=backend)
    source = tome_merge_source(plan1)
    torch.testing.assert_close(source, plan1.dest, rtol=0, atol=0)
    plan2 = tome_match(x1, 7, num_prefix_tokens=1, backend=backend)
    x2, size2 = tome_merge(plan2, x1, size1, backend=backend)
    source = tome_merge_source(plan2, source)
    assert source.shape == (2, 33) and int(source.max()) < 14
    # Sizes count the original patches each token holds.
    counts = torch.zeros(2, 14, device=DEVICE).scatter_add_(1, source, torch.ones(2, 33,
                                                                                device=DEVICE))
    torch.testing.assert_close(size2, counts, rtol=0, atol=0)
    # Size-weighted merging twice is the plain average over the original patches.
    expected = torch.zeros(2, 14, 12, device=DEVICE, dtype=torch.float64).scatter_add_(
        1, source.unsqueeze(-1).expand(-1, -1, 12), x.double()) / counts.double().unsqueeze(-1)
    torch.testing.assert_close(x2.double(), expected, rtol=1e-5, atol=1e-6)
    restored = tome_unmerge(plan1, tome_unmerge(plan2, x2, backend=backend), backend=backend)
    painted = gather_tokens(x2, source, backend=backend)
    torch.testing.assert_close(restored, painted, rtol=0, atol=0)
    # The weighted sum over tokens is preserved by merge -> unmerge.
    round_trip = tome_unmerge(plan1, x1, backend=backend)
    torch.testing.assert_close(round_trip.sum(1), x.sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_inputs_and_expanded_gradients(backend):
    require_backend("tome_merge", backend)
    g = _gen(10)
    metric = random_tensor(2, 20, 31, device=DEVICE, generator=g).transpose(1, 2)  # (2, 31, 20)
    x = random_tensor(2, 62, 24, device=DEVICE, generator=g)[:, ::2]  # (2, 31, 24), strided
    size = torch.randint(1, 4, (31, 2), generator=g, device=DEVICE).float().t()
    assert not metric.is_contiguous() and not x.is_contiguous() and not size.is_contiguous()
    plan = tome_match(metric, 10, num_prefix_tokens=1, backend=backend)
    expected_plan = tome_match(metric.contiguous(), 10, num_prefix_tokens=1, backend="torch")
    for a, b in zip(plan, expected_plan):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    leaf = x.detach().requires_grad_(True)
    merged, size_merged = tome_merge(plan, leaf, size, backend=backend)
    merged.sum().backward()  # an expanded (stride 0) gradient
    weights, ref_size = _merge_matrix(plan.dest, size, 21)
    _assert_near(merged, weights @ x.double(), "merged")
    torch.testing.assert_close(size_merged.double(), ref_size, rtol=0, atol=0)
    _assert_near(leaf.grad, weights.sum(1).unsqueeze(-1).expand(-1, -1, 24), "grad x")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty(backend):
    """B = 0 and C = 0."""
    require_backend("tome_merge", backend)
    metric = random_tensor(0, 9, 4, device=DEVICE)
    plan = tome_match(metric, 3, num_prefix_tokens=1, backend=backend)
    assert plan.dest.shape == (0, 9) and plan.num_merged_tokens == 6
    merged, size = tome_merge(plan, random_tensor(0, 9, 4, device=DEVICE), backend=backend)
    assert merged.shape == (0, 6, 4) and size.shape == (0, 6)
    plan = tome_match(random_tensor(2, 9, 4, device=DEVICE), 4, backend=backend)
    x = random_tensor(2, 9, 0, device=DEVICE, requires_grad=True)
    merged, size = tome_merge(plan, x, backend=backend)
    assert merged.shape == (2, 5, 0) and (size.sum(1) == 9).all()
    assert tome_unmerge(plan, merged, backend=backend).shape == (2, 9, 0)


# ---- the plan kernel -----------------------------------------------------------------------


def _plan_scores(batch, num_a, seed):
    """Scores with every kind of tie: repeated values (few distinct ones in sample 0), equal
    -0.0 / 0.0, infinities and NaN (which the reference's sort ranks above everything)."""
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(batch, num_a, generator=g)
    score[0] = (score[0] * 2).round() / 2  # a handful of distinct values: many ties
    if batch > 1 and num_a >= 8:
        score[1, :8] = torch.tensor([float("nan"), -0.0, 0.0, float("-inf"), float("nan"),
                                     float("inf"), 0.0, -0.0])
    return score.to(DEVICE)


@pytest.mark.parametrize("token_order", ["tome", "spatial"])
@pytest.mark.parametrize("num_tokens, num_prefix", [
    (n, p) for n in (1, 2, 7, 16, 37, 50) for p in (0, 1, 2, 3) if p <= n
])
def test_plan_kernel_equals_reference_plan(num_tokens, num_prefix, token_order):
    """The Triton plan kernel builds exactly the reference's plan from the same best partners
    (ties, NaN and signed zeros included), for r = 0, 1, a middle value and the cap; partners
    are random (several A tokens per B token), B = 3 with different scores per sample."""
    require_backend("tome_match", "triton")
    from fastvl.kernels import tome as kernels

    batch = 3
    a_first, num_a, b_first, num_b = reference.token_sets(num_tokens, num_prefix)
    max_r = (num_tokens - num_prefix) // 2
    g = torch.Generator().manual_seed(num_tokens * 10 + num_prefix)
    for r in sorted({0, 1, max_r // 2, max_r} - {r for r in (1,) if r > max_r}):
        score = _plan_scores(batch, num_a, r)
        partner = (b_first + 2 * torch.randint(0, max(num_b, 1), (batch, num_a),
                                               generator=g)).to(DEVICE)
        with poison_outputs():
            got = kernels.plan_from_partners(score, partner, r, num_prefix, num_tokens,
                                             token_order == "spatial")
        if r == 0:
            expected = reference.identity_plan(batch, num_tokens, DEVICE)
        else:
            expected = reference.plan_from_partners(score, partner, r, num_prefix, num_tokens,
                                                    token_order)
        for name, a, b in zip(TomePlan._fields, got, expected):
            assert a.dtype == torch.int64 and a.is_contiguous(), name
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}, r = {r}")


@pytest.mark.parametrize("token_order", ["tome", "spatial"])
def test_plan_and_merge_kernels_across_many_tiles(token_order):
    """N = 197 (ViT-B/16's tokens), 129 and 130 through the ops: the plan kernel's blocks and
    A tiles, and the merge / spread kernels' row groups (crossing samples) and channel chunks
    at their interpreter sizes; the plan equals the reference's, merged values and the
    gradient follow the error rule against a float64 oracle (outputs poisoned)."""
    require_backend("tome_match", "triton")
    for num_tokens, prefix, r, channels, dtype in ((197, 1, 16, 40, torch.float16),
                                                  (129, 0, 64, 24, torch.float32),
                                                  (130, 2, 50, 33, torch.float32)):
        metric, x, size = _inputs(3, num_tokens, channels, 16, dtype, num_tokens, sized=True)
        num_merged = num_tokens - r
        grad = random_tensor(3, num_merged, channels, dtype=dtype, device=DEVICE,
                             generator=_gen(num_tokens + 1))
        leaf = x.clone().requires_grad_(True)
        with poison_outputs():
            plan = tome_match(metric, r, num_prefix_tokens=prefix, token_order=token_order,
                              backend="triton")
            merged, size_merged = tome_merge(plan, leaf, size, backend="triton")
            (grad_x,) = torch.autograd.grad(merged, leaf, grad)
        score, partner = reference.best_partners(metric, prefix)
        expected = reference.plan_from_partners(score, partner, r, prefix, num_tokens,
                                                token_order)
        for name, a, b in zip(TomePlan._fields, plan, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        weights, totals = _merge_matrix(plan.dest, size, num_merged)
        torch.testing.assert_close(size_merged.double(), totals, rtol=0, atol=0)
        low = reference.tome_merge(plan, x, size)[0]
        assert_within_reference_error(merged, weights @ x.double(), low, factor=2,
                                      atol=ERROR_FLOOR[dtype], name="merged")
        x_low = x.clone().requires_grad_(True)
        (grad_low,) = torch.autograd.grad(reference.tome_merge(plan, x_low, size)[0], x_low,
                                          grad)
        assert_within_reference_error(grad_x, weights.transpose(1, 2) @ grad.double(),
                                      grad_low, factor=3, atol=ERROR_FLOOR[dtype] * 10,
                                      name="grad x")


@pytest.mark.parametrize("token_order", ["tome", "spatial"])
def test_triton_step_launches_and_syncs(token_order):
    """On the GPU path (launches skipped): tome_match + tome_merge is 3 device launches (best
    partners, plan, merge) with no host synchronisation; r = 0 is 2; the backward adds one."""
    require_backend("tome_match", "triton")
    from fastvl.bench.host_overhead import count_launches, count_syncs, gpu_path

    metric, x, size = _inputs(2, 17, 32, 16, torch.float32, 16, sized=True)
    x.requires_grad_(True)

    def step(r):
        plan = tome_match(metric, r, num_prefix_tokens=1, token_order=token_order,
                          backend="triton")
        return tome_merge(plan, x, size, backend="triton")[0]

    with gpu_path():
        step(4)  # the checks and choices are memoized on the first call
        step(0)
        for r, expected in ((4, 3), (0, 2)):
            launches, ops = count_launches(lambda: step(r))
            assert launches == expected, ops
            assert count_syncs(lambda: step(r))[0] == 0
        grad = torch.ones(2, 13, 32, device=DEVICE)
        launches, ops = count_launches(lambda: step(4).backward(grad))
        assert launches == 4, ops


# ---- registration, compile ---------------------------------------------------------------


def test_opcheck_triton_ops():
    require_backend("tome_match", "triton")
    metric, x, size = _inputs(2, 21, 10, 18, torch.float32, 11, sized=True)
    plan = tome_match(metric, 7, num_prefix_tokens=1, backend="torch")
    merged, size_merged = reference.tome_merge(plan, x, size)
    ops = torch.ops.fastvl
    x_grad = x.clone().requires_grad_(True)
    m_grad = merged.clone().requires_grad_(True)
    cases = [
        (ops.tome_best_partners_triton.default, (metric, 1)),
        (ops.tome_best_partners_triton.default, (metric.half(), 0)),
        (ops.tome_match_triton.default, (metric, 7, 1, False)),
        (ops.tome_match_triton.default, (metric.half(), 10, 0, True)),
        (ops.tome_match_triton.default, (metric, 0, 2, False)),
        (ops.tome_merge_triton.default, (x_grad, size, *plan)),
        (ops.tome_merge_triton.default, (x, None, *plan)),
        (ops.tome_spread_triton.default, (m_grad, size, size_merged, *plan)),
        (ops.tome_spread_triton.default, (m_grad, None, None, *plan)),
        (ops.tome_segment_sum_triton.default, (x_grad, *plan)),
    ]
    for op, args in cases:
        assert_opcheck(op, args)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_compiles_without_graph_breaks(backend):
    require_backend("tome_match", backend)
    torch._dynamo.reset()
    if DEVICE.type == "cuda":
        compiler = "inductor"
    else:
        compiler = "aot_eager" if backend == "torch" else "eager"
    metric, x, size = _inputs(2, 25, 8, 8, torch.float32, 12, sized=True)

    def step(metric, x, size):
        plan = tome_match(metric, 9, num_prefix_tokens=1, backend=backend)
        merged, size_merged = tome_merge(plan, x, size, backend=backend)
        return tome_unmerge(plan, merged * 2, backend=backend), size_merged.log(), plan

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    leaf, expected_leaf = (x.clone().requires_grad_(True) for _ in range(2))
    out, log_size, plan = compiled(metric, leaf, size)
    expected, expected_log_size, expected_plan = step(metric, expected_leaf, size)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(log_size, expected_log_size)
    assert isinstance(plan, TomePlan)
    for a, b in zip(plan, expected_plan):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(leaf.grad, expected_leaf.grad, rtol=1e-6, atol=1e-6)


def test_auto_uses_torch_on_cpu():
    from fastvl.ops.registry import OPS

    metric = random_tensor(1, 5, 4)
    impl = OPS["tome_match"].select("auto", metric.device, metric, 1, 1)
    assert impl is reference.tome_match


# ---- bad input ---------------------------------------------------------------------------


def _bad():
    metric = random_tensor(2, 11, 4)
    plan = tome_match(metric, 3, backend="torch")
    return metric, plan, random_tensor(2, 11, 6)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, p, x: tome_match(m, 6), ValueError,
         r"r must lie in \[0, \(N - num_prefix_tokens\) // 2\] = \[0, 5\].*got 6"),
        (lambda m, p, x: tome_match(m, 6, num_prefix_tokens=0), ValueError,
         r"r must lie in .* = \[0, 5\] \(N = 11, num_prefix_tokens = 0\), got 6"),
        (lambda m, p, x: tome_match(m, -1), ValueError, r"r must lie in .*got -1"),
        (lambda m, p, x: tome_match(m, 2.0), TypeError, r"r must be an int, got float"),
        (lambda m, p, x: tome_match(m, True), TypeError, r"r must be an int, got bool"),
        (lambda m, p, x: tome_match(m, 1, num_prefix_tokens=12), ValueError,
         r"num_prefix_tokens must lie in \[0, N\] = \[0, 11\], got 12"),
        (lambda m, p, x: tome_match(m, 1, num_prefix_tokens=None), TypeError,
         r"num_prefix_tokens must be an int"),
        (lambda m, p, x: tome_match(m[0], 1), ValueError, r"metric must be \(B, N, C\)"),
        (lambda m, p, x: tome_match(m.long(), 1), TypeError, r"metric must be a floating-point"),
        (lambda m, p, x: tome_match(m.tolist(), 1), TypeError, r"metric must be a torch.Tensor"),
        (lambda m, p, x: tome_match(m, 1, token_order="original"), ValueError,
         r"token_order must be 'tome' .* or 'spatial' .*got 'original'"),
        (lambda m, p, x: tome_merge(p, x[:, :10]), ValueError,
         r"x must have \(B, N\) = \(2, 11\) leading dims to match the plan, got shape"),
        (lambda m, p, x: tome_merge(p, x[:1]), ValueError, r"x must have \(B, N\) = \(2, 11\)"),
        (lambda m, p, x: tome_merge(p, x[0]), ValueError, r"x must be \(B, N, C\)"),
        (lambda m, p, x: tome_merge(p, x.to("meta")), ValueError,
         r"x is on meta but the plan is on cpu"),
        (lambda m, p, x: tome_merge(p, x, torch.ones(2, 11, 1)), ValueError,
         r"size must be \(B, N\) = \(2, 11\), got shape \(2, 11, 1\)"),
        (lambda m, p, x: tome_merge(p, x, torch.ones(2, 10)), ValueError,
         r"size must have \(B, N\) = \(2, 11\)"),
        (lambda m, p, x: tome_merge(p, x, torch.ones(2, 11, dtype=torch.long)), TypeError,
         r"size must be a floating-point"),
        (lambda m, p, x: tome_merge(tuple(p), x), TypeError,
         r"plan must be the TomePlan returned by tome_match, got tuple"),
        (lambda m, p, x: tome_merge(p._replace(dest=p.dest.int()), x), ValueError,
         r"plan.dest must be a 2-D int64 tensor"),
        (lambda m, p, x: tome_merge(p._replace(sources=p.sources[:, :5]), x), ValueError,
         r"inconsistent plan"),
        (lambda m, p, x: tome_unmerge(p, x), ValueError,
         r"x must have \(B, M\) = \(2, 8\) leading dims"),
        (lambda m, p, x: tome_unmerge(p, x[0, :8]), ValueError, r"x must be \(B, M, C\)"),
        (lambda m, p, x: tome_merge_source(p, p.dest.int()), TypeError,
         r"source must be an int64 tensor"),
        (lambda m, p, x: tome_merge_source(p, p.dest[0]), ValueError,
         r"source must be \(B, N_orig\)"),
        (lambda m, p, x: tome_merge_source(p, p.dest[:1]), ValueError,
         r"must have the plan's batch size 2"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(*_bad())


def _corrupt(plan, field, change):
    t = getattr(plan, field).clone()
    change(t)
    return plan._replace(**{field: t})


BAD_PLANS = {  # a plan of N = 11 -> M = 8 tokens, made inconsistent
    "dest out of range": ("dest", lambda t: t[1, 4].fill_(40), r"plan.dest values must lie in "
                          r"\[0, M\) = \[0, 8\), found values from 0 to 40"),
    "dest negative": ("dest", lambda t: t[0, 0].fill_(-1), r"plan.dest values .*from -1"),
    "merged token without source": ("dest", lambda t: t[0].clamp_(max=6),
                                    r"every merged token in \[0, M\) must receive a token"),
    "offsets past N": ("offsets", lambda t: t[0, -1].fill_(1000), r"plan.offsets must be"),
    "offsets decreasing": ("offsets", lambda t: t[1, 3].fill_(0), r"plan.offsets must be"),
    "sources out of range": ("sources", lambda t: t[0, 2].fill_(-7), r"plan.sources must list"),
    "sources repeated": ("sources", lambda t: t[1, 5].copy_(t[1, 6]), r"plan.sources must list"),
}


@pytest.mark.parametrize("bad", list(BAD_PLANS))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inconsistent_plans_are_refused(backend, bad):
    """A plan that is not tome_match's is checked before any kernel reads it (the triton
    kernels would read out of bounds); tome_match's own plans are not re-checked."""
    require_backend("tome_merge", backend)
    metric, plan, x = _bad()
    field, change, match = BAD_PLANS[bad]
    corrupt = _corrupt(plan, field, change)
    with pytest.raises(ValueError, match="tome_merge: .*" + match):
        tome_merge(corrupt, x, backend=backend)
    with pytest.raises(ValueError, match="tome_unmerge: .*" + match):
        tome_unmerge(corrupt, x[:, :8], backend=backend)
    getattr(plan, field).copy_(getattr(corrupt, field))  # in place: no longer trusted
    with pytest.raises(ValueError, match="tome_merge: .*" + match):
        tome_merge(plan, x, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rebuilt_and_strided_plans(backend):
    """A consistent plan built elsewhere (a copy, non-contiguous tensors) is accepted and
    gives tome_match's results; check_plan=False skips the value check."""
    require_backend("tome_merge", backend)
    metric, plan, x = _bad()
    strided = TomePlan(*(t.t().contiguous().t() for t in plan))
    assert not strided.dest.is_contiguous()
    weights, totals = _merge_matrix(plan.dest, None, 8)
    merged, size = tome_merge(strided, x, backend=backend)
    _assert_near(merged, weights @ x.double(), "merged")
    torch.testing.assert_close(size.double(), totals, rtol=0, atol=0)
    y = random_tensor(2, 8, 6, device=DEVICE, generator=_gen(15))
    expected = _one_hot(plan.dest, 8).transpose(1, 2) @ y.double()
    torch.testing.assert_close(tome_unmerge(strided, y, backend=backend).double(), expected,
                               rtol=0, atol=0)
    unchecked = _corrupt(plan, "sources", lambda t: t.fill_(0))  # not read by torch
    if backend == "torch":
        tome_merge(unchecked, x, backend=backend, check_plan=False)
    with torch.inference_mode():  # inference tensors have no version counter
        inference_plan = tome_match(metric, 3, backend=backend)
        merged = tome_merge(inference_plan, x, backend=backend)[0]
    _assert_near(merged, weights @ x.double(), "merged in inference mode")


def test_checks_are_repeated_for_other_argument_types():
    """The checks are memoized by shapes, dtypes, devices and arguments (with their types):
    after a valid call, one differing only in an argument's type is checked again."""
    metric, plan, x = _bad()
    tome_match(metric, 1)
    tome_merge(plan, x)
    with pytest.raises(TypeError, match="r must be an int, got bool"):
        tome_match(metric, True)
    with pytest.raises(TypeError, match="num_prefix_tokens must be an int, got float"):
        tome_match(metric, 1, num_prefix_tokens=1.0)
    with pytest.raises(TypeError, match="plan must be the TomePlan"):
        tome_merge(tuple(plan), x)


def test_unknown_and_unavailable_backends():
    metric, plan, x = _bad()
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of"):
        tome_match(metric, 1, backend="fast")
    with pytest.raises(ValueError,
                       match=r"tome_merge: backend must be 'auto' or one of .*, got 'cuda'"):
        tome_merge(plan, x, backend="cuda")
    require_backend("tome_match", "triton", metric.device)
    with pytest.raises(BackendNotSupportedError, match=r"metric has dtype torch.float64"):
        tome_match(metric.double(), 1, backend="triton")
    with pytest.raises(BackendNotSupportedError, match=r"size has dtype torch.float64"):
        tome_merge(plan, x, torch.ones(2, 11, dtype=torch.float64), backend="triton")
    with pytest.raises(BackendNotSupportedError, match=r"x has dtype torch.float64"):
        tome_unmerge(plan, x[:, :8].double(), backend="triton")
    # auto falls back to torch for float64
    merged, size = tome_merge(plan, x.double(), backend="auto")
    assert merged.dtype == torch.float64 and size.dtype == torch.float64


# ---- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [(64, 197, 768, 64, 1, 16), (32, 577, 1024, 64, 1, 288), (8, 1025, 768, 768, 5, 500),
     (16, 198, 384, 64, 2, 98)],
    ids=lambda s: f"b{s[0]}n{s[1]}c{s[2]}m{s[3]}p{s[4]}r{s[5]}",
)
def test_gpu_large_shapes(dtype, shape):
    """ViT sizes: the kernel plan equals the torch plan computed from the same inputs; merge
    and its gradient follow the error rule; two runs are bitwise identical (no atomics)."""
    require_backend("tome_match", "triton")
    batch, num_tokens, channels, metric_channels, prefix, r = shape
    metric, x, size = _inputs(batch, num_tokens, channels, metric_channels, dtype, 13, True)
    with poison_outputs():
        plan = tome_match(metric, r, num_prefix_tokens=prefix, backend="triton")
    expected_plan = tome_match(metric, r, num_prefix_tokens=prefix, backend="torch")
    same = (plan.dest == expected_plan.dest).all(dim=1).float().mean().item()
    assert same >= 0.95, f"only {same:.0%} of the samples have the torch plan (near-ties)"
    leaf = x.clone().requires_grad_(True)
    grad = random_tensor(batch, num_tokens - r, channels, dtype=dtype, device=DEVICE,
                         generator=_gen(14))
    runs = []
    for _ in range(2):
        with poison_outputs():
            merged, size_merged = tome_merge(plan, leaf, size, backend="triton")
            (gx,) = torch.autograd.grad(merged, leaf, grad)
        runs.append((merged, size_merged, gx))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    merged, size_merged, gx = runs[0]
    ref64 = reference.tome_merge(plan, x.double(), size.double())[0]
    low = reference.tome_merge(plan, x, size)[0]
    assert_within_reference_error(merged, ref64, low, factor=2, atol=ERROR_FLOOR[dtype], name="merged")
    x64 = x.double().requires_grad_(True)
    (gx64,) = torch.autograd.grad(reference.tome_merge(plan, x64, size.double())[0], x64,
                                  grad.double())
    x_low = x.clone().requires_grad_(True)
    (gx_low,) = torch.autograd.grad(reference.tome_merge(plan, x_low, size)[0], x_low, grad)
    assert_within_reference_error(gx, gx64, gx_low, factor=3, atol=ERROR_FLOOR[dtype] * 10,
                                  name="grad x")


@pytest.mark.gpu
def test_gpu_auto_uses_triton():
    from fastvl.ops.registry import OPS

    metric = torch.zeros(1, 5, 16, device="cuda")
    impl = OPS["tome_match"].select("auto", metric.device, metric, 1, 1)
    assert impl is not reference.tome_match
