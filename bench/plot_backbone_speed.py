r"""Plot backbone latency vs resolution from ``bench/backbone_speed.py`` results; find crossovers.

Reads one or more result JSON files (rows merged; for the same model, size, batch, dtype and
mode a later file's timed row replaces an earlier one) and writes a PNG: p50 latency (ms, log)
against megapixels per image (log), one line per model (ours solid, timm baselines dashed), for
one dtype / batch / mode. ``--mode best`` (the default) takes per point the fastest of the
deployable modes (graph, compile, compile-max). Marks at 1280x720 and 2048x2048.

It also prints, per our model, the crossover against a baseline (ViT-S by default): the
smallest measured size from which on (at it and every larger size where both were measured) our
model's p50 is below the baseline's. ``crossover()`` returns the same as a dict, so the README
can quote it. Only matplotlib (Agg) is needed, imported when a plot is drawn::

    python bench/plot_backbone_speed.py bench/results/backbone_speed_*_h100.json \
        --out bench/results/backbone_speed_h100.png [--dtype fp16 --batch 1 --mode best]
"""

from __future__ import annotations

import argparse
import json
import sys

KEY = ('model', 'size', 'batch', 'dtype', 'mode')
BEST_OF = ('graph', 'compile', 'compile-max')
MODES = ('best', 'eager', *BEST_OF)
MARKS = {'1280x720': 1280 * 720 / 1e6, '2048²': 2048 * 2048 / 1e6}
LABELS = {
    'vmamba_tiny': 'VMamba-T', 'vmamba_small': 'VMamba-S', 'vmamba_base': 'VMamba-B',
    'vim_tiny': 'Vim-T', 'vim_small': 'Vim-S', 'vim_base': 'Vim-B',
    'vit_small_patch16_224': 'ViT-S/16, SDPA', 'deit_small_patch16_224': 'DeiT-S/16, SDPA',
    'convnext_tiny': 'ConvNeXt-T',
}


def is_ours(row: dict) -> bool:
    """Whether a row is one of our backbones (``family``, else the model name)."""
    if 'family' in row:
        return row['family'] == 'ours'
    return row['model'].startswith(('vmamba', 'vim'))


def label(model: str, ours: bool) -> str:
    """Legend label of a model."""
    return f'{LABELS.get(model, model)} ({"ours" if ours else "timm"})'


def megapixels(row: dict) -> float:
    """Megapixels per image of a row."""
    if 'megapixels' in row:
        return float(row['megapixels'])
    h, w = (int(v) for v in row['size'].split('x'))
    return h * w / 1e6


def load_results(paths) -> tuple[list, list]:
    """Rows merged from result files (see the module docstring) and each file's provenance."""
    merged: dict = {}
    provenances = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        provenances.append(data.get('provenance', {}))
        for row in data.get('rows', []):
            key = tuple(row.get(k) for k in KEY)
            if 'p50_ms' in row or 'p50_ms' not in merged.get(key, {}):
                merged[key] = row
    return list(merged.values()), provenances


def series(rows, dtype: str = 'fp16', batch: int = 1, mode: str = 'best') -> dict:
    """Per model, its timed points ``[(megapixels, p50_ms, size, mode), ...]`` by size.

    ``mode='best'`` keeps, per model and size, the fastest of graph / compile / compile-max;
    rows with an error or skipped (no ``p50_ms``) are left out.
    """
    if mode not in MODES:
        raise ValueError(f'mode {mode!r} is not one of {MODES}')
    modes = BEST_OF if mode == 'best' else (mode,)
    best: dict = {}
    for row in rows:
        if (row.get('dtype') != dtype or row.get('batch') != batch or row.get('mode') not in modes
                or row.get('p50_ms') is None):
            continue
        key = (row['model'], row['size'])
        if key not in best or row['p50_ms'] < best[key]['p50_ms']:
            best[key] = row
    out: dict = {}
    for (model, size), row in best.items():
        out.setdefault(model, []).append((megapixels(row), row['p50_ms'], size, row['mode']))
    return {m: sorted(pts) for m, pts in out.items()}


def crossover(rows, baseline: str = 'vit_small_patch16_224', dtype: str = 'fp16',
              batch: int = 1, mode: str = 'best') -> dict:
    """Per our model, the first size from which on it is faster (p50) than ``baseline``.

    Only sizes where both were measured count. Returns ``{model: None}`` where the model is not
    faster at the largest common size, else ``{model: {'size', 'megapixels', 'ms',
    'baseline_ms', 'speedup', 'mode'}}`` for the smallest size from which on every common size
    is faster (``speedup`` = baseline_ms / ms there).
    """
    pts = series(rows, dtype, batch, mode)
    base = {size: ms for _, ms, size, _ in pts.get(baseline, [])}
    ours = sorted({r['model'] for r in rows if is_ours(r)})
    result: dict = {}
    for model in ours:
        common = [p for p in pts.get(model, []) if p[2] in base]
        first = None
        for mp, ms, size, how in reversed(common):  # walk down from the largest size
            if ms >= base[size]:
                break
            first = {'size': size, 'megapixels': round(mp, 4), 'ms': ms,
                     'baseline_ms': base[size], 'speedup': round(base[size] / ms, 3),
                     'mode': how}
        result[model] = first
    return result


