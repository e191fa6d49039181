"""Shared benchmark helpers: GPU timing (CUDA graphs or events, always stated) and provenance.

Every bench writes one JSON dict whose ``provenance`` block comes from ``provenance()``; timings
come from ``time_cuda`` (per-repetition means) or ``sample_cuda`` (one sample per call, for
percentiles) and carry the method used (``timing`` key) next to the numbers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

# H100 SXM HBM3 bandwidth used for every "HBM floor" (bytes / this).
HBM_BYTES_PER_S = 3.35e12
# VMamba d_inner per stage (= C of the depthwise conv and of the scan; notes/models.md:
# T[s1l8] ssm_ratio 1, S/B[s2l15] ratio 2, d_state 1) and blocks per stage.
VMAMBA_STAGE_DIMS = {"T": (96, 192, 384, 768), "S": (192, 384, 768, 1536),
                     "B": (256, 512, 1024, 2048)}
VMAMBA_DEPTHS = {"T": (2, 2, 8, 2), "S": (2, 2, 15, 2), "B": (2, 2, 15, 2)}
# The perception benchmarks' --tasks / --perception choices: bundle tasks by short name.
PERCEPTION_TASKS = {"det": ("detection",), "seg": ("segmentation",),
                    "detseg": ("detection", "segmentation")}


def parse_size(text: str) -> tuple[int, int]:
    """``'720x1280'`` -> (720, 1280) (height x width)."""
    try:
        h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'size {text!r} is not HxW, e.g. 720x1280') from None
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f'size {text!r}: both sides must be >= 32')
    return h, w


def stage_hw(h: int, w: int) -> list:
    """VMamba feature-map sizes of the 4 stages (stride 4, then three stride-2 convs, pad 1)."""
    h, w = math.ceil(h / 4), math.ceil(w / 4)
    out = [(h, w)]
    for _ in range(3):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        out.append((h, w))
    return out


def provenance(extra: dict | None = None) -> dict:
    """GPU name, torch / triton / CUDA versions, date, command line, git commit."""
    import torch

    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu_sm_count"] = props.multi_processor_count
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    info.update(extra or {})
    return info


def time_cuda(fn, iters: int = 20, reps: int = 3, warmup: int = 2, graph: bool = True) -> dict:
    """Time ``fn()`` on the current CUDA stream; returns {'median_us', 'min_us', 'timing'}.

    With ``graph=True`` the call is captured once in a CUDA graph and replayed ``iters`` times
    per repetition (launch overhead excluded, as in a deployed graph); otherwise CUDA events
    bracket ``iters`` eager calls. The per-call mean of each repetition is one sample.
    """
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run = capture_graph(fn).replay if graph else fn
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            run()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / iters)
    return {"median_us": statistics.median(samples), "min_us": min(samples),
            "timing": f"cuda-graph replay x{iters}, median of {reps}" if graph
            else f"cuda events around {iters} eager calls, median of {reps}"}


def capture_graph(fn):
    """Capture one call of ``fn()`` in a CUDA graph and return it (``.replay()`` reruns it).

    ``fn`` must already be warm (lazy initialisation, autotuning and compilation done): it is
    called once more on the capture stream to warm the allocator there, then captured. The
    graph keeps its own memory pool; outputs of the captured call are overwritten per replay.
    """
    import torch

    g = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm the allocator on the capture stream
        with torch.cuda.graph(g, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    return g


def percentile(samples, q: float) -> float:
    """``q``-th percentile (0-100) of ``samples``, linear between order statistics (numpy's)."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("percentile of no samples")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def sample_cuda(run, iters: int = 50, warmup: int = 2) -> dict:
    """Per-call GPU times (ms) of ``run()``: each call between its own pair of CUDA events.

    ``run`` is whatever is deployed: an eager forward (the span then includes the GPU idling
    while the CPU launches kernels) or a captured graph's ``replay`` (see ``capture_graph``).
    ``iters`` calls are issued back to back and synchronised once at the end, so a sample is
    the time the GPU stream spent from one call's start to its end. Returns ``{"samples_ms",
    "p50_ms", "p90_ms", "mean_ms", "min_ms", "iters"}``.
    """
    import torch

    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    samples = [start.elapsed_time(end) for start, end in events]
    return {"samples_ms": samples, "p50_ms": percentile(samples, 50),
            "p90_ms": percentile(samples, 90), "mean_ms": statistics.fmean(samples),
            "min_ms": min(samples), "iters": iters}


def wall_ms(fn, iters: int = 40, warmup: int = 5) -> list:
    """Host wall-clock times (ms) of ``fn()`` each followed by ``torch.cuda.synchronize()``.

    For work that is host-bound or synchronises inside (NMS, a whole ``Pipeline`` call): the
    span is what a caller waits, GPU idle gaps included. ``warmup`` untimed calls first.
    """
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def time_launch_config(run, reference, config: dict) -> dict:
    """Return one ``--tune`` row: ``run()`` (a launch with ``config``) against ``reference``.

    Returns ``config`` with ``us`` (median of CUDA-graph replays), ``rel_l2`` (relative L2
    error against ``reference``) and ``first_call_s`` (Triton's compile, or its cache), or with
    ``error`` where the configuration does not compile or run.
    """
    import torch

    try:
        start = time.perf_counter()
        got = run()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - start
        err = float((got.float() - reference).norm() / reference.norm())
        us = time_cuda(run, iters=20, reps=5)["median_us"]
    except Exception as exc:  # noqa: BLE001 - a configuration may not compile
        return {"variant": "op", **config, "error": str(exc)[:200]}
    return {"variant": "op", **config, "us": round(us, 2), "rel_l2": err,
            "first_call_s": round(first_s, 2)}


def best_launch_config(row_groups, keys) -> tuple[dict, float]:
    """Return the configuration (its ``keys``) of least ``us`` over ``row_groups``, and the sum.

    ``row_groups``: lists of rows (one list per size or batch) as :func:`time_launch_config`
    returns; rows with an error or of another variant are skipped.
    """
    totals: dict = {}
    for rows in row_groups:
        for row in rows:
            if row.get("variant") == "op" and "us" in row:
                key = tuple(sorted((k, row[k]) for k in keys))
                totals[key] = totals.get(key, 0.0) + row["us"]
    best = min(totals, key=totals.get)
    return dict(best), totals[best]


def add_coarse_fusion_option(parser) -> None:
    """Add ``--upernet-coarse-fusion on|off`` (see :func:`apply_coarse_fusion_option`)."""
    parser.add_argument("--upernet-coarse-fusion", choices=("on", "off"), default=None,
                        help="UperNet's fusion conv with the coarse levels mixed at their own "
                             "resolution (segmentation.COARSE_FUSION; default: the module's)")


def apply_coarse_fusion_option(args) -> bool:
    """Set ``segmentation.COARSE_FUSION`` from the option where given; return the value in use."""
    from mamba_perception.models.heads import segmentation

    if args.upernet_coarse_fusion is not None:
        segmentation.COARSE_FUSION = args.upernet_coarse_fusion == "on"
    return segmentation.COARSE_FUSION


def add_lowrank_tuning_option(parser) -> None:
    """Add ``--lowrank-tuning JSON`` (see :func:`apply_lowrank_tuning_option`)."""
    parser.add_argument("--lowrank-tuning", default=None,
                        help="JSON object updating ss2d_lowrank.TUNING (e.g. the state pass "
                             "that bench/scan.py --tune-state prints, or "
                             "'{\"seq_delta_map_max_bytes\": 67108864}')")


def apply_lowrank_tuning_option(args) -> dict:
    """Update ``ss2d_lowrank.TUNING`` from the option where given; return the tuning in use."""
    from mamba_perception_kernels.triton import ss2d_lowrank

    if args.lowrank_tuning:
        update = json.loads(args.lowrank_tuning)
        unknown = sorted(set(update) - set(ss2d_lowrank.TUNING))
        if unknown:  # a typo would otherwise measure the default under another name
            raise SystemExit(f"--lowrank-tuning: unknown keys {unknown}; "
                             f"known: {sorted(ss2d_lowrank.TUNING)}")
        ss2d_lowrank.TUNING.update(update)
    return dict(ss2d_lowrank.TUNING)


def write_json(path: str, data: dict) -> None:
    """Write ``data`` as indented JSON, creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def compile_kwargs(mode=None, settings=(), baseline=False) -> dict:
    """``torch.compile`` keyword arguments for a bench script's compiled rows.

    Our models: inductor options of ``mode`` (e.g. ``'max-autotune-no-cudagraphs'``; None: the
    default) plus ``pipeline.COMPILE_OPTIONS``, which Pipeline compiles with, except keys set by
    ``settings`` (``--inductor-config`` KEY=VALUE strings): options given to ``torch.compile``
    win over the global config, so an ablation of one of them would silently not happen.
    ``baseline`` (a timm model): just ``mode``, compiled as a user would, as the anchors were.
    """
    if baseline:
        return {"mode": mode}
    import torch._inductor

    from mamba_perception.pipeline import COMPILE_OPTIONS

    overridden = {setting.partition("=")[0] for setting in settings or ()}
    options = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    options.update({k: v for k, v in COMPILE_OPTIONS.items() if k not in overridden})
    return {"options": options}


def compile_model(fn, baseline=False, **compile_kwargs):
    """``torch.compile`` a bench row's forward as its users would.

    Ours as Pipeline compiles them (``inductor_choices.compile_inference``: inner LayerNorm
    rows kept persistent on torch < 2.14), a timm ``baseline`` plainly.
    """
    import torch

    from mamba_perception.inductor_choices import compile_inference

    return (torch.compile(fn, **compile_kwargs) if baseline
            else compile_inference(fn, **compile_kwargs))


def add_persistent_norms_option(parser) -> None:
    """``--persistent-norms on|off``: ablate ``inductor_choices.PERSISTENT_INNER_REDUCTIONS``."""
    parser.add_argument('--persistent-norms', choices=('on', 'off'), default=None,
                        help='our models compile with inner LayerNorm rows kept persistent on '
                             'torch < 2.14 (on) or with inductor\'s own choice (off) (default: '
                             'inductor_choices.PERSISTENT_INNER_REDUCTIONS); use a separate '
                             'TORCHINDUCTOR_CACHE_DIR per setting: the choice is not in the '
                             'cache key')


def apply_persistent_norms_option(args) -> dict:
    """Apply ``--persistent-norms``; return the setting in force, for the provenance."""
    from mamba_perception import inductor_choices

    if args.persistent_norms is not None:
        inductor_choices.PERSISTENT_INNER_REDUCTIONS = args.persistent_norms == 'on'
    return {'persistent_inner_reductions': inductor_choices.PERSISTENT_INNER_REDUCTIONS,
            'needed_by_this_torch': inductor_choices.needs_backport()}


def apply_inductor_config(settings) -> dict:
    """Set ``torch._inductor.config`` entries from ``KEY=VALUE`` strings; return what was set.

    VALUE is read as JSON where it parses (``true``, ``8``, ``"x"``), else kept as a string;
    KEY may be dotted (``triton.unique_kernel_names``). An unknown key is an error, not a
    silently ignored ablation.
    """
    from torch._inductor import config as inductor_config

    applied = {}
    for setting in settings or ():
        key, sep, text = setting.partition("=")
        if not sep:
            raise ValueError(f"--inductor-config wants KEY=VALUE, got {setting!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *parents, leaf = key.split(".")
        target = inductor_config
        for name in parents:
            target = getattr(target, name)
        if not hasattr(target, leaf):
            raise ValueError(f"torch._inductor.config has no {key!r}")
        setattr(target, leaf, value)
        applied[key] = value
    return applied
