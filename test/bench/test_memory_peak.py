"""bench/memory_peak.py: replaying an allocator trace to the moment of its peak."""

from bench_modules import load

memory_peak = load('memory_peak')


def _event(action, addr, size, frames=()):
    return {'action': action, 'addr': addr, 'size': size, 'frames': list(frames)}


def test_live_at_peak_lists_the_blocks_alive_at_the_highest_total():
    trace = [
        _event('alloc', 1, 100),
        _event('alloc', 2, 50),
        _event('free_requested', 1, 100),  # not yet free: a stream may still use it
        _event('alloc', 3, 20),  # 170 alive: the peak
        _event('free_completed', 1, 100),
        _event('alloc', 4, 110),  # 50 + 20 + 110 = 180 alive: a new peak
        _event('free_completed', 4, 110),
        _event('free_completed', 9, 999),  # allocated before the history: ignored
        _event('alloc', 5, 10),
    ]
    peak, blocks = memory_peak.live_at_peak(trace)
    assert peak == 180
    assert sorted(b['addr'] for b in blocks) == [2, 3, 4]


def test_live_at_peak_keeps_the_first_moment_of_a_repeated_peak():
    trace = [_event('alloc', 1, 64), _event('free_completed', 1, 64), _event('alloc', 2, 64)]
    peak, blocks = memory_peak.live_at_peak(trace)
    assert peak == 64 and [b['addr'] for b in blocks] == [1]


def test_where_names_the_generated_line_and_our_first_frame(tmp_path):
    generated = tmp_path / 'torchinductor_root' / 'ab' / 'cabc.py'
    generated.parent.mkdir(parents=True)
    generated.write_text('def call(args):\n    buf7 = empty_strided_cuda((4, 8), (8, 1))\n')
    frames = [
        {'filename': '/usr/lib/python3/site-packages/torch/_ops.py', 'line': 10, 'name': 'f'},
        {'filename': str(generated), 'line': 2, 'name': 'call'},
        {'filename': '/repo/mamba_perception/models/vmamba.py', 'line': 124, 'name': 'scan'},
        {'filename': '/repo/mamba_perception/models/other.py', 'line': 5, 'name': 'g'},
    ]
    where = memory_peak.where(frames)
    assert where['generated'] == 'buf7 = empty_strided_cuda((4, 8), (8, 1))'
    assert where['ours'] == 'vmamba.py:124 scan'
