"""The benchmark machinery: timers, the case registry, and `python -m fastvl bench --quick`.

Runs on CPU in a few seconds. The case test runs every registered case at quick scale and
checks that all implementations of a case compute the same result (on a CPU machine the
Triton kernels take part through the interpreter, which tests/conftest.py switches on).
"""

import contextlib
import io
import json
import math
import re
import sys
import time

import pytest
import torch

from fastvl.bench import runner
from fastvl.bench.cases import FORWARD, SCALES, Built, Case, all_cases
from fastvl.bench.timing import peak_memory, summarize, time_callable, time_cpu, time_cuda
from fastvl.cli import main as cli_main
from tests.conftest import DEVICE

try:
    import matplotlib  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False


# --------------------------------------------------------------------------- timing


def test_summarize_known_samples():
    timing = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert timing.median == 3.0
    assert (timing.q1, timing.q3, timing.iqr) == (2.0, 4.0, 2.0)
    assert (timing.min, timing.max, timing.repeats) == (1.0, 5.0, 5)
    single = summarize([0.25])
    assert single.median == single.q1 == single.q3 == 0.25 and single.iqr == 0.0
    with pytest.raises(ValueError):
        summarize([])


def _busy_wait(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_time_cpu_measures_known_durations():
    short = time_cpu(lambda: _busy_wait(0.001), warmup=1, repeats=15)
    long = time_cpu(lambda: _busy_wait(0.004), warmup=1, repeats=15)
    assert short.repeats == long.repeats == 15
    assert short.inner == 1
    # A busy wait never returns early; the upper bounds only allow for a busy machine.
    assert 0.001 <= short.median < 0.01
    assert 0.004 <= long.median < 0.04
    assert long.median > short.median  # more work, more time
    for timing in (short, long):
        assert timing.min <= timing.q1 <= timing.median <= timing.q3 <= timing.max


def test_time_cpu_budget_and_inner_loops():
    calls = []
    timing = time_cpu(lambda: calls.append(1), warmup=2, budget=0.01, max_repeats=50)
    assert timing.inner > 1  # far below the perf_counter sample floor: calls are batched
    assert 10 <= timing.repeats <= 50
    assert len(calls) >= 3 + timing.repeats * timing.inner
    assert 0 < timing.median < 1e-4


def test_time_callable_dispatches_on_device():
    timing = time_callable(lambda: _busy_wait(1e-4), torch.device("cpu"), repeats=5, flush_l2=True)
    assert timing.repeats == 5 and timing.median >= 1e-4


@pytest.mark.gpu
def test_time_cuda_orders_work():
    a = torch.randn(2048, 2048, device="cuda")
    small = time_cuda(lambda: a[:256, :256] @ a[:256, :256], repeats=20)
    big = time_cuda(lambda: a @ a, repeats=20)
    assert small.repeats == big.repeats == 20
    assert 0 < small.median < big.median


def test_peak_memory_is_cuda_only():
    assert peak_memory(lambda: torch.ones(1000), torch.device("cpu")) is None


@pytest.mark.gpu
def test_peak_memory_counts_what_a_call_allocates():
    keep = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # existing: not counted
    peak = peak_memory(lambda: torch.empty(16 * 2**20, dtype=torch.uint8, device="cuda") + 1,
                       torch.device("cuda"))
    assert 32 * 2**20 <= peak < 40 * 2**20  # the temporary and its result
    del keep


# --------------------------------------------------------------------------- cases


def _case_params():
    params = []
    for case in all_cases():
        for dtype in case.dtypes_for(DEVICE):
            for mode in case.modes:
                dtype_name = str(dtype).removeprefix("torch.")
                params.append(pytest.param(case, dtype, mode, id=f"{case.id}-{dtype_name}-{mode}"))
    return params


def _toy_case(build):
    return Case("toy", "case", "toy case", build, ("base", "same", "off", "free", "other"),
                "base", (FORWARD,), lambda device: (torch.float32,))


def _toy_built(device, dtype, scale, mode):
    """base = x + 1; "same" equal to it; "off" off by 1; "free" (x + 1 reversed) checked
    against nothing; "other" (x + 2) checked against "same" with a custom comparison."""
    x = torch.arange(6.0)
    built = Built(items=6, track_memory=True, references={"free": None, "other": "same"})
    built.add("base", lambda: x + 1)
    built.add("same", lambda: x + 1)
    built.add("off", lambda: x + 2)
    built.add("free", lambda: (x + 1).flip(0))
    built.add("other", lambda: x + 2)
    built.compare["other"] = lambda actual, expected: (
        None if torch.equal(actual, expected + 1) else "not expected + 1"
    )
    return built


def test_run_cases_checks_each_impl_against_its_reference():
    settings = runner.Settings(torch.device("cpu"), SCALES["quick"], repeats=2, warmup=1)
    rows = runner.run_cases([_toy_case(_toy_built)], settings, progress=io.StringIO())
    by_impl = {row["impl"]: row for row in rows}
    assert by_impl["off"]["status"] == "mismatch" and "vs base" in by_impl["off"]["reason"]
    for impl, reference in (("base", None), ("same", "base"), ("free", None), ("other", "same")):
        row = by_impl[impl]
        assert row["status"] == "ok" and row["checked_against"] == reference, row
        assert row["items"] == 6 and row["items_per_s"] == pytest.approx(6 / row["median_s"])
        assert "peak_mem_bytes" in row and row["peak_mem_bytes"] is None  # CPU
    table = runner.format_table(rows)
    header = table.splitlines()[1]  # after the op's name
    assert table.splitlines()[0] == "toy" and "items/s" in header and "peak mem" in header
    assert "toy/case  float32  forward" in table
    line = next(line for line in table.splitlines() if re.match(r"  other\s", line))
    cells = line.split()  # ... items/s, peak mem ("-" off CUDA), vs baseline
    assert float(cells[-3]) > 0 and cells[-2] == "-" and cells[-1].endswith("x")
    assert "MISMATCH toy/case float32 forward off: vs base:" in table


def test_case_rejects_bad_references():
    def build(device, dtype, scale, mode):
        built = _toy_built(device, dtype, scale, mode)
        built.references["other"] = "missing"
        return built

    with pytest.raises(RuntimeError, match="references"):
        _toy_case(build).make("cpu", torch.float32, SCALES["quick"], FORWARD)


def test_registry_has_gather_and_attention_cases():
    names = {case.name for case in all_cases(["gather_tokens"])}
    assert {"vit-b16-mae-keep25", "vit-l14-prune-keep50", "vlm-image-tokens"} <= names
    names = {case.name for case in all_cases(["attention"])}
    assert {"vit-b16", "vit-l14-336", "vit-h14", "vit-b16-tome-bias", "llama-prefill",
            "dense-n4096-d128"} <= names
    names = {case.name for case in all_cases(["attention_key_mass"])}
    assert {"vit-b16-all-queries", "llava-prefill-fastv"} <= names
    assert {"vit-b16-r16", "vit-l16-r8"} <= {case.name for case in all_cases(["tome"])}
    assert {"vit-b16", "vit-l16"} <= {case.name for case in all_cases(["vit_tome"])}
    assert {"llama-prefill-576img"} <= {case.name for case in all_cases(["fastv"])}
    assert {"t4096-h4096-r16"} <= {case.name for case in all_cases(["lora_linear"])}
    assert {"t4096-h4096-r16-split50", "multi-adapter-decode"} <= {
        case.name for case in all_cases(["routed_lora_linear"])
    }
    for case in all_cases():
        assert case.baseline in case.impls and case.description
        assert len(set(case.impls)) == len(case.impls)


def _as_tuple(result):
    return (result,) if isinstance(result, torch.Tensor) else tuple(result)


@pytest.mark.parametrize("case, dtype, mode", _case_params())
def test_case_impls_compute_the_same(case, dtype, mode):
    built = case.make(DEVICE, dtype, SCALES["quick"], mode)
    assert set(built.impls) | set(built.skipped) == set(case.impls)
    if built.bytes is not None:
        assert built.bytes > 0
    if built.flops is not None:
        assert built.flops > 0
    results = {name: fn() for name, fn in built.impls.items()}
    for name, result in results.items():
        assert all(torch.isfinite(t).all() for t in _as_tuple(result)), name
    compared = 0
    for name, fn in built.impls.items():
        reference = case.reference(built, name)
        if reference is None:
            continue
        compared += 1
        # callables are re-runnable (nothing accumulates); interpreted Triton runs once (slow,
        # and its callables are built the same way as the others')
        runs = [results[name]] if name in built.interpreted else [results[name], fn()]
        for result in runs:
            assert built.mismatch(name, result, results[reference]) is None, (
                f"{name} vs {reference}: {built.mismatch(name, result, results[reference])}"
            )
    assert compared or len(built.impls) == 1, "no implementation was checked"


# --------------------------------------------------------------------------- the runner


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    captured = {}
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        captured["rc"] = cli_main(["bench", "--quick", "--device", "cpu", "--out", str(out)])
    captured.update(out=out, stdout=stdout.getvalue(), stderr=stderr.getvalue())
    return captured


def test_quick_run_prints_every_case(quick_run):
    assert quick_run["rc"] == 0, quick_run["stdout"] + quick_run["stderr"]
    stdout = quick_run["stdout"]
    for case in all_cases(["gather_tokens"]):
        assert re.search(rf"^gather_tokens/{re.escape(case.name)}\s", stdout, re.MULTILINE), case
    assert f"results written to {quick_run['out'].resolve()}" in stdout
    assert max(len(line) for line in stdout.splitlines()) <= runner.TABLE_WIDTH
    # progress goes to stderr, one line per case x dtype x mode x impl
    assert "[" in quick_run["stderr"] and "torch.gather" in quick_run["stderr"]
    ratios = [float(m) for m in re.findall(r"\s(\d+\.\d+(?:e-\d+)?)x", stdout)]
    assert ratios and all(math.isfinite(r) and r > 0 for r in ratios)


def test_quick_run_writes_results_json(quick_run):
    data = json.loads((quick_run["out"] / "results.json").read_text())
    assert data["complete"] is True
    assert data["device"]["type"] == "cpu" and data["device"]["name"]
    assert "capability" in data["device"]
    for key in ("torch", "triton", "python", "fastvl"):
        assert key in data["versions"]
    assert data["versions"]["torch"] == torch.__version__
    assert data["command"].startswith("python -m fastvl bench") and "--quick" in data["command"]
    assert data["timestamp"] and data["settings"]["quick"] is True
    rows = data["rows"]
    cases = {case.name for case in all_cases(["gather_tokens"])}
    assert {row["case"] for row in rows if row["op"] == "gather_tokens"} == cases
    ran = [row for row in rows if row["status"] == "ok"]
    assert ran and all(row["status"] in ("ok", "skipped") for row in rows)
    for row in ran:
        for key in ("op", "case", "shapes", "dtype", "mode", "impl", "median_s", "iqr_s",
                    "repeats", "ratio"):
            assert key in row, key
        assert row["median_s"] > 0 and row["iqr_s"] >= 0 and row["repeats"] >= 1
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        if row["is_baseline"]:
            assert row["ratio"] == 1.0
    # on CPU: fastvl's auto path (the torch backend) ran against both PyTorch baselines
    impls = {row["impl"] for row in ran}
    assert {"fastvl[torch]", "torch.gather", "torch indexing"} <= impls
    skipped = {row["impl"]: row["reason"] for row in rows if row["status"] == "skipped"}
    assert "fastvl[cuda]" in skipped and skipped["fastvl[cuda]"]


def test_quick_run_reports_attention_tflops(quick_run):
    rows = json.loads((quick_run["out"] / "results.json").read_text())["rows"]
    cases = {case.name for case in all_cases(["attention"]) if case.dtypes_for("cpu")}
    assert {row["case"] for row in rows if row["op"] == "attention"} == cases
    ran = [row for row in rows if row["op"] == "attention" and row["status"] == "ok"]
    assert {"fastvl[torch]", "sdpa", "sdpa[math]"} <= {row["impl"] for row in ran}
    for row in ran:
        assert row["flops"] > 0 and row["tflops"] > 0 and row["gbps"] > 0
        assert math.isclose(row["tflops"], row["flops"] / row["median_s"] / 1e12)
    # gather_tokens counts no FLOPs; the table gets the column because attention does
    assert all(row["tflops"] is None for row in rows if row["op"] == "gather_tokens")
    table = quick_run["stdout"]
    attention_header = table.splitlines()[table.splitlines().index("attention") + 1]
    assert "TFLOP/s" in attention_header
    gather_header = table.splitlines()[table.splitlines().index("gather_tokens") + 1]
    assert "TFLOP/s" not in gather_header
    skipped = {row["impl"]: row["reason"] for row in rows
               if row["op"] == "attention" and row["status"] == "skipped"}
    assert skipped.get("fastvl[cuda]") and skipped.get("flex_attention")  # with reasons


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed")
def test_quick_run_writes_png(quick_run):
    png = quick_run["out"] / "results.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runner_rejects_unknown_op(capsys):
    assert cli_main(["bench", "--ops", "no_such_op", "--quick"]) == 2
    assert "unknown op" in capsys.readouterr().err


def test_runner_lists_cases(capsys):
    assert cli_main(["bench", "--list"]) == 0
    assert "gather_tokens/vit-b16-mae-keep25" in capsys.readouterr().out


def test_parse_dtypes():
    assert runner.parse_dtypes("fp16,bfloat16,fp16") == (torch.float16, torch.bfloat16)
    assert runner.parse_dtypes(None) is None and runner.parse_dtypes("default") is None
    with pytest.raises(ValueError):
        runner.parse_dtypes("int8")


def _table_row(impl, median, baseline=False, tflops=None):
    return {
        "op": "op", "case": "case", "dtype": "float32", "mode": "forward", "impl": impl,
        "is_baseline": baseline, "status": "ok", "median_s": median, "iqr_s": 0.0,
        "gbps": None, "tflops": tflops, "ratio": 2e-3 / median, "auto": False, "reason": None,
    }


def test_format_table_ratio_is_baseline_over_impl():
    table = runner.format_table([_table_row("base", 2e-3, True), _table_row("fast", 1e-3)])
    assert "1.00x (base)" in table and re.search(r"fast\s.*\s2\.00x", table)
    assert "TFLOP/s" not in table  # no FLOP counts, no column (gather's table)


def test_format_table_tflops_column():
    table = runner.format_table(
        [_table_row("base", 2e-3, True, tflops=150.0), _table_row("fast", 1e-3, tflops=0.012)]
    )
    header = table.splitlines()[1].split()
    assert header[-3:] == ["TFLOP/s", "vs", "baseline"] and header[-4] == "GB/s"
    assert re.search(r"base\s.*\s150\.00\s+1\.00x \(base\)", table)
    assert re.search(r"fast\s.*\s0\.012\s+2\.00x", table)
    assert "TFLOP/s = FLOPs / median" in table


def test_plot_skipped_with_a_note_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    note = runner.write_plot([], str(tmp_path / "results.png"), "title")
    assert note and "matplotlib" in note and "skipped" in note
    assert not (tmp_path / "results.png").exists()


def test_partial_results_after_each_case(tmp_path):
    """Each finished case is on disk before the next starts (an interrupted run keeps it)."""
    seen = []

    def after_case(rows):
        seen.append(len(rows))
        runner._write_results(str(tmp_path), {"command": "c", "device": {"name": "cpu"},
                                              "versions": {"torch": "t"}, "timestamp": "now"},
                              rows, 1.0, complete=False)

    settings = runner.Settings(torch.device("cpu"), SCALES["quick"], repeats=2, warmup=1)
    rows = runner.run_cases([_toy_case(_toy_built), _toy_case(_toy_built)], settings,
                            progress=io.StringIO(), on_case=after_case)
    assert seen == [len(rows) // 2, len(rows)]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["complete"] is False and len(data["rows"]) == len(rows)
    assert "(partial: the run did not finish)" in (tmp_path / "table.txt").read_text()


def test_heartbeat_shows_a_long_step_is_alive():
    progress = io.StringIO()
    with runner._heartbeat(progress, every=0.05):
        time.sleep(0.3)
    assert progress.getvalue().count(".") >= 2


def test_format_table_fits_the_width():
    rows = [dict(_table_row("fastvl[triton]", 1e-3), case="x" * 200, op="op"),
            dict(_table_row("base", 2e-3, True), status="mismatch", reason="y " * 200)]
    assert max(len(line) for line in runner.format_table(rows).splitlines()) <= 120
