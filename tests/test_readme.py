"""The README's example runs unchanged on this machine (a CPU in CI), as a new user runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    section = README.read_text().split("## Example", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_example_runs(tmp_path):
    """In a fresh process outside the checkout (as after `pip install`), with the shapes the
    comments promise."""
    code = _example() + (
        "\nassert out.shape == (2, 32, 256, 128) and mass.shape == (2, 256)"
        "\nassert logits.shape == (2, 1000) and tokens.shape == (2, 64, 1000)"
        "\nassert not tokens.isnan().any()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
