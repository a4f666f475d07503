"""The host-overhead instrument (fastvl.bench.host_overhead) and the host_overhead bench suite.

No timing assertions (the machine is shared and noisy): the suite's cases build and run on the
GPU path, the runner reports launches / syncs / host ratios, and the launch and sync counters
count known calls exactly.
"""

import io

import pytest
import torch
import torch.nn.functional as F

import fastvl.ops
from fastvl.bench import runner
from fastvl.bench.cases import SCALES, all_cases
from fastvl.bench.host_overhead import (
    count_launches,
    count_syncs,
    gpu_path,
    host_timings,
    no_launches,
)
from fastvl.ops.registry import OPS, TRITON_IMPORT_ERROR

needs_triton = pytest.mark.skipif(TRITON_IMPORT_ERROR is not None, reason="triton is missing")

HOST_CASES = all_cases(["host_overhead"])
OPS_COVERED = {
    "attention", "attention-causal-gqa", "attention-key-bias", "varlen_attention",
    "attention_key_mass", "gather_tokens", "tome_match+tome_merge", "keep_topk_tokens",
    "masked_patch_embed", "unshuffle_with_mask_token", "masked_pixel_loss", "random_masking",
    "lora_linear", "routed_lora_linear",
}


def _qkv(requires_grad=True):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 8, 16, generator=generator).requires_grad_(requires_grad)
            for _ in range(3)]


def test_suite_covers_every_op():
    assert {case.name for case in HOST_CASES} == OPS_COVERED
    for case in HOST_CASES:
        assert case.host_overhead and case.baseline == "plain"


@pytest.mark.parametrize(
    "case, mode", [(c, m) for c in HOST_CASES for m in c.modes], ids=lambda v: getattr(v, "id", v)
)
def test_case_runs_on_the_gpu_path(case, mode):
    with gpu_path():
        built = case.make("cpu", torch.float32, SCALES["quick"], mode)
        assert "plain" in built.impls and "fastvl[auto]" in built.impls
        if TRITON_IMPORT_ERROR is None and case.name != "random_masking":
            assert "fastvl[triton]" in built.impls  # triton counts as available on the GPU path
        for name, fn in built.impls.items():
            fn()
            launches, ops = count_launches(fn)
            assert launches == len(ops) and launches >= 1, name


def test_runner_reports_host_columns():
    case = next(c for c in HOST_CASES if c.name == "attention")
    settings = runner.Settings(device=torch.device("cpu"), scale=SCALES["quick"], quick=True,
                               repeats=2, warmup=1, host_round_s=0.001)
    rows = runner.run_cases([case], settings, progress=io.StringIO())
    ran = [row for row in rows if row["status"] == "ok"]
    assert {row["impl"] for row in ran} >= {"plain", "fastvl[auto]"}
    for row in ran:
        assert row["median_s"] > 0 and row["launches"] >= 1 and row["syncs"] == 0
        assert row["host_ratio"] == pytest.approx(1.0 / row["ratio"])
    table = runner.format_table(rows)
    assert "launches" in table and "host/plain" in table


def test_gpu_path_dispatches_as_on_a_gpu():
    q, k, v = _qkv()
    args = (q, k, v, None, None, 0.25, False, 1.0, False, None, 0.0)
    with gpu_path():
        assert OPS["attention"].select("auto", q.device, *args) is OPS["attention"].impls[
            "sdpa"].fn
        if TRITON_IMPORT_ERROR is None:
            assert OPS["attention"].call_reasons(
                "triton", OPS["attention"].describe(*args)) == []


@needs_triton
def test_no_launches_counts_and_skips_triton_launches():
    q, k, v = _qkv(requires_grad=False)
    with gpu_path(), no_launches() as count:
        fastvl.ops.attention(q, k, v, backend="triton")
        fastvl.ops.attention(q, k, v, backend="triton")
    assert count.triton == 2


@needs_triton
def test_count_launches_of_the_triton_attention():
    q, k, v = _qkv()
    grad = torch.randn(1, 2, 8, 16)
    with gpu_path():
        # forward: one kernel, nothing else on the device
        assert count_launches(lambda: fastvl.ops.attention(q, k, v, backend="triton")) == (
            1, ["triton"])
        # backward: preprocess and dK/dV with the atomic dQ (float32: no dQ cast); no
        # zero-filled gradient for the unused lse
        launches, ops = count_launches(lambda: torch.autograd.grad(
            fastvl.ops.attention(q, k, v, backend="triton"), (q, k, v), grad))
    assert (launches, ops) == (3, ["triton"] * 3)


def test_count_launches_of_plain_torch():
    x = torch.randn(4, 8)
    weight = torch.randn(16, 8)
    assert count_launches(lambda: F.linear(x, weight)) == (1, ["mm.default"])
    assert count_launches(lambda: (x.view(2, 16).t(), torch.empty(3))) == (0, [])
    assert count_launches(lambda: (x + 1).relu())[0] == 2


def test_count_syncs():
    x = torch.randn(4, 8)
    index = torch.randint(0, 4, (2, 3))
    assert count_syncs(lambda: (x + 1).sum(dim=0)) == (0, [])
    assert count_syncs(lambda: x[x > 0])[0] == 1
    assert count_syncs(lambda: (x.sum().item(), index.tolist(), bool(x.any()))) == (
        3, ["item", "tolist", "__bool__"])


def test_host_timings_interleaves_every_callable():
    calls = {"a": 0, "b": 0}

    def bump(name):
        calls[name] += 1

    timings = host_timings({"a": lambda: bump("a"), "b": lambda: bump("b")}, rounds=4,
                           warmup=3, round_seconds=1e-4)
    assert set(timings) == {"a", "b"}
    for name, timing in timings.items():
        assert timing.repeats == 4 and timing.inner >= 1 and timing.median > 0
        assert calls[name] == 3 + 4 * timing.inner
