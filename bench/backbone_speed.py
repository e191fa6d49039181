r"""Backbone latency and peak memory vs input resolution, ours beside timm baselines (issue #8).

Per row: one backbone forward at one input size (HxW), batch, autocast dtype and execution mode;
its per-call latency (p50 / p90 over CUDA-event samples, ``bench.common.sample_cuda``) and peak
GPU memory.

* Ours (``mamba_perception.models.create_model``: vmamba_tiny/small/base, vim_tiny/small) run
  ``forward_intermediates`` (the 4 dense maps at strides 4-32 that a detector / segmenter
  takes). Baselines from timm (``pretrained=False``, no head, nothing downloaded) run
  ``forward_features``: vit_small_patch16_224 (``dynamic_img_size=True``, SDPA attention),
  convnext_tiny; deit_small_patch16_224 is the same network as ViT-S (weights differ) and is
  timed only when named in ``--models``.
* Modes: ``eager`` (CUDA events around each eager call: includes the GPU idling on kernel
  launches), ``graph`` (the eager forward captured in a CUDA graph and replayed), ``compile``
  (``torch.compile(fwd, dynamic=False)``, inductor's default mode, then captured in a CUDA graph
  and replayed; ``compile_s`` = its first call, compilation included), ``compile-max`` (the same
  with ``mode='max-autotune-no-cudagraphs'``; autotuning takes minutes). Ours compile with
  ``pipeline.COMPILE_OPTIONS`` as Pipeline does (since 2026-11-28), the timm baselines with
  inductor's defaults (``compile_kwargs_for``). Compiled rows also
  give ``vs_eager_rel_l2``: the compiled forward's outputs against the eager ones.
* Weights (``--weights``): ``cast`` (default) stores every model's Linear / Conv parameters in
  the row's dtype once (``cast_autocast_weights``, what Pipeline does for fp16 / bf16), for ours
  and the baselines alike; ``autocast`` keeps them fp32 and lets autocast cast them on every
  call (one copy kernel per layer per forward: the setting of the rows before 2026-11-27).
* Memory: ``peak_mem_mib`` = ``max_memory_allocated`` over one warm forward of the mode's
  function (eager, or compiled; before any graph capture), minus what was allocated besides
  this model's weights and input just before it (so: weights, input, activations and outputs;
  other rows' models and one-time allocations of the warm-up calls, such as cuBLAS's
  workspace, are left out of every row alike; rows before 2026-11-28 counted from the row's
  start, which put the workspace into a process's first row only), and
  ``peak_mem_above_weights_mib`` = that minus ``weights_mib``.
* Numerics (``checks``), per our model at ``--check-size``, batch 1: fp16 and bf16 autocast
  outputs against the fp32 path (TF32 off) of the same weights, relative L2 error of each of
  the 4 feature maps, with the tolerance used (random-init weights: no checkpoint is loaded).
* Fits a 10-minute command: rows run in the order eager / graph (sizes ascending, all models
  per size), numerics checks, then compiled modes; a row not expected to finish within
  ``--budget-s`` (counted from the start) is recorded as skipped, a row still running at the
  deadline is interrupted and recorded, and the JSON is rewritten after every row. On a fresh
  machine the first forward of each kernel family and dtype includes Triton's JIT compilation
  (``first_call_s`` of the rows; the progress lines show where the time goes).

Needs CUDA, and timm for the baselines (bench only: the package does not use timm). Examples::

    python bench/backbone_speed.py --dtypes fp16 --modes eager graph \
        --out bench/results/backbone_speed_fp16_h100.json
    python bench/backbone_speed.py --modes compile --dtypes fp16 --batches 1 --no-check \
        --models vmamba_tiny vim_small vit_small_patch16_224 --sizes 720x1280 2048x2048 \
        --out bench/results/backbone_speed_compile_h100.json
    python bench/plot_backbone_speed.py bench/results/backbone_speed_*_h100.json \
        --out bench/results/backbone_speed_h100.png
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import signal
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    add_lowrank_tuning_option,
    add_persistent_norms_option,
    apply_inductor_config,
    apply_lowrank_tuning_option,
    apply_persistent_norms_option,
    capture_graph,
    compile_kwargs,
    compile_model,
    parse_size,
    provenance,
    sample_cuda,
    write_json,
)

from mamba_perception.models import MODELS, create_model  # noqa: E402
from mamba_perception.models.layers import cast_autocast_weights  # noqa: E402

OURS = ['vmamba_tiny', 'vmamba_small', 'vmamba_base', 'vim_tiny', 'vim_small']
BASELINES = ['vit_small_patch16_224', 'convnext_tiny']
SAME_NETWORK = {'deit_small_patch16_224': 'vit_small_patch16_224'}
SIZES = ['224x224', '512x512', '720x1280', '1024x1024', '1248x1248', '1088x1920', '2048x2048']
DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}
MODES = ['eager', 'graph', 'compile', 'compile-max']
STATIC_MODES = ('eager', 'graph')
COMPILE_MODES = {'compile': None, 'compile-max': 'max-autotune-no-cudagraphs'}  # mode=
# Fallback row-time estimates (s) until a row of the same kind has been timed in this run
# ('kind/family' first, then 'kind'). Seen on an H100: a compiled VMamba-T row ~40 s, ViT-S
# ~10 s; one VMamba-T compile-max row did not finish in 290 s.
DEFAULT_EST_S = {'check': 20.0, 'static': 10.0, 'compile': 90.0, 'compile-max': 300.0,
                 'compile/ours': 50.0, 'compile/timm': 20.0, 'compile-max/ours': 400.0}
# Relative L2 error allowed for autocast outputs vs fp32: about 10x the unit roundoff-driven
# error seen through these depths (fp16: 2^-11 mantissa, bf16: 2^-8, hence 8x fp16's).
CHECK_TOL = {'fp16': 1e-2, 'bf16': 8e-2}
STICKY_CUDA = ('illegal memory access', 'device-side assert', 'unspecified launch failure',
               'misaligned address', 'illegal instruction')


class BudgetInterrupt(BaseException):
    """Raised by SIGALRM at the --budget-s deadline (BaseException: no library swallows it)."""


def size_key(hw) -> str:
    return f'{hw[0]}x{hw[1]}'


def family(name: str) -> str:
    return 'ours' if name in MODELS else 'timm'


def rel_l2(out, ref) -> float:
    """Relative L2 error ``|out - ref| / |ref|`` in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def as_list(outs) -> list:
    return list(outs) if isinstance(outs, (list, tuple)) else [outs]


