"""``python -m fastvl bench``: fastvl vs PyTorch (and installed peers), side by side.

For every op with registered cases (:mod:`fastvl.bench.suites`), every case, dtype and mode,
each implementation that can run on the device is checked against the case's baseline
(results must match) and then timed on the same inputs (:mod:`fastvl.bench.timing`).
Progress goes to stderr, the comparison table to stdout, and ``results.json``,
``results.png`` (when matplotlib is installed) and ``table.txt`` to the results directory
(``fastvl-bench-results/<device>-<timestamp>/`` unless ``--out`` says otherwise).

On CPU the shapes are those of the GPU cases with the batch divided by 8, float32, and only
PyTorch code is timed (Triton would run in its interpreter, which is not a benchmark).

Where a case states the minimum bytes a call must move (``Built.bytes``, giving GB/s), each
timed implementation's row also has ``moved_bytes``, what one call's kernels move
(:func:`fastvl.bench.traffic.count_traffic`, counted on one more, untimed call), and
``moved_ratio`` over that minimum: ``moved/min`` in the table, above 1x where kernels write
intermediates and read them back.

Host-overhead cases (``--ops host_overhead``, :attr:`Case.host_overhead`) are built and timed
inside :func:`fastvl.bench.host_overhead.gpu_path` on tiny CPU tensors, the implementations of
a case interleaved (:func:`~fastvl.bench.host_overhead.host_timings`); their rows add device
launches and host syncs per call and ``host/plain``, the host time over the baseline's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import shlex
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TextIO

import torch

from fastvl.bench.cases import SCALES, Built, Case, Scale, all_cases
from fastvl.bench.dispatch import device_kind_of, write_dispatch_table
from fastvl.bench.timing import Timing, peak_memory, time_callable, warm_up_device

__all__ = ["add_arguments", "run", "Settings", "run_cases", "format_table", "main"]

_DTYPE_NAMES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtypes(text: Optional[str]) -> Optional[tuple[torch.dtype, ...]]:
    """"fp16,bf16" -> (torch.float16, torch.bfloat16); None or "default" -> None."""
    if text is None or text.strip().lower() in ("", "default"):
        return None
    dtypes = []
    for part in text.split(","):
        key = part.strip().lower()
        if key not in _DTYPE_NAMES:
            raise ValueError(
                f"unknown dtype {part.strip()!r}; use float16, bfloat16, float32 or float64"
            )
        if _DTYPE_NAMES[key] not in dtypes:
            dtypes.append(_DTYPE_NAMES[key])
    return tuple(dtypes)


# --------------------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m fastvl bench`` (the parser comes from fastvl.cli)."""
    parser.description = (
        "Time fastvl against PyTorch (and installed peers) for every op, on this device. "
        "Prints a table and writes results.json / results.png to a results directory."
    )
    parser.add_argument(
        "--ops", default=None, metavar="OP[,OP...]",
        help="only these ops (default: every op; ops without cases yet are noted)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="tiny shapes and 3 repeats: a smoke test of the whole pipeline, not a measurement",
    )
    parser.add_argument(
        "--dtype", default=None, metavar="DTYPE[,DTYPE...]",
        help="float16, bfloat16, float32, float64 "
        "(default: float16,bfloat16 on GPU, float32 on CPU)",
    )
    parser.add_argument(
        "--out", default=None, metavar="DIR",
        help="results directory (default: fastvl-bench-results/<device>-<YYYYmmdd-HHMMSS>/)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, metavar="N",
        help="timed repeats per implementation (default: as many as fit a time budget)",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="device to benchmark on (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--no-l2-flush", dest="flush_l2", action="store_false",
        help="CUDA: do not overwrite the L2 cache before each timed call",
    )
    parser.add_argument(
        "--write-dispatch", default=None, metavar="FILE",
        help="rank every implementation of each op timed here and merge the order into the "
        "dispatch table FILE under this device (load it with FASTVL_DISPATCH_TABLE=FILE)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="CPU: torch.set_num_threads(N) for the run (default: torch's default)",
    )
    parser.add_argument(
        "--list", dest="list_cases", action="store_true",
        help="list the registered cases and exit",
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point (``python -m fastvl bench`` goes through fastvl.cli)."""
    parser = argparse.ArgumentParser(prog="fastvl bench")
    add_arguments(parser)
    return run(parser.parse_args(argv))


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    device: torch.device
    scale: Scale
    dtypes: Optional[tuple[torch.dtype, ...]] = None  # None: each case's defaults
    repeats: Optional[int] = None
    warmup: int = 3
    budget: float = 0.5  # seconds of timing per implementation
    min_repeats: int = 10
    flush_l2: bool = True
    quick: bool = False
    threads: Optional[int] = None
    host_rounds: int = 31  # host-overhead cases: interleaved rounds ...
    host_round_s: float = 0.01  # ... of about this long per implementation

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Settings":
        choice = getattr(args, "device", "auto") or "auto"
        if choice == "auto":
            choice = "cuda" if torch.cuda.is_available() else "cpu"
        if choice == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        device = torch.device(choice)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        quick = bool(getattr(args, "quick", False))
        repeats = getattr(args, "repeats", None)
        if repeats is not None and repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {repeats}")
        threads = getattr(args, "threads", None)
        if threads is not None and threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        settings = cls(
            device=device,
            scale=SCALES["quick" if quick else ("full" if device.type == "cuda" else "cpu")],
            dtypes=parse_dtypes(getattr(args, "dtype", None)),
            repeats=repeats,
            flush_l2=bool(getattr(args, "flush_l2", True)),
            quick=quick,
            threads=threads,
        )
        if quick:
            settings.warmup, settings.budget, settings.min_repeats = 1, 0.02, 3
            settings.repeats = repeats or 3
            settings.host_round_s = 0.002
        elif device.type == "cuda":
            settings.warmup, settings.budget, settings.min_repeats = 5, 0.25, 20
        return settings

    def timing_kwargs(self) -> dict[str, Any]:
        return {
            "warmup": self.warmup,
            "repeats": self.repeats,
            "budget": self.budget,
            "min_repeats": self.min_repeats,
            "flush_l2": self.flush_l2,
        }


# --------------------------------------------------------------------------- running


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _format_seconds(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    micro = "µs" if _can_print("µ") else "us"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} {micro}"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds:.3f} s"


def _format_bytes(count: Optional[int]) -> str:
    if count is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def _can_print(text: str) -> bool:
    try:
        text.encode(getattr(sys.stdout, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


HEARTBEAT_S = 20.0


@contextlib.contextmanager
def _heartbeat(progress: TextIO, every: float = HEARTBEAT_S):
    """Prints a dot to ``progress`` every ``every`` seconds while the block runs, so a long
    case (a model's train step on a CPU) shows it is alive."""
    done = threading.Event()

    def beat():
        while not done.wait(every):
            print(".", end="", file=progress, flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def run_cases(
    cases: Sequence[Case], settings: Settings, progress: Optional[TextIO] = None,
    on_case: Optional[Callable[[list[dict[str, Any]]], None]] = None,
) -> list[dict[str, Any]]:
    """Check and time every implementation of every case; one row (dict) per implementation.
    ``on_case(rows so far)`` runs after each case (the runner writes partial results)."""
    progress = sys.stderr if progress is None else progress
    plan = [
        (case, dtype, mode)
        for case in cases
        for dtype in (settings.dtypes or case.dtypes_for(settings.device))
        for mode in case.modes
    ]
    total = sum(len(case.impls) for case, _, _ in plan)
    width = len(str(total))
    rows: list[dict[str, Any]] = []
    done = 0
    for case, dtype, mode in plan:
        built: Optional[Built] = None
        expected = None
        build_error = None
        host = case.host_overhead
        try:
            with _gpu_path() if host else contextlib.nullcontext(), _heartbeat(progress):
                built = case.make(settings.device, dtype, settings.scale, mode)
                expected = None if host else built.impls[case.baseline]()
            _sync(settings.device)
        except Exception as exc:  # a broken case must not stop the other cases
            build_error = f"building the case failed: {_short_error(exc)}"
        measured = (
            _measure_host(built, case, settings) if host and build_error is None else {}
        )
        results = {case.baseline: expected}  # reference results, computed once per group
        base = {
            "op": case.op,
            "case": case.name,
            "description": case.description,
            "dtype": dtype_name(dtype),
            "mode": mode,
            "shapes": built.shapes if built else None,
            "bytes": built.bytes if built else None,
            "flops": built.flops if built else None,
            "items": built.items if built else None,
            "baseline": case.baseline,
        }
        if built is not None and built.track_memory:
            base["peak_mem_bytes"] = None
        group: list[dict[str, Any]] = []
        for impl in case.impls:
            done += 1
            label = f"[{done:>{width}}/{total}] {case.id} {dtype_name(dtype)} {mode} {impl}"
            row = dict(base, impl=impl, is_baseline=impl == case.baseline,
                       auto=built is not None and built.auto == impl)
            row.update(status="ok", reason=None, median_s=None, iqr_s=None, q1_s=None,
                       q3_s=None, min_s=None, repeats=0, ratio=None, gbps=None, tflops=None,
                       items_per_s=None, checked_against=None)
            rows.append(row)
            if build_error is not None:
                row.update(status="error", reason=build_error)
            elif impl in built.skipped:
                row.update(status="skipped", reason=built.skipped[impl])
            elif impl in built.interpreted and not host:
                row.update(status="skipped",
                           reason="runs in the Triton interpreter on CPU: correct, not timed")
            if row["status"] != "ok":
                print(f"{label}: {row['status']}: {row['reason']}", file=progress, flush=True)
                continue
            print(f"{label} ...", end="", file=progress, flush=True)
            with _heartbeat(progress):
                row.update(measured[impl] if host else
                           _measure(built, impl, case, results, settings))
            if row["status"] == "ok":
                print(f" {_format_seconds(row['median_s'])}", file=progress, flush=True)
                group.append(row)
            else:
                print(f" {row['status'].upper()}: {row['reason']}", file=progress, flush=True)
        baseline_rows = [row for row in group if row["is_baseline"]]
        if baseline_rows:
            reference_time = baseline_rows[0]["median_s"]
            for row in group:
                if row["median_s"] > 0:
                    row["ratio"] = reference_time / row["median_s"]
                if host:
                    row["host_ratio"] = row["median_s"] / reference_time
        built = expected = results = None
        if on_case is not None:
            on_case(rows)
        if settings.device.type == "cuda":  # hand this case's memory back before the next
            # (a full collection takes ~0.1-0.3 s with torch loaded: worth it on GPUs only;
            # on CPU reference counting frees the case's tensors)
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def _gpu_path():
    from fastvl.bench.host_overhead import gpu_path

    return gpu_path()


def _measure_host(built: Built, case: Case, settings: Settings) -> dict[str, dict]:
    """Host time per call (the implementations interleaved), device launches and host syncs
    per call of every implementation of a host-overhead case, inside ``gpu_path()``; results
    are not checked (skipped launches leave outputs unwritten)."""
    from fastvl.bench.host_overhead import count_launches, count_syncs, host_timings

    measured, runnable = {}, {}
    with _gpu_path():
        for impl, fn in built.impls.items():
            try:
                launches, launch_ops = count_launches(fn)
                syncs, sync_ops = count_syncs(fn)
            except Exception as exc:
                measured[impl] = {"status": "error", "reason": _short_error(exc)}
                continue
            measured[impl] = {"launches": launches, "launch_ops": launch_ops, "syncs": syncs,
                              "sync_ops": sync_ops, "checked_against": None}
            runnable[impl] = fn
        try:
            timings = host_timings(
                runnable, rounds=settings.repeats or settings.host_rounds,
                warmup=settings.warmup if settings.quick else 20,
                round_seconds=settings.host_round_s,
            )
        except Exception as exc:
            return {impl: {"status": "error", "reason": _short_error(exc)} for impl in built.impls}
    for impl, timing in timings.items():
        measured[impl].update(median_s=timing.median, iqr_s=timing.iqr, q1_s=timing.q1,
                              q3_s=timing.q3, min_s=timing.min, repeats=timing.repeats)
    return measured


def _measure(built: Built, impl: str, case: Case, results: dict, settings: Settings) -> dict:
    """Check ``impl`` against its reference (whose result is computed once into ``results``),
    then time it (and measure its peak memory if the case asks), then, where the case states
    its minimum bytes, count the bytes one call moves (:func:`_moved`)."""
    fn = built.impls[impl]
    reference = case.reference(built, impl)
    checked = {"checked_against": reference}
    try:
        if reference is not None:
            if reference not in results:
                try:
                    results[reference] = built.impls[reference]()
                except Exception as exc:
                    results[reference] = exc
            expected = results[reference]
            if isinstance(expected, Exception):
                return {"status": "error", "reason": f"its reference {reference} failed: "
                        f"{_short_error(expected)}", **checked}
            mismatch = built.mismatch(impl, fn(), expected)
            if mismatch is not None:
                return {"status": "mismatch", "reason": f"vs {reference}: {mismatch}", **checked}
        memory = peak_memory(fn, settings.device) if built.track_memory else None
        timing: Timing = time_callable(fn, settings.device, **settings.timing_kwargs())
    except Exception as exc:  # an impl that fails (OOM, compile error) is reported, not fatal
        return {"status": "error", "reason": _short_error(exc), **checked}
    result = {
        "median_s": timing.median,
        "iqr_s": timing.iqr,
        "q1_s": timing.q1,
        "q3_s": timing.q3,
        "min_s": timing.min,
        "repeats": timing.repeats,
        **checked,
    }
    if built.bytes:
        result["gbps"] = built.bytes / timing.median / 1e9
    if built.flops:
        result["tflops"] = built.flops / timing.median / 1e12
    if built.items:
        result["items_per_s"] = built.items / timing.median
    if built.track_memory:
        result["peak_mem_bytes"] = memory
    if impl in built.traffic_unknown:
        result["moved_error"] = built.traffic_unknown[impl]
    elif built.bytes:
        result.update(_moved(fn, built.bytes))
    return result


def _moved(fn: Callable[[], Any], minimum: float) -> dict:
    """``moved_bytes``, what one call's kernels move (:func:`fastvl.bench.traffic.count_traffic`,
    one more untimed call), and ``moved_ratio``, that over the ``minimum``; or
    ``moved_error`` if counting failed (the timing stands)."""
    from fastvl.bench.traffic import count_traffic

    try:
        moved = count_traffic(fn).bytes
    except Exception as exc:
        return {"moved_error": _short_error(exc)}
    return {"moved_bytes": moved, "moved_ratio": moved / minimum}


# --------------------------------------------------------------------------- reporting


TABLE_WIDTH = 120


def _table_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The metric columns an op's rows use (a column no row fills is left out)."""
    columns = ["median", "IQR", "GB/s"]
    columns += ["moved/min"] if any(r.get("moved_ratio") is not None for r in rows) else []
    columns += ["TFLOP/s"] if any(r.get("tflops") for r in rows) else []
    columns += ["items/s"] if any(r.get("items_per_s") for r in rows) else []
    columns += ["peak mem"] if any("peak_mem_bytes" in r for r in rows) else []
    columns += ["launches", "syncs", "host/plain"] if any("launches" in r for r in rows) else []
    return columns + ["vs baseline"]


def _rate(value: Optional[float], big: float) -> str:
    if not value:
        return "-"
    return f"{value:.2f}" if value >= big else f"{value:.2g}"


def _metric_cells(row: dict[str, Any], columns: Sequence[str]) -> list[str]:
    if row["status"] != "ok":
        return ["-"] * (len(columns) - 1) + [row["status"].upper()]
    ratio = row["ratio"]
    if ratio is None:
        speed = "-"
    elif row["is_baseline"]:
        speed = "1.00x (base)"
    else:
        speed = f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"
    host_ratio = row.get("host_ratio")
    moved_ratio = row.get("moved_ratio")
    value = {
        "median": _format_seconds(row["median_s"]),
        "IQR": _format_seconds(row["iqr_s"]),
        "GB/s": f"{row['gbps']:.1f}" if row.get("gbps") else "-",
        "moved/min": "-" if moved_ratio is None else _format_ratio(moved_ratio),
        "TFLOP/s": _rate(row.get("tflops"), 0.1),
        "items/s": _rate(row.get("items_per_s"), 10),
        "peak mem": _format_bytes(row.get("peak_mem_bytes")),
        "launches": str(row.get("launches", "-")),
        "syncs": str(row.get("syncs", "-")),
        "host/plain": "-" if host_ratio is None else f"{host_ratio:.2f}x",
        "vs baseline": speed,
    }
    return [value[column] for column in columns]


def _format_ratio(ratio: float) -> str:
    """1.00x, 3.2x, 150x."""
    if ratio < 2:
        return f"{ratio:.2f}x"
    return f"{ratio:.1f}x" if ratio < 100 else f"{ratio:.0f}x"


def _shapes_text(shapes: Optional[dict]) -> str:
    """The shapes a case ran with (case names carry the GPU sizes; smaller scales shrink
    them), e.g. ``  as run: x 2x8x32, r 4``."""
    if not shapes:
        return ""
    parts = [f"{name} {'x'.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"
             for name, value in shapes.items()]
    return "  as run: " + ", ".join(parts)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison (rows that ran, errors included) in at most :data:`TABLE_WIDTH` columns:
    per op a header with the columns its rows use, per case a line naming it with the dtype,
    mode and shapes it ran with, then one line per implementation; a short key and what did
    not run after."""
    shown = [r for r in rows if r["status"] != "skipped"]
    out = []
    for op in dict.fromkeys(r["op"] for r in shown):
        op_rows = [r for r in shown if r["op"] == op]
        columns = _table_columns(op_rows)
        header = ["  impl", *columns]
        cells = [["  " + r["impl"] + (" (auto)" if r.get("auto") else ""),
                  *_metric_cells(r, columns)] for r in op_rows]
        widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]

        def fmt(line):
            return "  ".join(c.rjust(w) if i else c.ljust(w)
                             for i, (c, w) in enumerate(zip(line, widths))).rstrip()

        out += ["", op, fmt(header)]
        group = None
        for row, line in zip(op_rows, cells):
            if (row["case"], row["dtype"], row["mode"]) != group:
                group = (row["case"], row["dtype"], row["mode"])
                out.append(f"{op}/{row['case']}  {row['dtype']}  {row['mode']}"
                           f"{_shapes_text(row.get('shapes'))}"[:TABLE_WIDTH])
            out.append(fmt(line))
    rates = ["GB/s = minimum bytes moved / median"]
    rates += ["moved/min = bytes one call's kernels move / that minimum (>1: traffic "
              "between kernels)"] if any("moved_ratio" in r for r in shown) else []
    rates += ["TFLOP/s = FLOPs / median"] if any(r.get("tflops") for r in shown) else []
    rates += ["items/s = images or prompts / median"] if any(
        r.get("items_per_s") for r in shown) else []
    rates += ["peak mem = CUDA memory a call adds at its peak"] if any(
        "peak_mem_bytes" in r for r in shown) else []
    notes = ["vs baseline = baseline median / impl median (>1: faster); (auto) = what "
             "backend=\"auto\" uses.", "; ".join(rates) + "."]
    if any("launches" in r for r in shown):
        notes.append("Host-overhead cases: host time per call on the GPU path (launches "
                     "skipped); host/plain target <= 1.3x.")
    notes += [f"{r['status'].upper()} {r['op']}/{r['case']} {r['dtype']} {r['mode']} "
              f"{r['impl']}: {r['reason']}" for r in rows if r["status"] not in ("ok", "skipped")]
    notes += [f"moved/min not counted for {r['op']}/{r['case']} {r['dtype']} {r['mode']} "
              f"{r['impl']}: {r['moved_error']}" for r in shown if "moved_error" in r]
    out.append("")
    for note in notes:
        out += textwrap.wrap(note, TABLE_WIDTH, subsequent_indent="  ")
    skipped: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row["status"] == "skipped":
            skipped.setdefault((row["impl"], row["reason"]), []).append(row)
    if skipped:
        out.append("Not run:")
        for (impl, reason), group_rows in skipped.items():
            ops = sorted({r["op"] for r in group_rows})
            out += textwrap.wrap(f"{impl} ({len(group_rows)} runs of {', '.join(ops)}): "
                                 f"{reason}", TABLE_WIDTH, initial_indent="  ",
                                 subsequent_indent="    ")
    return "\n".join(out[1:] if out and out[0] == "" else out)


def environment(device: torch.device) -> dict[str, Any]:
    """Device and software versions recorded with every result."""
    import fastvl
    from fastvl import _extension
    from fastvl.info import describe_device, triton_version
    from fastvl.ops import registry

    built = _extension.is_built()
    return {
        "device": describe_device(device),
        "versions": {
            "fastvl": fastvl.__version__,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": triton_version(),
            "python": platform.python_version(),
        },
        "platform": platform.platform(),
        "extension": {
            "built": built,
            "cuda_archs": _extension.cuda_archs() if built else [],
            "error": None if built else _extension.LOAD_ERROR,
        },
        "triton_interpreter": registry.TRITON_INTERPRETER,
    }


def device_slug(info: dict[str, Any]) -> str:
    name = info["name"]
    name = re.sub(r"\((r|tm|c)\)", " ", name, flags=re.IGNORECASE).split("@")[0]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or info["type"]
    if info["type"] == "cpu" and not slug.startswith("cpu"):
        slug = f"cpu-{slug}"
    return slug[:48].strip("-")


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (from the parsed options)."""
    parts = ["python", "-m", "fastvl", "bench"]
    for flag, attr in (("--ops", "ops"), ("--dtype", "dtype"), ("--repeats", "repeats"),
                       ("--threads", "threads"), ("--out", "out")):
        value = getattr(args, attr, None)
        if value is not None:
            parts += [flag, str(value)]
    if getattr(args, "device", "auto") not in (None, "auto"):
        parts += ["--device", args.device]
    if getattr(args, "quick", False):
        parts.append("--quick")
    if not getattr(args, "flush_l2", True):
        parts.append("--no-l2-flush")
    return shlex.join(parts)


_PLOT_TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)


def write_plot(rows: Sequence[dict[str, Any]], path: str, title: str) -> Optional[str]:
    """Bar chart of speed-up vs baseline per case, each bar labelled with its ratio and
    median time; returns a note instead if impossible."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    except Exception as exc:  # ImportError, or a broken install
        return f"matplotlib is not available ({type(exc).__name__}: {exc}); results.png skipped"
    ops = []
    for row in rows:
        if row["op"] not in ops:
            ops.append(row["op"])
    panels = []
    for op in ops:
        groups: dict[str, dict[str, float]] = {}
        baselines = []
        for row in rows:
            if row["op"] != op or row["status"] != "ok" or row["ratio"] is None:
                continue
            if row["baseline"] not in baselines:
                baselines.append(row["baseline"])
            if row["is_baseline"]:
                continue
            key = f"{row['case']}\n{row['dtype']}, {row['mode']}"
            groups.setdefault(key, {})[row["impl"]] = (row["ratio"], row["median_s"])
        if groups:
            panels.append((op, baselines, groups))
    if not panels:
        return "no timed comparisons to plot; results.png skipped"
    # Horizontal bars, one band per case x dtype x mode: the figure grows downwards with
    # the number of cases and the labels stay readable.
    heights = []
    for _, _, groups in panels:
        impls = {name for ratios in groups.values() for name in ratios}
        heights.append(len(groups) * (0.18 * len(impls) + 0.3) + 1.2)
    figure = Figure(figsize=(9.0, sum(heights) + 0.6), dpi=110)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(len(panels), 1, height_ratios=heights)
    for position, (op, baselines, groups) in enumerate(panels):
        axes = figure.add_subplot(grid[position, 0])
        impls = []
        for ratios in groups.values():
            impls += [name for name in ratios if name not in impls]
        bar_height = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            ys, values, seconds = [], [], []
            for g, ratios in enumerate(groups.values()):
                if impl in ratios:
                    ys.append(g - 0.4 + bar_height * (i + 0.5))
                    values.append(ratios[impl][0])
                    seconds.append(ratios[impl][1])
            # Bars grow from 1 (the baseline): right = faster, left = slower.
            bars = axes.barh(ys, [v - 1.0 for v in values], left=1.0, height=bar_height,
                             label=impl, color=f"C{i}")
            for bar, value, median in zip(bars, values, seconds):
                axes.annotate(
                    f" {value:.2f}x, {_format_seconds(median)} ",
                    (value, bar.get_y() + bar.get_height() / 2),
                    ha="left" if value >= 1 else "right", va="center", fontsize=6,
                )
        axes.axvline(1.0, color="black", linewidth=0.8)
        axes.set_xscale("log")
        values = [v for ratios in groups.values() for v, _ in ratios.values()] + [1.0]
        low, high = min(values) / 1.5, max(values) * 2.5  # room for the labels
        axes.set_xlim(low, high)
        # A few round ratios only: log-scale minor labels crowd around 1x.
        axes.xaxis.set_major_locator(FixedLocator(
            [t for t in _PLOT_TICKS if low <= t <= high]))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.tick_params(axis="x", which="both", labelsize=7)
        axes.set_yticks(range(len(groups)))
        axes.set_yticklabels(list(groups), fontsize=7)
        axes.set_ylim(len(groups) - 0.5, -0.5)  # first case on top
        axes.set_xlabel(f"speed-up vs {' / '.join(baselines)} (>1 = faster)", fontsize=8)
        axes.set_title(op, fontsize=10)
        axes.legend(fontsize=7, loc="lower right")
    figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.5 / figure.get_figheight()))  # title above
    figure.savefig(path)
    return None


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_results(out_dir: str, results: dict, rows: list, elapsed: float,
                   complete: bool) -> str:
    """Writes results.json and table.txt for the rows so far (``complete`` False while cases
    remain: an interrupted run keeps what it measured); returns the table."""
    table = format_table(rows)
    data = {**results, "complete": complete, "elapsed_s": round(elapsed, 2), "rows": rows}
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(_json_safe(data), handle, indent=2)
        handle.write("\n")
    with open(os.path.join(out_dir, "table.txt"), "w", encoding="utf-8") as handle:
        handle.write(f"# {results['command']}\n# {results['device']['name']}, "
                     f"torch {results['versions']['torch']}, {results['timestamp']}"
                     f"{'' if complete else ' (partial: the run did not finish)'}\n")
        handle.write(table + "\n")
    return table


def run(args: argparse.Namespace) -> int:
    """Run the comparison; 0 on success, 1 if an implementation failed, 2 on bad options."""
    try:
        settings = Settings.from_args(args)
    except ValueError as exc:
        print(f"fastvl bench: {exc}", file=sys.stderr)
        return 2
    from fastvl.ops import OPS

    cases = all_cases()
    if getattr(args, "list_cases", False):
        for case in cases:
            print(f"{case.id}: {case.description}")
        return 0
    known = list(OPS) + sorted({case.op for case in cases} - set(OPS))
    if getattr(args, "ops", None):
        wanted = [name.strip() for name in args.ops.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in known]
        if unknown:
            print(f"fastvl bench: unknown op(s) {', '.join(unknown)}; known: {', '.join(known)}",
                  file=sys.stderr)
            return 2
    else:
        wanted = known
    notes = []
    for name in wanted:
        if not any(case.op == name for case in cases):
            notes.append(f"{name}: no benchmark cases registered yet")
        elif name not in OPS and not any(
            impl.startswith("fastvl") for case in cases if case.op == name for impl in case.impls
        ):  # (cases of a workload, e.g. a patched model, name their fastvl implementations)
            notes.append(f"{name}: has cases but fastvl has no such op (only peers run)")
    selected = [case for case in cases if case.op in wanted]
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not selected:
        print("fastvl bench: nothing to run", file=sys.stderr)
        return 2

    previous_threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        env = environment(settings.device)  # after set_num_threads: records the count used
        started = _dt.datetime.now()
        out_dir = os.path.abspath(getattr(args, "out", None) or os.path.join(
            "fastvl-bench-results", f"{device_slug(env['device'])}-{started:%Y%m%d-%H%M%S}"
        ))
        os.makedirs(out_dir, exist_ok=True)
        dtypes = [dtype_name(d) for d in settings.dtypes] if settings.dtypes else "case defaults"
        print(
            f"fastvl bench on {env['device']['name']} ({settings.device}), "
            f"scale {settings.scale.name}, dtypes: {dtypes}; results go to {out_dir} after "
            "each case",
            file=sys.stderr, flush=True,
        )
        results = {
            "schema": 1,
            "timestamp": started.astimezone().isoformat(timespec="seconds"),
            "command": command_line(args),
            "argv": list(sys.argv),
            **env,
            "settings": {
                "device": str(settings.device),
                "scale": settings.scale.name,
                "dtypes": [dtype_name(d) for d in settings.dtypes] if settings.dtypes else None,
                "repeats": settings.repeats,
                "warmup": settings.warmup,
                "budget_s": settings.budget,
                "min_repeats": settings.min_repeats,
                "flush_l2": settings.flush_l2 if settings.device.type == "cuda" else None,
                "quick": settings.quick,
                "timer": ("torch.cuda.Event" if settings.device.type == "cuda"
                          else "time.perf_counter"),
            },
            "notes": notes,
        }
        if settings.device.type == "cuda":
            warm_up_device(settings.device)  # clocks up before the first measurement
        clock = time.perf_counter()
        rows = run_cases(selected, settings, on_case=lambda done: _write_results(
            out_dir, results, done, time.perf_counter() - clock, complete=False))
        elapsed = time.perf_counter() - clock
    finally:
        torch.set_num_threads(previous_threads)

    table = _write_results(out_dir, results, rows, elapsed, complete=True)
    print(table)
    if getattr(args, "write_dispatch", None):
        dispatch = write_dispatch_table(_json_safe({**results, "rows": rows}),
                                        args.write_dispatch)
        kind = device_kind_of(results["device"])
        print(f"dispatch order for {kind} written to {args.write_dispatch}: "
              f"{dispatch['devices'].get(kind, {})}")
    title = (f"fastvl {env['versions']['fastvl']} on {env['device']['name']}, "
             f"torch {env['versions']['torch']}")
    note = write_plot(rows, os.path.join(out_dir, "results.png"), title)
    if note:
        print(f"note: {note}")
    print(f"results written to {out_dir} ({elapsed:.1f} s of benchmarking)")
    failed = [r for r in rows if r["status"] not in ("ok", "skipped")]
    return 1 if failed else 0
