"""`python -m fastvl info`: versions, extension state and the op x backend table."""

import json
import subprocess
import sys

import torch

from fastvl import _extension, info
from fastvl.ops import registry


def test_report_lists_every_op_and_backend():
    report = info.collect()
    assert report["torch"] == torch.__version__
    assert set(report["ops"]) == set(registry.OPS) and "gather_tokens" in report["ops"]
    device = info.default_device()
    for name, backends in report["ops"].items():
        op = registry.OPS[name]
        # auto's order first, then fastvl's own backends the op lacks (with the reason).
        assert tuple(backends)[:len(op.impls)] == op.order(device)
        assert set(backends) == set(op.impls) | set(registry.OWN_BACKENDS)
        assert backends["torch"] == []  # always available
    # The library kernels are listed beside fastvl's own, with the reason when unavailable.
    for library in ("sdpa", "flash_attn", "xformers"):
        assert library in report["ops"]["attention"]
    assert report["ops"]["attention"]["sdpa"] == []
    assert "flash_attn" in report["ops"]["varlen_attention"]


def test_text_report_matches_extension_state():
    text = info.format_report(info.collect())
    if _extension.is_built():
        archs = ";".join(_extension.cuda_archs())
        assert f"fastvl._C built for sm {archs}" in text
    else:
        assert f"fastvl._C not available: {_extension.LOAD_ERROR}" in text
    if not torch.cuda.is_available():
        assert "    cuda        unavailable: " in text
        assert "    sdpa        available" in text


def test_report_without_extension(monkeypatch):
    monkeypatch.setattr(_extension, "EXTENSION", None)
    monkeypatch.setattr(_extension, "LOAD_ERROR", _extension.NOT_BUILT)
    report = info.collect()
    assert report["extension"] == {
        "built": False,
        "cuda_archs": [],
        "cuda_version": None,
        "error": _extension.NOT_BUILT,
        "build_record": _extension.read_build_record(),
    }
    reasons = report["ops"]["gather_tokens"]["cuda"]
    assert reasons == [f"fastvl._C is not available: {_extension.NOT_BUILT}"]
    assert "fastvl._C not available: not built" in info.format_report(report)


def test_report_without_triton(monkeypatch):
    monkeypatch.setattr(registry, "TRITON_IMPORT_ERROR", "triton is not installed")
    report = info.collect()
    assert report["ops"]["gather_tokens"]["triton"] == ["triton is not installed"]


def test_cli_json_and_text():
    out = subprocess.run(
        [sys.executable, "-m", "fastvl", "info", "--json"], capture_output=True, text=True, check=True
    ).stdout
    report = json.loads(out)
    assert report["extension"]["built"] == _extension.is_built()
    text = subprocess.run(
        [sys.executable, "-m", "fastvl", "info"], capture_output=True, text=True, check=True
    ).stdout
    assert text.startswith("fastvl ") and "gather_tokens" in text


def test_cli_reader_gone_exits_quietly():
    """`python -m fastvl info | head`: the reader closes the pipe before fastvl writes; fastvl
    stops with status 1 and no traceback (before the fix: a BrokenPipeError traceback)."""
    process = subprocess.Popen([sys.executable, "-m", "fastvl", "info"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the interpreter has started importing fastvl
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    assert b"Traceback" not in stderr and b"BrokenPipeError" not in stderr, stderr.decode()[-2000:]
