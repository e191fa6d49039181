"""bench/plot_backbone_speed.py on hand-made results; backbone_speed.py's CLI without CUDA."""

import json

from bench_modules import load
import pytest

plot_speed = load('plot_backbone_speed')

SIZES = ['224x224', '512x512', '720x1280', '1024x1024', '1248x1248', '2048x2048']
# p50 ms per size (same order as SIZES); None: no row. Crossovers vs ViT-S by construction:
GRAPH = {
    'vit_small_patch16_224': [1.0, 1.2, 2.4, 2.6, 4.3, 30.0],
    'convnext_tiny': [0.7, 0.9, 1.5, 1.6, 2.4, 5.5],
    'vmamba_tiny': [0.9, 2.8, 6.8, 7.2, 12.7, 29.0],  # faster at 224 and 2048 only -> 2048
    'vim_tiny': [0.5, 0.6, 1.0, 1.1, 1.5, 3.0],       # faster everywhere -> 224
    'vim_small': [3.7, 8.1, 18.9, 21.1, 28.2, 90.0],  # never faster -> None
}
COMPILE = {
    'vit_small_patch16_224': [None, None, None, None, 4.2, 29.5],
    'vmamba_tiny': [None, None, None, None, 4.0, 25.0],  # best-of: faster from 1248 on
}


def rows():
    out = []

    def add(model, mode, values, **extra):
        for size, ms in zip(SIZES, values, strict=True):
            if ms is None:
                continue
            h, w = (int(v) for v in size.split('x'))
            out.append({'model': model, 'family': 'timm' if model in (
                'vit_small_patch16_224', 'convnext_tiny') else 'ours', 'size': size,
                'height': h, 'width': w, 'megapixels': round(h * w / 1e6, 4), 'batch': 1,
                'dtype': 'fp16', 'mode': mode, 'p50_ms': ms, 'p90_ms': ms * 1.05, **extra})

    for model, values in GRAPH.items():
        add(model, 'graph', values)
        add(model, 'eager', [v + 20 for v in values])  # launch-bound: never the best
    for model, values in COMPILE.items():
        add(model, 'compile', values, compile_s=60.0)
    # Rows that must not count: other batch / dtype, an error, a skipped row.
    out.append({'model': 'vim_small', 'family': 'ours', 'size': '2048x2048', 'batch': 4,
                'dtype': 'fp16', 'mode': 'graph', 'p50_ms': 0.01})
    out.append({'model': 'vim_small', 'family': 'ours', 'size': '2048x2048', 'batch': 1,
                'dtype': 'bf16', 'mode': 'graph', 'p50_ms': 0.01})
    out.append({'model': 'vim_small', 'family': 'ours', 'size': '2048x2048', 'batch': 1,
                'dtype': 'fp16', 'mode': 'compile', 'error': 'OOM: ...'})
    out.append({'model': 'vit_small_patch16_224', 'family': 'timm', 'size': '1024x1024',
                'batch': 1, 'dtype': 'fp16', 'mode': 'compile', 'skipped': 'budget'})
    return out


def write(path, rows_):
    path.write_text(json.dumps({'provenance': {'gpu': 'Test GPU'}, 'what': 'synthetic',
                                'rows': rows_}))
    return path


def test_crossover_best_of_graph_and_compile():
    cross = plot_speed.crossover(rows())
    assert set(cross) == {'vmamba_tiny', 'vim_tiny', 'vim_small'}
    assert cross['vmamba_tiny']['size'] == '1248x1248'
    assert cross['vmamba_tiny']['mode'] == 'compile'
    assert cross['vmamba_tiny']['ms'] == 4.0 and cross['vmamba_tiny']['baseline_ms'] == 4.2
    assert cross['vim_tiny']['size'] == '224x224'
    assert cross['vim_small'] is None