def describe(cross: dict, rows, baseline: str, dtype: str, batch: int, mode: str) -> list:
    """One line per model, for printing."""
    pts = series(rows, dtype, batch, mode)
    base = {size: ms for _, ms, size, _ in pts.get(baseline, [])}
    lines = [f'crossover vs {baseline} ({dtype}, batch {batch}, mode {mode}):']
    for model, c in cross.items():
        common = [p for p in pts.get(model, []) if p[2] in base]
        if c is not None:
            lines.append(f'  {model}: faster from {c["size"]} ({c["megapixels"]:.2f} MP) on: '
                         f'{c["ms"]:.2f} vs {c["baseline_ms"]:.2f} ms ({c["speedup"]:.2f}x)')
        elif common:
            mp, ms, size, _ = common[-1]
            lines.append(f'  {model}: not faster up to {size} ({mp:.2f} MP): {ms:.2f} vs '
                         f'{base[size]:.2f} ms ({ms / base[size]:.2f}x the time)')
        else:
            lines.append(f'  {model}: no size measured for both')
    return lines


def plot(rows, out: str, dtype: str = 'fp16', batch: int = 1, mode: str = 'best',
         baseline: str = 'vit_small_patch16_224', title: str | None = None) -> str:
    """Write the latency-vs-megapixels PNG to ``out`` (matplotlib, Agg); returns ``out``."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError('plotting needs matplotlib: pip install matplotlib') from None
    matplotlib.use('Agg', force=True)
    import matplotlib.pyplot as plt

    pts = series(rows, dtype, batch, mode)
    if not pts:
        raise ValueError(f'no timed rows for dtype {dtype}, batch {batch}, mode {mode}')
    ours = {r['model'] for r in rows if is_ours(r)}
    cross = crossover(rows, baseline, dtype, batch, mode)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    order = list(LABELS)
    for model in sorted(pts, key=lambda m: (m not in ours, order.index(m) if m in order
                                            else len(order), m)):
        xs = [p[0] for p in pts[model]]
        ys = [p[1] for p in pts[model]]
        mine = model in ours
        (line,) = ax.plot(xs, ys, '-' if mine else '--', marker='o' if mine else 's',
                          markersize=4, linewidth=1.8 if mine else 1.4, label=label(model, mine))
        c = cross.get(model)
        if c is not None:
            ax.plot([c['megapixels']], [c['ms']], marker='*', markersize=13,
                    color=line.get_color(), zorder=5)
    for name, mp in MARKS.items():
        ax.axvline(mp, color='0.6', linestyle=':', linewidth=1)
        ax.annotate(name, (mp, 1), xycoords=('data', 'axes fraction'), xytext=(3, -12),
                    textcoords='offset points', fontsize=8, color='0.35')
    xs = [p[0] for points in pts.values() for p in points] + list(MARKS.values())
    ax.set_xlim(min(xs) / 1.3, max(xs) * 1.6)  # room for the marks' labels
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('megapixels per image')
    ax.set_ylabel('p50 latency (ms)')
    how = 'fastest of graph / compile' if mode == 'best' else mode
    heading = title or f'Backbone forward, {dtype}, batch {batch}, {how}'
    ax.set_title(f'{heading}\n★: faster than {LABELS.get(baseline, baseline)} from this size on',
                 fontsize=10)
    ax.grid(True, which='both', alpha=0.25)
    ax.legend(fontsize=8, loc='lower right')  # upper left: the 1280x720 mark's label
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('results', nargs='+', help='backbone_speed.py JSON files')
    parser.add_argument('--out', default='bench/results/backbone_speed.png', help='PNG path')
    parser.add_argument('--dtype', default='fp16')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--mode', default='best', choices=MODES)
    parser.add_argument('--baseline', default='vit_small_patch16_224')
    parser.add_argument('--title')
    args = parser.parse_args(argv)
    rows, provenances = load_results(args.results)
    cross = crossover(rows, args.baseline, args.dtype, args.batch, args.mode)
    print('\n'.join(describe(cross, rows, args.baseline, args.dtype, args.batch, args.mode)))
    gpus = sorted({p.get('gpu') for p in provenances if p.get('gpu')})
    title = args.title
    if title is None and gpus:
        how = 'fastest of graph / compile' if args.mode == 'best' else args.mode
        title = f'Backbone forward on {", ".join(gpus)}, {args.dtype}, batch {args.batch}, {how}'
    try:
        plot(rows, args.out, args.dtype, args.batch, args.mode, args.baseline, title)
    except (RuntimeError, ValueError) as exc:
        print(f'no plot: {exc}', file=sys.stderr)
        return 2
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
