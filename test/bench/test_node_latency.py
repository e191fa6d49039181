"""bench/node_latency.py's trace summary (what comes back from the GPU host, not the trace)."""

import json

from bench_modules import load

node_latency = load('node_latency')


def test_gpu_timeline_summarises_a_trace(tmp_path):
    events = [
        {'cat': 'kernel', 'name': 'gemm', 'ts': 0, 'dur': 10, 'args': {'stream': 7}},
        {'cat': 'kernel', 'name': 'nms', 'ts': 5, 'dur': 10, 'args': {'stream': 9}},
        {'cat': 'kernel', 'name': 'gemm', 'ts': 30, 'dur': 5, 'args': {'stream': 7}},
        {'cat': 'kernel', 'name': 'no duration', 'ts': 40},
        {'cat': 'cuda_runtime', 'name': 'cudaLaunchKernel', 'ts': 0, 'dur': 3, 'tid': 11},
        {'cat': 'cuda_runtime', 'name': 'cudaLaunchKernel', 'ts': 4, 'dur': 2, 'tid': 11},
        {'cat': 'cuda_runtime', 'name': 'cudaStreamSynchronize', 'ts': 0, 'dur': 300,
         'tid': 12},
        {'cat': 'cpu_op', 'name': 'aten::add', 'ts': 0, 'dur': 50, 'tid': 11},
    ]
    path = tmp_path / 'trace.json'
    path.write_text(json.dumps({'traceEvents': events}))
    got = node_latency.gpu_timeline(str(path))
    assert got['kernels'] == 3
    assert got['window_ms'] == 0.035 and got['gpu_busy_ms'] == 0.02  # union: [0, 15] + [30, 35]
    assert got['kernel_ms_per_stream'] == {'7': 0.015, '9': 0.01}
    assert got['top_kernels'] == [{'name': 'gemm', 'ms': 0.015, 'calls': 2},
                                  {'name': 'nms', 'ms': 0.01, 'calls': 1}]
    assert got['cuda_runtime_per_thread'] == {
        '11': [{'name': 'cudaLaunchKernel', 'ms': 0.005, 'calls': 2}],
        '12': [{'name': 'cudaStreamSynchronize', 'ms': 0.3, 'calls': 1}]}
