"""Where the Triton kernel tests run: CUDA in-process, else the interpreter in a subprocess.

See conftest.py for why the interpreter cannot be switched on in-process. A test file marks its
kernel tests ``@needs_triton_device`` (names containing ``triton_kernel_``) and, for CPU-only
machines, calls :func:`run_under_interpreter` from one test that reruns them with
``TRITON_INTERPRET=1``.
"""

import importlib.util
import os
from pathlib import Path
import re
import subprocess
import sys

import pytest
import torch

HAS_TRITON = importlib.util.find_spec('triton') is not None
INTERPRETER = os.environ.get('TRITON_INTERPRET') == '1'
TRITON_DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'

needs_triton_device = pytest.mark.skipif(
    not HAS_TRITON or not (torch.cuda.is_available() or INTERPRETER),
    reason='needs CUDA, or TRITON_INTERPRET=1 (test_triton_kernels_under_interpreter runs '
           'these in a subprocess)')

# 16-bit output dtypes of a kernel's store, compared bit for bit with a rounded fp32 result:
# bfloat16 only on CUDA, as the interpreter (numpy) rounds fp32 -> bfloat16 toward zero.
STORE_DTYPES_16 = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason='the Triton interpreter (numpy) rounds fp32 -> bfloat16 toward zero'))]

# For the one test per file that reruns the kernel tests under the interpreter.
only_without_gpu = pytest.mark.skipif(
    torch.cuda.is_available() or INTERPRETER or not HAS_TRITON,
    reason='a GPU runs the kernel tests in-process; or already under the interpreter; or no '
           'triton')


def run_under_interpreter(test_file, min_passed: int, keyword=None) -> None:
    """Run ``test_file`` (only tests matching ``keyword``) in a subprocess with
    ``TRITON_INTERPRET=1``; assert it passes with at least ``min_passed`` tests run."""
    test_file = Path(test_file).resolve()
    env = {**os.environ, 'TRITON_INTERPRET': '1'}
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
           *(['-k', keyword] if keyword else []), str(test_file)]
    proc = subprocess.run(cmd, cwd=test_file.parents[2], env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r'(\d+) passed', out)
    assert passed and int(passed.group(1)) >= min_passed, out[-3000:]
