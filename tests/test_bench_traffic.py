"""Bytes moved per call (fastvl.bench.traffic) and its ``moved/min`` column in the bench runner.

Expected byte counts are worked out by hand from the model in fastvl/bench/traffic.py: each
launch moves each distinct tensor it touches once, broadcast dimensions left out, the source
of an indexed read at its output's size.
"""

import io
import re

import pytest
import torch

import fastvl
from fastvl import _extension
from fastvl.bench import runner
from fastvl.bench.cases import FORWARD, SCALES, Built, Case, all_cases
from fastvl.bench.traffic import count_traffic
from fastvl.ops.registry import TRITON_IMPORT_ERROR
from tests.conftest import DEVICE

B, N, K, C = 2, 7, 3, 5  # gather shapes: N > K and C > 1 tell a whole read from an indexed one
GATHER_KERNEL = "fastvl.kernels.gather._gather_tokens_kernel"


def _gather_inputs(device="cpu"):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, C, generator=generator).to(device)
    index = torch.stack([torch.randperm(N, generator=generator)[:K] for _ in range(B)])
    return x, index.to(device)


# x read at the output's size (B*K*C float32), the index (B, K, 1) int64 un-expanded, the output
GATHER_BYTES = B * K * C * 4 + B * K * 8 + B * K * C * 4


def test_one_elementwise_op():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    traffic = count_traffic(lambda: x + y)
    assert traffic.bytes == 3 * 4 * 8 * 4 == 384
    assert traffic.launches == 1 and traffic.kernels == [("aten::add", 384)]


def test_unfused_chain_writes_and_reads_back_intermediates():
    x = torch.randn(4, 8)
    traffic = count_traffic(lambda: (x * 2 + 1).sum())
    # mul: x in, t1 out; add: t1 in, t2 out; sum: t2 in, a 0-dim float out
    assert traffic.kernels == [("aten::mul", 256), ("aten::add", 256), ("aten::sum", 132)]
    assert traffic.bytes == 644 and traffic.launches == 3


def test_in_place_tensor_counted_once_and_factories_read_no_template():
    x = torch.randn(4, 8)
    assert count_traffic(lambda: x.add_(1)).kernels == [("aten::add_", 128)]
    assert count_traffic(lambda: torch.zeros_like(x)).bytes == 128
    assert count_traffic(lambda: x.new_zeros(2, 8)).bytes == 64


def test_gather_reads_its_source_at_the_output_size():
    x, index = _gather_inputs()
    traffic = count_traffic(lambda: torch.gather(x, 1, index[..., None].expand(-1, -1, C)))
    assert traffic.kernels == [("aten::gather", GATHER_BYTES)]


def test_views_and_empty_count_nothing():
    x, _ = _gather_inputs()
    traffic = count_traffic(lambda: (
        x.view(-1), x.transpose(1, 2), x[:, 1:], x.expand(3, -1, -1, -1), x.unsqueeze(0),
        torch.empty(3), torch.empty_like(x),
    ))
    assert traffic.bytes == 0 and traffic.launches == 0 and traffic.kernels == []


def test_fastvl_torch_backend_counts_what_it_runs():
    x, index = _gather_inputs()
    plain = count_traffic(lambda: torch.gather(x, 1, index[..., None].expand(-1, -1, C)))
    ours = count_traffic(lambda: fastvl.ops.gather_tokens(x, index, backend="torch",
                                                          check_bounds=False))
    assert ours.bytes == plain.bytes == GATHER_BYTES and ours.launches == 1


@pytest.mark.skipif(TRITON_IMPORT_ERROR is not None, reason="triton is not available")
def test_triton_launch_runs_and_is_recorded():
    x, index = _gather_inputs(DEVICE)
    results = []
    traffic = count_traffic(lambda: results.append(
        fastvl.ops.gather_tokens(x, index, backend="triton", check_bounds=False)))
    # the launch, not the ATen ops the interpreter emulates it with
    assert traffic.kernels == [(GATHER_KERNEL, GATHER_BYTES)]
    expected = torch.stack([x[b, index[b]] for b in range(B)])
    assert torch.equal(results[0], expected)  # the kernel ran