def short_error(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return 'OOM: ' + str(exc).split('\n')[0][:300]
    text = f'{type(exc).__name__}: {exc}'.strip()
    lines = [ln for ln in text.split('\n') if ln.strip()]
    return ' | '.join(lines[:3] + (['...', lines[-1]] if len(lines) > 4 else lines[3:]))[:800]


def free_memory() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


class Models:
    """Built models, kept on the GPU while the run needs them (one build per model)."""

    def __init__(self, seed: int, notes: dict, cast_weights: bool) -> None:
        self.seed = seed
        self.built: dict = {}
        self.notes = notes  # facts found while building (ViT's attention path), into the JSON
        self.cast_weights = cast_weights

    def get(self, name: str, dtype: str | None = None):
        """(model, forward, weights bytes) for ``name``, built on first use.

        With ``dtype`` (a key of DTYPES) and ``cast_weights``: a copy of the same weights whose
        Linear / Conv parameters are stored in that dtype (``cast_autocast_weights``, as
        Pipeline does for fp16 / bf16); otherwise the fp32 model.
        """
        if dtype is not None and self.cast_weights:
            if (name, dtype) not in self.built:
                model, _, _ = self.get(name)
                cast = cast_autocast_weights(copy.deepcopy(model), DTYPES[dtype])
                self.built[(name, dtype)] = self._entry(cast, name)
            return self.built[(name, dtype)]
        if name not in self.built:
            torch.manual_seed(self.seed)
            if family(name) == 'ours':
                model = create_model(name)
                fwd_name = 'forward_intermediates'
            else:
                import timm

                try:  # ViT-like: any input size (position embedding resampled per call)
                    model = timm.create_model(name, pretrained=False, num_classes=0,
                                              dynamic_img_size=True)
                except TypeError:  # CNNs take any size and have no such argument
                    model = timm.create_model(name, pretrained=False, num_classes=0)
                fwd_name = 'forward_features'
                attn = getattr(getattr(model, 'blocks', [None])[0], 'attn', None)
                if attn is not None and hasattr(attn, 'fused_attn'):
                    self.notes[f'{name}_sdpa_attention'] = bool(attn.fused_attn)
            model.forward_name = fwd_name
            self.built[name] = self._entry(model.cuda().eval(), name)
        return self.built[name]

    @staticmethod
    def _entry(model, name: str):
        nbytes = sum(t.numel() * t.element_size()
                     for t in [*model.parameters(), *model.buffers()])
        return model, getattr(model, model.forward_name), nbytes


def autocast_step(fn, x, dtype):
    """Return the timed call: ``fn(x)`` under no_grad and autocast (cache off, as Pipeline)."""
    def step():
        with torch.no_grad(), torch.autocast('cuda', dtype=dtype, cache_enabled=False):
            return fn(x)
    return step


def peak_of(step, weights_bytes: int, input_bytes: int) -> dict:
    """Peak memory of one ``step()`` (already warm), counted as the module docstring says.

    What is allocated just before it, less the weights and the input, is left out: earlier
    rows' models and whatever the warm-up calls left behind for good (cuBLAS's workspace is
    allocated at a process's first GEMM, ~40 MiB on an H200, which counting from the row's
    start put into the first row's peak only).
    """
    torch.cuda.synchronize()
    others_bytes = torch.cuda.memory_allocated() - weights_bytes - input_bytes
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - others_bytes
    return {'weights_mib': round(weights_bytes / 2**20, 1),
            'peak_mem_mib': round(peak / 2**20, 1),
            'peak_mem_above_weights_mib': round((peak - weights_bytes) / 2**20, 1)}


def n_iters(one_call_ms: float, args) -> int:
    want = math.ceil(args.target_s * 1e3 / max(one_call_ms, 1e-3))
    return int(min(args.max_iters, max(args.min_iters, want)))


def timed_once_ms(run) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def timing_fields(stats: dict, what: str) -> dict:
    return {'p50_ms': round(stats['p50_ms'], 4), 'p90_ms': round(stats['p90_ms'], 4),
            'mean_ms': round(stats['mean_ms'], 4), 'min_ms': round(stats['min_ms'], 4),
            'iters': stats['iters'],
            'timing': f'{what}: CUDA events around each of {stats["iters"]} back-to-back calls',
            'samples_ms': [round(s, 4) for s in stats['samples_ms']]}


def inputs(batch: int, hw, seed: int):
    gen = torch.Generator(device='cuda').manual_seed(seed)
    return torch.randn(batch, 3, *hw, device='cuda', generator=gen)


# --------------------------------------------------------------------------------------------
# The three kinds of task


def run_check(models: Models, name: str, hw, seed: int) -> dict:
    """fp16 / bf16 autocast vs fp32 (TF32 off) of the same weights, per feature map."""
    model, fwd, _ = models.get(name)
    x = inputs(1, hw, seed)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            ref = [r.float() for r in as_list(fwd(x))]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    out = {'size': size_key(hw), 'batch': 1, 'reference': 'fp32, TF32 off, same weights',
           'metric': 'relative L2 error of each of the 4 feature maps (strides 4, 8, 16, 32)'}
    for dt, dtype in DTYPES.items():
        fwd = models.get(name, dt)[1]
        with torch.no_grad(), torch.autocast('cuda', dtype=dtype, cache_enabled=False):
            got = as_list(fwd(x))
        errs = [rel_l2(g, r) for g, r in zip(got, ref, strict=True)]
        finite = all(bool(torch.isfinite(g).all()) for g in got)
        out[dt] = {'rel_l2': [float(f'{e:.3g}') for e in errs], 'max_rel_l2': max(errs),
                   'tol': CHECK_TOL[dt], 'finite': finite,
                   'ok': finite and max(errs) <= CHECK_TOL[dt]}
    return out


def run_static(models: Models, name: str, hw, batch: int, dt: str, modes, args) -> list:
    """Eager and / or CUDA-graph rows of one (model, size, batch, dtype) case."""
    model, fwd, wbytes = models.get(name, dt)
    free_memory()
    x = inputs(batch, hw, args.seed)
    step = autocast_step(fwd, x, DTYPES[dt])
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    step()
    mem = peak_of(step, wbytes, x.nbytes)
    iters = n_iters(timed_once_ms(step), args)
    rows = []
    for mode in modes:
        row = {'first_call_s': round(first_s, 3), **mem}
        try:
            if mode == 'eager':
                stats = sample_cuda(step, iters=iters, warmup=1)
                row.update(timing_fields(stats, 'eager calls'))
            else:
                graph = capture_graph(step)
                replay_ms = timed_once_ms(graph.replay)
                stats = sample_cuda(graph.replay, iters=n_iters(replay_ms, args), warmup=2)
                row.update(timing_fields(stats, 'CUDA-graph replays of the eager forward'))
                del graph
        except Exception as exc:  # noqa: BLE001 - one failed mode must not stop the others
            row = {'error': short_error(exc), **mem}
        rows.append(row)
        free_memory()
    return rows


def compile_kwargs_for(name: str, mode: str, settings=()) -> dict:
    """``torch.compile`` keyword arguments of a compiled row (``mode``: a key of COMPILE_MODES).

    Ours compile as Pipeline does (``pipeline.COMPILE_OPTIONS``, less what ``settings``, the
    --inductor-config strings, ablate); the timm baselines as a user compiles them: inductor's
    defaults for the mode, as the anchors were measured.
    """
    return compile_kwargs(COMPILE_MODES[mode], settings, baseline=family(name) == 'timm')


def run_compiled(models: Models, name: str, hw, batch: int, dt: str, mode: str,
                 args) -> dict:
    """One torch.compile row: compile, first call, peak memory, check vs eager, graph replay."""
    model, fwd, wbytes = models.get(name, dt)
    torch._dynamo.reset()  # fresh caches: no recompile against an earlier row's shapes
    free_memory()
    x = inputs(batch, hw, args.seed)
    kwargs = compile_kwargs_for(name, mode, args.inductor_config)
    compiled = compile_model(fwd, baseline=family(name) == 'timm', dynamic=False, **kwargs)
    step = autocast_step(compiled, x, DTYPES[dt])
    counters = torch._dynamo.utils.counters
    counters.clear()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    step()
    row = {'compile_s': round(compile_s, 2),
           'compile_options': {'dynamic': False, 'mode': COMPILE_MODES[mode], **kwargs},
           'graph_breaks': sum(counters['graph_break'].values()),
           'unique_graphs': counters['stats'].get('unique_graphs', None)}
    row.update(peak_of(step, wbytes, x.nbytes))
    with torch.no_grad(), torch.autocast('cuda', dtype=DTYPES[dt], cache_enabled=False):
        ref = as_list(fwd(x))
    got = as_list(step())
    err = max(rel_l2(g, r) for g, r in zip(got, ref, strict=True))
    row['vs_eager_rel_l2'] = float(f'{err:.3g}')
    del ref, got
    graph = capture_graph(step)
    stats = sample_cuda(graph.replay, iters=n_iters(timed_once_ms(graph.replay), args), warmup=2)
    row.update(timing_fields(stats, 'CUDA-graph replays of the compiled forward'))
    del graph, compiled, step
    torch._dynamo.reset()
    return row


# --------------------------------------------------------------------------------------------
# Budget, plan, table


class Budget:
    """Wall-clock budget: skips tasks not expected to fit, interrupts one still running."""

    def __init__(self, seconds: float) -> None:
        self.t0 = time.monotonic()
        self.deadline = self.t0 + seconds if seconds > 0 else None
        self.seen: dict = {}
        self.stopped = None  # reason once the run stops starting tasks

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def estimate(self, kind: str) -> float:
        """Median of the last 3 tasks of this kind (one Triton JIT outlier does not count)."""
        seen = self.seen.get(kind)
        if seen:
            return statistics.median(seen[-3:])
        return DEFAULT_EST_S.get(kind, DEFAULT_EST_S[kind.split('/')[0]])

    def fits(self, kind: str) -> bool:
        return self.estimate(kind) <= self.left()

    def record(self, kind: str, seconds: float) -> None:
        self.seen.setdefault(kind, []).append(seconds)

    def arm(self) -> None:
        if self.deadline is None or not hasattr(signal, 'SIGALRM'):
            return

        def on_alarm(signum, frame):
            raise BudgetInterrupt()

        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(max(1, math.ceil(self.left())))


def plan(args) -> list:
    """Tasks in run order: eager / graph cases, numerics checks, compiled rows."""
    tasks = []
    static = [m for m in STATIC_MODES if m in args.modes]
    for dt in args.dtypes:
        for batch in args.batches:
            for hw in args.sizes:
                for m in args.models:
                    if static:
                        tasks.append(('static', m, hw, batch, dt, tuple(static)))
    if args.check:  # after the eager rows: their kernels are compiled by then (fp32's are not)
        tasks += [('check', m) for m in args.models if family(m) == 'ours']
    for mode in [m for m in MODES if m in args.modes and m not in STATIC_MODES]:
        for dt in args.dtypes:
            for batch in args.batches:
                for hw in args.compile_sizes or args.sizes:
                    tasks += [('compiled', m, hw, batch, dt, mode)
                              for m in args.compile_models or args.models]
    return tasks


def row_keys(task) -> list:
    """Identify the rows a task yields (model, size, batch, dtype, mode fields)."""
    _, name, hw, batch, dt, modes = task
    modes = modes if isinstance(modes, tuple) else (modes,)
    return [{'model': name, 'family': family(name), 'size': size_key(hw), 'height': hw[0],
             'width': hw[1], 'megapixels': round(hw[0] * hw[1] / 1e6, 4), 'batch': batch,
             'dtype': dt, 'mode': mode} for mode in modes]


def table(rows: list) -> str:
    """p50 ms per model x size, one block per (dtype, batch, mode)."""
    lines = []
    groups = sorted({(r['dtype'], r['batch'], MODES.index(r['mode'])) for r in rows})
    for dt, batch, mi in groups:
        mode = MODES[mi]
        block = [r for r in rows if (r['dtype'], r['batch'], r['mode']) == (dt, batch, mode)]
        sizes = sorted({r['size'] for r in block},
                       key=lambda s: (math.prod(int(v) for v in s.split('x')), s))
        names = list(dict.fromkeys(r['model'] for r in block))
        lines.append(f'\n{dt} batch {batch} {mode}: p50 ms (peak MiB)')
        lines.append(f'{"model":24s}' + ''.join(f'{s:>18s}' for s in sizes))
        for name in names:
            cells = []
            for s in sizes:
                r = next((r for r in block if r['model'] == name and r['size'] == s), None)
                if r is None:
                    cells.append('-')
                elif 'p50_ms' in r:
                    cells.append(f'{r["p50_ms"]:.2f} ({r.get("peak_mem_mib", 0):.0f})')
                elif 'skipped' in r:
                    cells.append('skip')
                else:
                    cells.append('OOM' if r.get('error', '').startswith('OOM') else 'error')
            lines.append(f'{name:24s}' + ''.join(f'{c:>18s}' for c in cells))
    return '\n'.join(lines)


def print_row(row: dict) -> None:
    head = (f'{row["dtype"]} b{row["batch"]} {row["size"]:>9s} {row["mode"]:11s} '
            f'{row["model"]:24s}')
    if 'p50_ms' in row:
        extra = f'  compile {row["compile_s"]:.1f} s' if 'compile_s' in row else ''
        print(f'{head} p50 {row["p50_ms"]:9.3f}  p90 {row["p90_ms"]:9.3f} ms  peak '
              f'{row["peak_mem_mib"]:8.1f} MiB{extra}', flush=True)
    else:
        print(f'{head} {row.get("skipped") or row.get("error")}', flush=True)


# --------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='bench/results/backbone_speed_h100.json')
    parser.add_argument('--models', nargs='+', default=OURS + BASELINES,
                        help=f'ours ({", ".join(sorted(MODELS))}) or timm model names '
                             f'(default: %(default)s)')
    parser.add_argument('--sizes', nargs='+', type=parse_size, default=SIZES,
                        help='HxW (default: %(default)s)')
    parser.add_argument('--batches', nargs='+', type=int, default=[1, 4])
    parser.add_argument('--dtypes', nargs='+', choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument('--modes', nargs='+', choices=MODES, default=['eager', 'graph'],
                        help='default: eager graph (compile rows cost ~1 min each)')
    parser.add_argument('--compile-sizes', nargs='+', type=parse_size,
                        help='sizes of the compiled rows (default: --sizes)')
    parser.add_argument('--compile-models', nargs='+',
                        help='models of the compiled rows, in this order (default: --models)')
    parser.add_argument('--budget-s', type=float, default=540.0,
                        help='wall-clock budget from start; 0: none (default: %(default)s)')
    parser.add_argument('--target-s', type=float, default=0.3,
                        help='time spent sampling one row (default: %(default)s)')
    parser.add_argument('--min-iters', type=int, default=10)
    parser.add_argument('--max-iters', type=int, default=200)
    parser.add_argument('--check-size', type=parse_size, default=(224, 224))
    parser.add_argument('--no-check', dest='check', action='store_false',
                        help='skip the fp16 / bf16 vs fp32 numerics checks')
    parser.add_argument('--cudnn-benchmark', action='store_true')
    parser.add_argument('--inductor-freezing', action='store_true',
                        help='torch._inductor.config.freezing = True for the compiled rows: '
                             'parameter-only computations (e.g. -exp(A_logs)) folded into '
                             'constants at compile time')
    parser.add_argument('--inductor-config', nargs='+', default=[], metavar='KEY=VALUE',
                        help='torch._inductor.config entries for the compiled rows, e.g. '
                             'coordinate_descent_tuning=true')
    parser.add_argument('--lowrank-impl', choices=('seq', 'expanded'),
                        help="CUDA implementation of ss2d_scan_lowrank (VMamba's scan; default: "
                             "the kernels' TUNING['impl'])")
    parser.add_argument('--weights', choices=('cast', 'autocast'), default='cast',
                        help='cast: Linear / Conv weights stored once in the autocast dtype '
                             '(cast_autocast_weights, as Pipeline does); autocast: fp32 weights '
                             'that autocast casts on every call')
    parser.add_argument('--fused-mlp-max-channels', type=int, default=None,
                        help='widest VMamba stage whose blocks run the fused norm + MLP kernel '
                             '(0: none; default: vmamba.FUSED_MLP_MAX_CHANNELS)')
    parser.add_argument('--prenorm-layout', choices=('linear', 'padded_t'), default=None,
                        help="weight layout of the fused MLP kernel (prenorm TUNING['layout'] "
                             'for every width; default: as TUNING says)')
    parser.add_argument('--fused-tail-max-channels', type=int, default=None,
                        help='widest VMamba d_inner whose SS2D out_norm -> out_proj -> residual '
                             'runs as one kernel (default: vmamba.FUSED_SS2D_TAIL_MAX_CHANNELS)')
    parser.add_argument('--ss2d-parts-max-steps', type=int, default=None,
                        help='largest map whose compiled SS2D scan returns its row / column '
                             'routes as two parts added in out_norm (0: off; default: '
                             'vmamba.SS2D_PARTS_MAX_STEPS)')
    parser.add_argument('--fused-stem', choices=('on', 'off'), default=None,
                        help='VMamba patch embedding as one kernel (conv_norm_stem) or as its '
                             'modules (default: vmamba.FUSED_STEM)')
    parser.add_argument('--gelu-epilogue', choices=('on', 'off'), default=None,
                        help='VMamba fc1 + GELU as one GEMM with cuBLASLt\'s (tanh) GELU '
                             'epilogue above the fused MLP (default: vmamba.GELU_TANH_EPILOGUE)')
    parser.add_argument('--residual-16bit', choices=('on', 'off'), default=None,
                        help='VMamba keeps its residual stream in the autocast dtype (on) '
                             'or fp32 (off) (default: vmamba.RESIDUAL_16BIT)')
    parser.add_argument('--scan-out-16bit', choices=('on', 'off'), default=None,
                        help='VMamba\'s SS2D scan returns the weights\' 16-bit dtype (on) or '
                             'fp32 (off) (default: vmamba.SCAN_OUT_16BIT)')
    parser.add_argument('--scan-norm-max-channels', type=int, default=None,
                        help='widest d_inner whose out_norm runs inside the SS2D scan (0: off; '
                             'default: vmamba.SCAN_NORM_MAX_CHANNELS)')
    add_lowrank_tuning_option(parser)
    add_persistent_norms_option(parser)
    parser.add_argument('--dwconv-tuning', default=None,
                        help='JSON object updating the depthwise conv kernel\'s TUNING, e.g. '
                             '\'{"wide_min_channels": 0}\' (no WIDE_TUNING tile)')
    parser.add_argument('--stem-tuning', default=None,
                        help='JSON object updating the fused stem kernel\'s TUNING '
                             '(bench/stem.py --tune prints the best)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--verbose-errors', action='store_true',
                        help='print the traceback of a failed row')
    args = parser.parse_args(argv)
    args.sizes = [parse_size(s) if isinstance(s, str) else s for s in args.sizes]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    if not torch.cuda.is_available():
        print('backbone_speed needs a CUDA GPU: torch.cuda.is_available() is False '
              f'(torch {torch.__version__}, CUDA build {torch.version.cuda})', file=sys.stderr)
        return 2
    baselines = [m for m in args.models + (args.compile_models or []) if family(m) == 'timm']
    timm_version = None
    if baselines:
        try:
            import timm
        except ImportError:
            print(f'the baselines {baselines} need timm: pip install timm, or leave them out of '
                  '--models', file=sys.stderr)
            return 2
        timm_version = timm.__version__
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.inductor_freezing:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    inductor_settings = apply_inductor_config(args.inductor_config)
    from mamba_perception_kernels import backend_name
    from mamba_perception_kernels.triton import ss2d_lowrank

    if args.lowrank_impl:
        ss2d_lowrank.TUNING['impl'] = args.lowrank_impl
    apply_lowrank_tuning_option(args)
    from mamba_perception_kernels.triton import prenorm

    from mamba_perception.models import vmamba

    if args.fused_mlp_max_channels is not None:
        vmamba.FUSED_MLP_MAX_CHANNELS = args.fused_mlp_max_channels
    if args.prenorm_layout is not None:
        for entry in prenorm.TUNING.values():
            entry['layout'] = args.prenorm_layout
    if args.fused_tail_max_channels is not None:
        vmamba.FUSED_SS2D_TAIL_MAX_CHANNELS = args.fused_tail_max_channels
    if args.fused_stem is not None:
        vmamba.FUSED_STEM = args.fused_stem == 'on'
    if args.ss2d_parts_max_steps is not None:
        vmamba.SS2D_PARTS_MAX_STEPS = args.ss2d_parts_max_steps
    if args.gelu_epilogue is not None:
        vmamba.GELU_TANH_EPILOGUE = args.gelu_epilogue == 'on'
    if args.residual_16bit is not None:
        vmamba.RESIDUAL_16BIT = args.residual_16bit == 'on'
    if args.scan_out_16bit is not None:
        vmamba.SCAN_OUT_16BIT = args.scan_out_16bit == 'on'
    if args.scan_norm_max_channels is not None:
        vmamba.SCAN_NORM_MAX_CHANNELS = args.scan_norm_max_channels
    from mamba_perception_kernels.triton import stem

    if args.stem_tuning:
        stem.TUNING.update(json.loads(args.stem_tuning))
    from mamba_perception_kernels.triton import dwconv as dwconv_kernels

    if args.dwconv_tuning:
        dwconv_kernels.TUNING.update(json.loads(args.dwconv_tuning))
    result = {
        'provenance': provenance({
            'scan_backend': backend_name('cuda'), 'timm': timm_version, 'tf32': True,
            'cudnn_benchmark': args.cudnn_benchmark, 'budget_s': args.budget_s,
            'inductor_freezing': args.inductor_freezing,
            'inductor_config': inductor_settings,
            'inductor_choices': apply_persistent_norms_option(args),
            'weights': args.weights,
            'fused_mlp_max_channels': vmamba.FUSED_MLP_MAX_CHANNELS,
            'fused_ss2d_tail_max_channels': vmamba.FUSED_SS2D_TAIL_MAX_CHANNELS,
            'fused_stem': vmamba.FUSED_STEM,
            'ss2d_parts_max_steps': vmamba.SS2D_PARTS_MAX_STEPS,
            'gelu_tanh_epilogue': vmamba.GELU_TANH_EPILOGUE,
            'residual_16bit': vmamba.RESIDUAL_16BIT,
            'scan_out_16bit': vmamba.SCAN_OUT_16BIT,
            'scan_norm_max_channels': vmamba.SCAN_NORM_MAX_CHANNELS,
            'stem_tuning': dict(stem.TUNING),
            'dwconv_tuning': dict(dwconv_kernels.TUNING),
            'dwconv_wide_tuning': dict(dwconv_kernels.WIDE_TUNING),
            'prenorm_mlp_tuning': {str(k): v for k, v in prenorm.TUNING.items()},
            'prenorm_linear_tuning': dict(prenorm.LINEAR_TUNING),
            'ss2d_lowrank_tuning': dict(ss2d_lowrank.TUNING)}),
        'what': ('backbone forward under torch.autocast (cache off) vs input size: ours = '
                 'forward_intermediates (4 maps, strides 4-32), timm = forward_features (no '
                 'head; ViT with dynamic_img_size and SDPA attention); random-init weights. '
                 'p50/p90 over per-call CUDA-event samples; eager = eager calls, graph = '
                 'CUDA-graph replay of the eager forward, compile / compile-max = CUDA-graph '
                 'replay of torch.compile(dynamic=False) (inductor default / '
                 'max-autotune-no-cudagraphs; ours with pipeline.COMPILE_OPTIONS as Pipeline, '
                 'timm with inductor defaults: compile_options per row), compile_s = first '
                 'compiled call; peak_mem_mib = '
                 'max_memory_allocated over one warm forward of the mode\'s function (before '
                 'graph capture) counting this model\'s weights, input, activations and '
                 'outputs (not the warm-up calls\' one-time allocations, e.g. cuBLAS\'s '
                 'workspace); '
                 'peak_mem_above_weights_mib excludes the weights'),
        'notes': {name: f'same network as {same} (weights differ): timed only when asked'
                  for name, same in SAME_NETWORK.items()},
        'checks': {}, 'rows': [],
    }
    models = Models(args.seed, result['notes'], cast_weights=args.weights == 'cast')
    tasks = plan(args)
    budget.arm()
    for task in tasks:
        try:
            run_task(task, models, args, budget, result)
        except BudgetInterrupt:  # the deadline struck inside this task: record it, skip the rest
            budget.stopped = 'skipped: --budget-s reached'
            note = 'interrupted: --budget-s reached during this row'
            if task[0] == 'check':
                result['checks'][task[1]] = {'error': note}
            else:
                done = {(r['model'], r['size'], r['batch'], r['dtype'], r['mode'])
                        for r in result['rows']}
                result['rows'] += [{**k, 'error': note} for k in row_keys(task)
                                   if (k['model'], k['size'], k['batch'], k['dtype'],
                                       k['mode']) not in done]
            print(f'{note}: {task[:5]}', flush=True)
    if hasattr(signal, 'SIGALRM'):
        signal.alarm(0)
    write_json(args.out, result)
    print(table(result['rows']))
    print(f'\n{len(result["rows"])} rows ({sum("p50_ms" in r for r in result["rows"])} timed) '
          f'in {time.monotonic() - budget.t0:.0f} s -> {args.out}', flush=True)
    if budget.stopped == 'skipped: --budget-s reached':
        os._exit(0)  # interrupted compile workers must not hold the exit up
    return 0


def run_task(task, models: Models, args, budget: Budget, result: dict) -> None:
    """Run one planned task (or record it as skipped), append its rows, rewrite the JSON."""
    kind, name = task[0], task[1]
    est_kind = f'{kind if kind != "compiled" else task[5]}/{family(name)}'
    reason = budget.stopped or (
        None if budget.fits(est_kind) else
        f'skipped: ~{budget.estimate(est_kind):.0f} s needed, '
        f'{max(0.0, budget.left()):.0f} s of --budget-s left')
    if kind == 'check':
        if reason:
            result['checks'][name] = {'skipped': reason}
        else:
            print(f'[{time.monotonic() - budget.t0:5.0f} s] check {name}', flush=True)
            t0 = time.monotonic()
            try:
                result['checks'][name] = run_check(models, name, args.check_size, args.seed)
            except Exception as exc:  # noqa: BLE001 - record, carry on
                result['checks'][name] = {'error': short_error(exc)}
                if args.verbose_errors:
                    traceback.print_exc()
            budget.record(est_kind, time.monotonic() - t0)
        check = result['checks'][name]
        print(f'check {name} at {size_key(args.check_size)}: ' + (', '.join(
            f'{dt} rel L2 {c["rel_l2"]} (tol {c["tol"]}) ok={c["ok"]}'
            for dt, c in check.items() if isinstance(c, dict)) or str(check)), flush=True)
        write_json(args.out, result)
        return
    keys = row_keys(task)
    if reason:
        rows = [{**k, 'skipped': reason} for k in keys]
    else:
        print(f'[{time.monotonic() - budget.t0:5.0f} s] {kind} {name} {size_key(task[2])} '
              f'b{task[3]} {task[4]} {task[5]}', flush=True)
        t0 = time.monotonic()
        try:
            if kind == 'static':
                rows = run_static(models, *task[1:], args)
            else:
                rows = [run_compiled(models, *task[1:], args)]
            rows = [{**k, **r} for k, r in zip(keys, rows, strict=True)]
        except Exception as exc:  # noqa: BLE001 - OOM, compile error: record, free, carry on
            err = short_error(exc)
            if args.verbose_errors:
                traceback.print_exc()
            rows = [{**k, 'error': err} for k in keys]
            if kind == 'compiled':
                torch._dynamo.reset()
            if any(s in err for s in STICKY_CUDA):
                budget.stopped = f'skipped: an earlier row broke the CUDA context ({err[:80]})'
        budget.record(est_kind, time.monotonic() - t0)
        free_memory()
    for row in rows:
        result['rows'].append(row)
        print_row(row)
    write_json(args.out, result)


if __name__ == '__main__':
    sys.exit(main())
