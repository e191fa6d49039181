"""Run test_scan_triton.py under the Triton interpreter in a subprocess (CPU-only machines)."""

from pathlib import Path

from triton_tests import only_without_gpu, run_under_interpreter


@only_without_gpu
def test_triton_kernels_under_interpreter():
    run_under_interpreter(Path(__file__).with_name('test_scan_triton.py'), min_passed=19)