@pytest.mark.skipif(not _extension.is_built(), reason="the CUDA extension is not built")
def test_cuda_extension_op_is_one_launch_on_meta_tensors():
    x, index = (t.to("meta") for t in _gather_inputs())
    traffic = count_traffic(lambda: torch.ops.fastvl.gather_tokens_cuda(x, index))
    assert traffic.kernels == [("fastvl::gather_tokens_cuda", GATHER_BYTES)]


# --------------------------------------------------------------------------- the runner


def _quick_settings():
    return runner.Settings(torch.device("cpu"), SCALES["quick"], repeats=1, warmup=1)


def test_runner_reports_moved_bytes_of_a_real_case():
    case = next(c for c in all_cases(["gather_tokens"]) if c.name == "vit-b16-mae-keep25")
    rows = runner.run_cases([case], _quick_settings(), progress=io.StringIO())
    ran = [row for row in rows if row["status"] == "ok"]
    assert {"fastvl[torch]", "torch.gather", "torch indexing"} <= {row["impl"] for row in ran}
    for row in ran:
        assert row["moved_bytes"] > 0
        assert row["moved_ratio"] == pytest.approx(row["moved_bytes"] / row["bytes"])
    forward = {row["impl"]: row for row in ran if row["mode"] == FORWARD}
    assert forward["torch.gather"]["moved_ratio"] == 1.0  # one gather moves the minimum
    assert all(row["moved_ratio"] > 1 for row in ran if row["mode"] != FORWARD)  # zero fill
    for row in rows:
        if row["status"] == "skipped":  # the Triton interpreter among them
            assert "moved_bytes" not in row and "moved_ratio" not in row
    table = runner.format_table(rows)
    assert "moved/min" in table.splitlines()[1]
    assert re.search(r"^  torch\.gather\s.*\s1\.00x\s+1\.00x \(base\)$", table, re.MULTILINE)
    assert "moved/min = " in table
    assert max(len(line) for line in table.splitlines()) <= runner.TABLE_WIDTH


def _toy_case(build, host_overhead=False):
    return Case("toy", "case", "toy case", build, ("base", "interp", "modal"), "base",
                (FORWARD,), lambda device: (torch.float32,), host_overhead)


def _toy_built(device, dtype, scale, mode):
    """base = x + 1; "interp" marked interpreted; "modal" fails under a dispatch mode."""
    x = torch.randn(4, 8)

    def modal():
        if torch._C._len_torch_dispatch_stack():
            raise RuntimeError("no dispatch modes here")
        return x + 1

    built = Built(bytes=160)
    built.add("base", lambda: x + 1)
    built.add("interp", lambda: x + 1)
    built.add("modal", modal)
    built.interpreted.add("interp")
    return built


def test_runner_counts_traffic_of_timed_rows_only():
    rows = {row["impl"]: row for row in runner.run_cases(
        [_toy_case(_toy_built)], _quick_settings(), progress=io.StringIO())}
    assert rows["base"]["moved_bytes"] == 256 and rows["base"]["moved_ratio"] == 1.6
    assert rows["interp"]["status"] == "skipped" and "moved_bytes" not in rows["interp"]
    modal = rows["modal"]  # counting failed: the timing stands, the reason is kept
    assert modal["status"] == "ok" and modal["median_s"] > 0 and "moved_bytes" not in modal
    assert "no dispatch modes here" in modal["moved_error"]
    table = runner.format_table(list(rows.values()))
    assert re.search(r"^  base\s.*\s1\.60x\s+1\.00x \(base\)$", table, re.MULTILINE)
    assert "moved/min not counted for toy/case float32 forward modal" in table

    host_rows = runner.run_cases([_toy_case(_toy_built, host_overhead=True)], _quick_settings(),
                                 progress=io.StringIO())
    assert not any("moved_bytes" in row or "moved_error" in row for row in host_rows)
    assert "moved/min" not in runner.format_table(host_rows)


def test_moved_ratio_format():
    def table_line(ratio):
        row = {"op": "op", "case": "case", "dtype": "float32", "mode": "forward", "impl": "i",
               "is_baseline": True, "status": "ok", "median_s": 1e-3, "iqr_s": 0.0,
               "gbps": 1.0, "ratio": 1.0, "moved_ratio": ratio, "reason": None}
        return runner.format_table([row]).splitlines()[3]

    assert re.search(r"\s1\.00x\s", table_line(1.0))
    assert re.search(r"\s3\.2x\s", table_line(3.2))
    assert re.search(r"\s150x\s", table_line(150.4))
