"""`fastvl bench --write-dispatch`: ranking implementations from results into a table."""

import json

import torch

from fastvl.bench.dispatch import rank_backends, write_dispatch_table
from fastvl.ops import registry


def _row(op, case, impl, seconds, status="ok", mode="forward"):
    return {"op": op, "case": case, "dtype": "float16", "mode": mode, "impl": impl,
            "status": status, "median_s": seconds}


ROWS = [
    # case a: sdpa fastest, triton 2x, torch 4x; case b: triton fastest, sdpa 1.5x
    _row("attention", "a", "fastvl[sdpa]", 1.0), _row("attention", "a", "fastvl[triton]", 2.0),
    _row("attention", "a", "fastvl[torch]", 4.0), _row("attention", "a", "sdpa", 0.5),
    _row("attention", "b", "fastvl[sdpa]", 3.0), _row("attention", "b", "fastvl[triton]", 2.0),
    _row("attention", "b", "fastvl[cuda]", None, status="skipped"),
    # a group with one implementation ranks nothing
    _row("gather_tokens", "c", "fastvl[torch]", 1.0),
]


def test_rank_by_geometric_mean_of_ratios_to_the_fastest():
    # sdpa: sqrt(1 * 1.5) = 1.22; triton: sqrt(2 * 1) = 1.41; torch: 4 -> sdpa, triton, torch
    assert rank_backends(ROWS) == {"attention": ["sdpa", "triton", "torch"]}


def test_written_table_merges_device_kinds_and_loads(tmp_path):
    path = str(tmp_path / "dispatch.json")
    gpu = {"device": {"type": "cuda", "capability": "9.0", "name": "H200"},
           "command": "python -m fastvl bench", "rows": ROWS}
    cpu = {"device": {"type": "cpu", "name": "EPYC"}, "rows": [
        _row("attention", "a", "fastvl[sdpa]", 2.0), _row("attention", "a", "fastvl[torch]", 1.0),
    ]}
    write_dispatch_table(gpu, path)
    table = write_dispatch_table(cpu, path)
    assert table["devices"]["cuda:9.0"]["attention"] == ["sdpa", "triton", "torch"]
    assert table["devices"]["cpu"]["attention"] == ["torch", "sdpa"]
    assert table["sources"]["cuda:9.0"]["device"] == "H200"
    assert json.load(open(path))["devices"] == table["devices"]
    try:
        registry.load_dispatch_table(path)
        assert registry.OPS["attention"].order(torch.device("cpu"))[:2] == ("torch", "sdpa")
        assert registry.dispatch_order(registry.OPS["attention"], "cuda:9.0")[:2] == (
            "sdpa", "triton")
        # A GPU kind the file does not list keeps the shipped GPU default.
        assert registry.dispatch_order(registry.OPS["attention"], "cuda:8.0")[0] == "flash_attn"
    finally:
        registry.load_dispatch_table()
