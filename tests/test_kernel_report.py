"""``python -m fastvl kernels``: the kernels' GPU resources at the benchmark shapes, and the CI
check on them (no spills on sm_80 / sm_90, wgmma for half-precision ``tl.dot`` on sm_90)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DEVICE, require_backend

pytestmark = pytest.mark.skipif(
    DEVICE.type != "cpu", reason="compiles for GPUs on machines without one")


def test_ctas_per_sm_follows_each_limit():
    from fastvl.kernel_report import ctas_per_sm

    # 255 registers -> 32 * 256 per warp; 8 warps take the whole 64K register file.
    assert ctas_per_sm(255, 8, 0, 90) == 1
    # 128 registers, 4 warps: 4 CTAs by registers; 48 KB (+1 KB) of 164 KB: 3 by shared.
    assert ctas_per_sm(128, 4, 48 * 1024, 80) == 3
    assert ctas_per_sm(128, 4, 48 * 1024, 90) == 4
    assert ctas_per_sm(16, 1, 0, 90) == 32  # the CTA cap
    assert ctas_per_sm(32, 4, 228 * 1024, 90) == 0  # does not fit


def test_useful_share_of_attention_tiles():
    from fastvl.kernel_report import useful_share

    launch = {"values": {"num_queries": 197, "num_keys": 197, "head_dim": 80},
              "constants": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 128}}
    assert useful_share(launch) == pytest.approx(197 / 256 * 197 / 256 * 80 / 128)
    key_mass = {"values": {"num_keys": 2048, "head_dim": 128, "query_start": 611,
                           "query_end": 2048},
                "constants": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 128}}
    assert useful_share(key_mass) == pytest.approx(1437 / 1472)
    assert useful_share({"values": {"num_rows": 9}, "constants": {"BLOCK": 16}}) is None


def test_report_for_key_mass(capsys):
    """The report of one op's cases: every launch of both cases compiled, JSON rows."""
    require_backend("attention_key_mass", "triton")
    from fastvl.kernel_report import print_report

    print_report("sm_90", as_json=True, ops=["attention_key_mass"])
    report = json.loads(capsys.readouterr().out)["sm_90"]
    rows = report["rows"]
    assert {row["kernel"] for row in rows} == {"_key_mass_kernel"}
    assert {row["dtypes"][0] for row in rows} == {"*bf16", "*fp16"}
    cases = {case.split()[0] for row in rows for case in row["cases"]}
    assert cases == {"attention_key_mass/vit-b16-all-queries",
                     "attention_key_mass/llava-prefill-fastv"}
    for row in rows:
        assert row["registers"] > 0 and row["ctas_per_sm"] >= 1, row
        assert row["dot"] and row["mma"] is False and row["wgmma"] is True, row
        assert 0 < row["useful"] <= 1, row
    assert report["problems"] == []


# ---- the CI check ----------------------------------------------------------------------------

# Every kernel the benchmark cases launch (checked below, so that a new one is not missed).
KERNELS = (
    "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_group_sum_kernel",
    "_attn_fwd_kernel", "_key_mass_kernel", "_best_partner_kernel", "_segment_reduce_kernel",
    "_spread_kernel", "_tome_plan_kernel", "_gather_tokens_kernel", "_scatter_add_tokens_kernel",
    "_lora_fwd_kernel", "_lora_fwd_rows_kernel", "_lora_bwd_dx_kernel", "_lora_bwd_dw_kernel",
    "_unshuffle_fwd_kernel", "_unshuffle_bwd_kernel", "_pitome_energy_kernel",
)
# Kernels that fail the check today, per arch: strict xfails, so the check turns red (XPASS)
# once one is fixed and must then be taken off this list. None today.
KNOWN_FAILURES: dict[int, set] = {80: set(), 90: set()}


@pytest.fixture(scope="module")
def report_rows():
    """{arch: rows} of every benchmark case's launches."""
    require_backend("attention", "triton")
    from fastvl.kernel_report import ARCHS, kernel_rows, recorded_case_launches

    return {arch: kernel_rows(recorded_case_launches(arch=arch), arch)
            for arch in ARCHS.values()}


@pytest.mark.slow
def test_check_covers_every_launched_kernel(report_rows):
    assert {row["kernel"] for rows in report_rows.values() for row in rows} == set(KERNELS)


@pytest.mark.slow
@pytest.mark.parametrize("arch, kernel", [
    pytest.param(arch, name, marks=[pytest.mark.xfail(strict=True, reason="known failure")]
                 if name in KNOWN_FAILURES[arch] else [])
    for arch in (80, 90) for name in KERNELS
])
def test_kernels_do_not_spill_and_use_wgmma(kernel, arch, report_rows):
    """CI: no kernel spills at the benchmark shapes on sm_80 / sm_90, and every kernel with a
    half-precision ``tl.dot`` uses wgmma on sm_90 (:func:`fastvl.kernel_report.problems`)."""
    from fastvl.kernel_report import problems

    rows = [row for row in report_rows[arch] if row["kernel"] == kernel]
    assert problems(rows, arch) == []


@pytest.mark.slow
def test_attention_forward_uses_tma_on_sm90_only(report_rows):
    """The attention forward loads K / V through TMA descriptors on sm_90 (the benchmark
    tensors are aligned) and through pointers on sm_80."""
    for arch, expected in ((90, True), (80, False)):
        rows = [row for row in report_rows[arch] if row["kernel"] == "_attn_fwd_kernel"]
        assert rows and all(row["tma"] is expected for row in rows), arch
