"""`make gpu-check` on a machine without CUDA: a dry run of every step but the CUDA-only ones,
which says `dry run` and exits 0 (issue 28)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, gpu-check measures for real (minutes)")
def test_gpu_check_without_cuda_is_a_dry_run_of_every_step():
    proc = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.splitlines()[-1] == "dry run" and out.startswith("dry run:")
    for step in ("[tests]", "[encoder]", "[e2e]", "[ivfpq]"):
        assert step in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0] == "| measurement | patches/s | notes |" and "FAILED" not in out
    assert any("end to end csmoe-tiny from LMDB" in line for line in table)
    assert any("skipped (dry run: CUDA only)" in line for line in table)
