"""Fixtures for the kernel tests.

Triton interpreter (TRITON_INTERPRET=1)
---------------------------------------
``triton.jit`` decides at decoration time whether a function is compiled or interpreted, and
that includes Triton's own library functions (``tl.sum``, ``tl.cdiv``, ...), decorated when
``triton`` is first imported. In a shared pytest process something else (``torch.compile``,
FakeTensor, another test folder) may import Triton first, so the interpreter cannot be switched
on reliably in-process without affecting everyone. Therefore:

* with a GPU, ``test_scan_triton.py`` runs in-process on CUDA (compiled kernels);
* without one, ``test_scan_triton.py`` skips itself in the main process, and
  ``test_scan_triton_interpreter.py`` runs it in a **subprocess** with ``TRITON_INTERPRET=1`` set
  from the start. Nothing in the main process's environment changes.
"""

import importlib.util

import pytest
import torch


def pytest_configure(config):
    # Keep the CPU tests deterministic and within CI's 2 cores.
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _seed_each_test():
    # Each test draws its random inputs from the same seed whatever ran before it: with one
    # seed per session, adding a test elsewhere once changed another test's draw into one whose
    # un-softplused Δ < 0 made the scan overflow (inf - inf) differently in the two paths.
    torch.manual_seed(0)


def _has_triton():
    return importlib.util.find_spec('triton') is not None


@pytest.fixture
def triton_device():
    """(device, launch module) for direct Triton-launcher tests: CUDA, or CPU + interpreter."""
    if not _has_triton():
        pytest.skip('triton is not installed')
    from mamba_perception_kernels.triton import launch

    return ('cuda' if torch.cuda.is_available() else 'cpu'), launch
