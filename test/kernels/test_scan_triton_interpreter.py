"""Run test_scan_triton.py under the Triton interpreter in a subprocess (CPU-only machines)."""

import importlib.util
import os
from pathlib import Path
import re
import subprocess
import sys

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason='a GPU is present: test_scan_triton.py runs compiled kernels')
@pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='triton is not installed')
def test_triton_kernels_under_interpreter():
    env = {**os.environ, 'TRITON_INTERPRET': '1'}
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
           str(HERE / 'test_scan_triton.py')]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r'(\d+) passed', out)
    assert passed and int(passed.group(1)) >= 15, out[-3000:]