def test_crossover_one_mode_and_other_baseline():
    graph = plot_speed.crossover(rows(), mode='graph')
    assert graph['vmamba_tiny']['size'] == '2048x2048'  # faster at 224 too, but not from there
    assert graph['vmamba_tiny']['speedup'] == pytest.approx(30.0 / 29.0, abs=1e-3)
    assert plot_speed.crossover(rows(), mode='eager')['vim_tiny']['size'] == '224x224'
    vs_convnext = plot_speed.crossover(rows(), baseline='convnext_tiny')
    assert all(v is None for k, v in vs_convnext.items() if k != 'vim_tiny')
    assert vs_convnext['vim_tiny']['size'] == '224x224'  # below ConvNeXt-T at every size
    assert all(v is None for v in plot_speed.crossover(rows(), batch=4).values())


def test_load_results_merges_files(tmp_path, capsys):
    all_rows = rows()
    first = write(tmp_path / 'a.json', all_rows)
    # A later file re-times one point and fails another: the re-timed row wins, the error not.
    retimed = dict(next(r for r in all_rows if r['model'] == 'vim_small'
                        and r['size'] == '2048x2048' and r['mode'] == 'graph'), p50_ms=20.0)
    failed = dict(next(r for r in all_rows if r['model'] == 'vim_tiny'
                       and r['size'] == '224x224' and r['mode'] == 'graph'), error='OOM')
    del failed['p50_ms']
    second = write(tmp_path / 'b.json', [retimed, failed])
    merged, provenances = plot_speed.load_results([first, second])
    assert len(merged) == len(all_rows) and len(provenances) == 2
    cross = plot_speed.crossover(merged)
    assert cross['vim_small']['size'] == '2048x2048'  # 20 < 29.5 at 2048 only
    assert cross['vim_tiny']['size'] == '224x224'     # the earlier timed row stayed


def test_plot_writes_png(tmp_path, capsys):
    pytest.importorskip('matplotlib')
    path = write(tmp_path / 'r.json', rows())
    out = tmp_path / 'speed.png'
    assert plot_speed.main([str(path), '--out', str(out)]) == 0
    assert out.stat().st_size > 0
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    printed = capsys.readouterr().out
    assert 'vmamba_tiny: faster from 1248x1248' in printed
    assert 'vim_small: not faster up to 2048x2048' in printed
    assert plot_speed.main([str(path), '--out', str(out), '--dtype', 'int8']) == 2


def test_percentile_matches_numpy_convention():
    common = load('common')
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert common.percentile(xs, 50) == 3.0
    assert common.percentile(xs, 90) == pytest.approx(4.6)
    assert common.percentile([7.0], 90) == 7.0
    with pytest.raises(ValueError):
        common.percentile([], 50)


def test_backbone_speed_cli_without_cuda(monkeypatch, capsys):
    torch = pytest.importorskip('torch')
    speed = load('backbone_speed')
    with pytest.raises(SystemExit) as exit_info:
        speed.main(['--help'])
    assert exit_info.value.code == 0
    assert '--budget-s' in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert speed.main(['--models', 'vmamba_tiny', '--sizes', '224x224']) == 2
    assert 'needs a CUDA GPU' in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        speed.main(['--sizes', '720by1280'])
    assert exit_info.value.code == 2
    plan = speed.plan(speed.parse_args(['--modes', 'compile', 'graph', 'eager', '--models',
                                        'vim_tiny', 'convnext_tiny', '--sizes', '224x224',
                                        '512x512', '--batches', '1', '--dtypes', 'fp16']))
    assert [t[0] for t in plan] == ['static'] * 4 + ['check'] + ['compiled'] * 4
    assert plan[0] == ('static', 'vim_tiny', (224, 224), 1, 'fp16', ('eager', 'graph'))
    assert plan[-1] == ('compiled', 'convnext_tiny', (512, 512), 1, 'fp16', 'compile')
    plan = speed.plan(speed.parse_args(['--modes', 'eager', 'compile', '--models', 'vim_tiny',
                                        'vmamba_tiny', '--sizes', '224x224', '512x512',
                                        '--batches', '1', '--dtypes', 'fp16', '--no-check',
                                        '--compile-sizes', '720x1280', '--compile-models',
                                        'vit_small_patch16_224', 'vim_tiny']))
    assert plan[4:] == [('compiled', 'vit_small_patch16_224', (720, 1280), 1, 'fp16', 'compile'),
                        ('compiled', 'vim_tiny', (720, 1280), 1, 'fp16', 'compile')]
    assert plan[0][5] == ('eager',) and len(plan) == 6
