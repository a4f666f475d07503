"""A dispatch table (``auto``'s priority order per op and device) from benchmark results.

``python -m fastvl bench --write-dispatch FILE`` ranks, for every op it timed, the registered
implementations (``fastvl[<backend>]`` rows) on this device: in each case x dtype x mode where
two or more of them ran, each gets its time over the fastest one; an implementation's score is
the geometric mean of those ratios, and the order is by score. The result is merged into
``FILE`` under this device's kind (``cpu`` or ``cuda:<major>.<minor>``), other kinds kept, so
one file can collect several GPUs; load it with ``FASTVL_DISPATCH_TABLE=FILE`` or
:func:`fastvl.ops.registry.load_dispatch_table`.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Sequence

from fastvl.ops.registry import BACKENDS

__all__ = ["device_kind_of", "rank_backends", "write_dispatch_table"]

_IMPL = re.compile(r"^fastvl\[(\w+)\]$")


def device_kind_of(device_info: dict[str, Any]) -> str:
    """The dispatch-table kind of a results file's ``device`` entry."""
    if device_info.get("type") == "cuda":
        return f"cuda:{device_info['capability']}"
    return "cpu"


def rank_backends(rows: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """``{op: [backend, ...]}`` fastest first, from a run's rows (see the module docstring)."""
    groups: dict[tuple, dict[str, float]] = {}
    for row in rows:
        match = _IMPL.match(row.get("impl", ""))
        if (not match or match.group(1) not in BACKENDS or row.get("op") == "host_overhead"
                or row.get("status") != "ok" or not row.get("median_s")):
            continue  # host-overhead rows time the host side only: not a device ranking
        key = (row["op"], row["case"], row["dtype"], row["mode"])
        groups.setdefault(key, {})[match.group(1)] = row["median_s"]
    ratios: dict[str, dict[str, list[float]]] = {}
    for (op, *_), times in groups.items():
        if len(times) < 2:
            continue
        fastest = min(times.values())
        for backend, seconds in times.items():
            ratios.setdefault(op, {}).setdefault(backend, []).append(seconds / fastest)
    table = {}
    for op, per_backend in ratios.items():
        score = {b: math.exp(sum(map(math.log, r)) / len(r)) for b, r in per_backend.items()}
        table[op] = sorted(score, key=lambda b: (score[b], b))
    return table


def write_dispatch_table(results: dict[str, Any], path: str) -> dict:
    """Merge the ranking of ``results`` (a ``results.json`` as a dict) into the table at
    ``path`` (created if absent); returns the table written."""
    table: dict[str, Any] = {"devices": {}}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            table = json.load(handle)
    kind = device_kind_of(results["device"])
    ranked = rank_backends(results["rows"])
    table.setdefault("devices", {}).setdefault(kind, {}).update(ranked)
    table.setdefault("sources", {})[kind] = {
        "device": results["device"].get("name"),
        "versions": results.get("versions"),
        "command": results.get("command"),
        "timestamp": results.get("timestamp"),
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(table, handle, indent=2)
        handle.write("\n")
    return table
