"""Replay reports: ``report.json`` first, then Markdown and plots rendered from that one dict.

The JSON carries its provenance (package and library versions, host, device, bundle hash, bag
hashes), counts come before scores, units sit in the keys, and "not defined" is ``null``.
When the bundle has random weights, the first key of the JSON and the first line of the
Markdown say so, and scores are labelled as agreement with the ground truth of untrained
weights, never as accuracy.

In live mode (``replay --live``) the report has ``"mode": "live"`` and a ``realtime`` section
(frames published / outputs received / dropped, the node's own counters, stamp-to-publish and
input-to-output latency, input and output rate); the offline-only ``latency_ms``,
``throughput`` and ``realtime_simulation`` are then null.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path
import platform
import socket
import sys
from typing import Any, Optional

from mamba_perception.replay.evaluate import Evaluation

RANDOM_WARNING = ('RANDOM-INITIALISED WEIGHTS: this bundle is not a trained model. The scores '
                  'below only exercise the evaluation; they are NOT accuracy.')
STAGE_KEYS = ('decode_ms', 'preprocess_ms', 'inference_ms', 'postprocess_ms', 'total_ms')
LIVE_KEYS = ('stamp_to_publish_ms', 'input_to_output_ms')  # live.latency_samples()


def _versions() -> dict:
    from importlib import metadata
    out = {'python': platform.python_version()}
    for dist in ('mamba_perception', 'torch', 'torchvision', 'numpy', 'rosbags',
                 'faster-coco-eval', 'pycocotools', 'opencv-python-headless', 'opencv-python',
                 'matplotlib'):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def provenance(predictor: Any = None, bundle_path: Optional[str] = None,
               argv: Optional[list] = None) -> dict:
    """Where the numbers come from: versions, host, device, bundle identity, command line."""
    bundle = getattr(predictor, 'bundle', None)
    meta = getattr(bundle, 'metadata', {}) or {}
    device = str(getattr(predictor, 'device', 'unknown'))
    device_name = device
    if device.startswith('cuda'):
        try:
            import torch
            device_name = torch.cuda.get_device_name(torch.device(device))
        except Exception:  # noqa: BLE001  the name is informative only
            pass
    return {
        'created_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec='seconds'),
        'host': socket.gethostname(), 'platform': platform.platform(),
        'machine': platform.machine(), 'cpu_count': os.cpu_count(),
        'versions': _versions(),
        'device': device, 'device_name': device_name,
        'precision': getattr(predictor, 'precision', None),
        'bundle': {
            'path': bundle_path or getattr(bundle, 'path', None),
            'content_hash': getattr(predictor, 'bundle_hash', None),
            'name': getattr(bundle, 'name', None),
            'random_init': bool(meta.get('random_init', getattr(predictor, 'random_init',
                                                                  False))),
            'trained_on': meta.get('trained_on'),
            'tasks': list(getattr(predictor, 'tasks', ())),
            'classes': list(getattr(predictor, 'class_names', ())),
        },
        'command': list(argv if argv is not None else sys.argv),
    }


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, 'item') and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    return obj


def build_report(evaluation: Evaluation, prov: dict, status: Optional[str] = None,
                 realtime: Optional[dict] = None) -> dict:
    """Build the report dict (what ``report.json`` holds).

    ``realtime`` (live mode, :func:`mamba_perception.replay.live.realtime_summary`) becomes the
    ``realtime`` section; the offline latency, throughput and simulated drops are then null
    (nothing ran here: the node's latencies are in ``realtime``).
    """
    random_init = bool(prov.get('bundle', {}).get('random_init'))
    bags = evaluation.bags
    if status is None:
        statuses = {b['status'] for b in bags}
        status = ('interrupted' if evaluation.interrupted or 'interrupted' in statuses else
                  'failed' if bags and statuses == {'failed'} else
                  'partial' if statuses - {'complete'} else 'complete')
    det = (evaluation.detection.summary() if 'detection' in evaluation.tasks
           and evaluation.frames_with_box_truth else None)
    seg = (evaluation.segmentation.summary(evaluation.class_names)
           if 'segmentation' in evaluation.tasks and evaluation.frames_with_mask_truth else None)
    live = realtime is not None
    latency = None if live else evaluation.latency.summary()
    report: dict = {}
    if random_init:
        report['WARNING'] = RANDOM_WARNING
    report.update({
        'report': 'mamba_perception replay evaluation',
        'mode': 'live' if live else 'offline',
        'status': status,
        'scores_are_accuracy': not random_init,
        'counts': {
            'bags': len(bags),
            'bags_complete': sum(b['status'] == 'complete' for b in bags),
            'frames': evaluation.frames,
            'frames_expected': (sum(b.get('frames_expected') or 0 for b in bags) or None),
            'frames_per_topic': dict(evaluation.frames_per_topic),
            'frames_with_box_truth': evaluation.frames_with_box_truth,
            'frames_with_mask_truth': evaluation.frames_with_mask_truth,
            'frames_without_box_truth': evaluation.frames - evaluation.frames_with_box_truth,
            'frames_without_mask_truth': evaluation.frames - evaluation.frames_with_mask_truth,
            'gt_boxes': det['gt_boxes'] if det else 0,
            'predicted_boxes_on_annotated_frames': det['predicted_boxes'] if det else 0,
            'gt_boxes_of_unknown_classes': sum(b.get('gt_unknown_class_boxes', 0)
                                               for b in bags),
        },
        'errors': [{'bag': b['path'], 'error': b['error']} for b in bags if b.get('error')],
        'warnings': [{'bag': b['path'], 'warning': w} for b in bags
                     for w in b.get('warnings', ())],
        'detection': det,
        'segmentation': seg,
        'realtime': realtime,
        'latency_ms': latency,
        'throughput': None if live else {
            'frames': evaluation.frames, 'wall_s': evaluation.wall_s,
            'frames_per_s': (evaluation.frames / evaluation.wall_s
                             if evaluation.wall_s > 0 else None)},
        'realtime_simulation': None if live else {
            'what': 'frames a one-slot latest-frame buffer (as in the node) would drop had the '
                    'frames arrived at their recorded times, with the latency measured here',
            **evaluation.drops()},
        'bags': bags,
        'provenance': {**prov, 'warmup': _warmup_provenance(evaluation, live)},
    })
    return _clean(report)


def _warmup_provenance(evaluation: Evaluation, live: bool) -> dict:
    """How one-off costs were kept out of the timings."""
    if live:
        return {'policy': 'done by the node at configure (parameters warmup_size_px, '
                          'warmup_iterations)'}
    if not evaluation.warmup:
        return {'policy': 'none (the predictor has no warmup method, or warm-up was off)',
                'iterations': 0, 'sizes_hw_px': [], 'seconds': 0.0}
    return {'policy': "Pipeline.warmup on each distinct input size before that size's first "
                      'timed frame, outside the timed region (latency and throughput exclude it)',
            **evaluation.warmup}


# --------------------------------------------------------------------------------------------
# Writing

def write_report(report: dict, out_dir: os.PathLike | str, overlays: Optional[list] = None,
                 latency_samples: Optional[dict] = None) -> dict:
    """Write ``report.json``, then ``report.md`` and ``plots/*.png``; returns their paths.

    ``report.json`` is written first (atomically), so a failure while plotting still leaves it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {'json': out / 'report.json', 'markdown': out / 'report.md'}
    tmp = out / 'report.json.tmp'
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + '\n')
    os.replace(tmp, paths['json'])
    plots: dict = {}
    plot_error = None
    try:
        plots = render_plots(report, out / 'plots', overlays or [], latency_samples or {})
    except ImportError as err:
        plot_error = f'plots skipped: {err} (pip install matplotlib)'
    paths['markdown'].write_text(render_markdown(report, {k: v.relative_to(out)
                                                          for k, v in plots.items()},
                                                 plot_error))
    paths.update(plots)
    return paths


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return 'n/a'
    if isinstance(value, float):
        return f'{value:.{digits}f}'
    return str(value)


def render_markdown(report: dict, plots: Optional[dict] = None,
                    plot_error: Optional[str] = None) -> str:
    """Markdown rendering of a report dict (from :func:`build_report` or ``report.json``)."""
    plots = plots or {}
    lines: list[str] = []
    accuracy = report.get('scores_are_accuracy', True)
    score_word = 'Accuracy' if accuracy else 'Agreement with ground truth (untrained weights)'
    if 'WARNING' in report:
        lines += [f'**WARNING: {report["WARNING"]}**', '']
    counts = report['counts']
    lines += ['# Replay evaluation report', '',
              f'Status: **{report["status"]}**. Bundle `{report["provenance"]["bundle"]["name"]}`'
              f' ({report["provenance"]["bundle"]["content_hash"]}) on '
              f'`{report["provenance"]["device_name"]}`.', '',
              '## Counts', '', '| what | count |', '|---|---|']
    for key in ('bags', 'bags_complete', 'frames', 'frames_expected', 'frames_with_box_truth',
                'frames_with_mask_truth', 'frames_without_box_truth', 'frames_without_mask_truth',
                'gt_boxes', 'predicted_boxes_on_annotated_frames',
                'gt_boxes_of_unknown_classes'):
        lines.append(f'| {key} | {_fmt(counts.get(key))} |')
    for topic, n in counts['frames_per_topic'].items():
        lines.append(f'| frames on `{topic}` | {n} |')
    lines.append('')
    if report['errors']:
        lines += ['## Errors (results above the error are kept)', '']
        lines += [f'- `{e["bag"]}`: {e["error"]}' for e in report['errors']]
        lines.append('')
    if report.get('warnings'):
        lines += ['## Warnings', '']
        lines += [f'- `{w["bag"]}`: {w["warning"]}' for w in report['warnings']]
        lines.append('')
    det, seg = report.get('detection'), report.get('segmentation')
    if det is None and seg is None:
        lines += ['## Accuracy: not computed', '',
                  'No ground truth was paired with any frame, so no accuracy was computed '
                  '(give --gt-detections / --gt-masks topics or --gt-coco / --gt-mask-dir).', '']
    if det is not None:
        lines += [f'## Detection: {score_word}', '',
                  f'COCO bbox evaluation ({det["backend"]}) over {det["frames"]} frames, '
                  f'{det["gt_boxes"]} ground-truth boxes, {det["predicted_boxes"]} predictions.',
                  '', '| mAP | AP50 | AP75 | AP small | AP medium | AP large | AR@100 |',
                  '|---|---|---|---|---|---|---|',
                  '| ' + ' | '.join(_fmt(det[k]) for k in ('mAP', 'AP50', 'AP75', 'AP_small',
                                                           'AP_medium', 'AP_large', 'AR100'))
                  + ' |', '', '| class | GT boxes | predicted | AP | AP50 |',
                  '|---|---|---|---|---|']
        for name, c in det['per_class'].items():
            lines.append(f'| {name} | {c["gt_boxes"]} | {c["predicted_boxes"]} | '
                         f'{_fmt(c["AP"])} | {_fmt(c["AP50"])} |')
        lines.append('')
        if 'ap' in plots:
            lines += [f'![per-class AP]({plots["ap"]})', '']
    if seg is not None:
        lines += [f'## Segmentation: {score_word}', '',
                  f'{seg["frames"]} frames, {seg["evaluated_pixels"]} pixels evaluated, '
                  f'{seg["ignored_pixels"]} ignored (label {seg["ignore_index"]}).', '',
                  f'mIoU **{_fmt(seg["mIoU"])}**, pixel accuracy {_fmt(seg["pixel_accuracy"])}.',
                  '', '| class | GT pixels | predicted pixels | IoU |', '|---|---|---|---|']
        for name, c in seg['per_class'].items():
            lines.append(f'| {name} | {c["gt_pixels"]} | {c["predicted_pixels"]} | '
                         f'{_fmt(c["IoU"])} |')
        lines.append('')
        if 'iou' in plots:
            lines += [f'![per-class IoU]({plots["iou"]})', '']
    if report.get('realtime') is not None:
        lines += _realtime_markdown(report['realtime'])
    else:
        lines += ['## Latency (ms per frame)', '',
                  '| stage | frames | mean | p50 | p90 | p99 | max |',
                  '|---|---|---|---|---|---|---|']
        for key in STAGE_KEYS:
            lines.append(_latency_row(key[:-3], report['latency_ms'].get(key, {})))
        tp, rt = report['throughput'], report['realtime_simulation']
        lines += ['', f'Throughput: {_fmt(tp["frames_per_s"], 2)} frames/s ({tp["frames"]} '
                  f'frames in {_fmt(tp["wall_s"], 1)} s, reading and decoding included).', '',
                  f'Real-time simulation: {rt["dropped_frames"]} of {rt["frames"]} frames would '
                  f'be dropped (rate {_fmt(rt["drop_rate"])}): {rt["what"]}.', '']
    if 'latency' in plots:
        lines += [f'![latency CDF]({plots["latency"]})', '']
    if 'overlays' in plots:
        lines += ['## Frames', '', 'Predicted masks tinted, predicted boxes in class colours, '
                  'ground-truth boxes in white.', '', f'![overlays]({plots["overlays"]})', '']
    if plot_error:
        lines += [f'_{plot_error}_', '']
    prov = report['provenance']
    lines += ['## Provenance', '', f'- created {prov["created_utc"]} on {prov["host"]} '
              f'({prov["platform"]}, {prov["cpu_count"]} CPUs)',
              f'- device {prov["device_name"]} ({prov["device"]}), precision '
              f'{prov["precision"]}',
              f'- bundle {prov["bundle"]["path"]} {prov["bundle"]["content_hash"]}; trained on: '
              f'{prov["bundle"]["trained_on"]}',
              '- versions: ' + ', '.join(f'{k} {v}' for k, v in prov['versions'].items()),
              '- command: `' + ' '.join(str(a) for a in prov['command']) + '`',
              _warmup_line(prov.get('warmup') or {}), '',
              '| bag | storage | status | frames | sha256 | size (bytes) |',
              '|---|---|---|---|---|---|']
    for b in report['bags']:
        lines.append(f'| `{b["path"]}` | {b.get("storage", "?")} | {b["status"]} | '
                     f'{b["frames"]} | {str(b.get("sha256", "n/a"))[:19]} | '
                     f'{b.get("size_bytes", "n/a")} |')
    return '\n'.join(lines) + '\n'


def _warmup_line(w: dict) -> str:
    if w.get('sizes_hw_px'):
        sizes = ', '.join(f'{wd}x{h}' for h, wd in w['sizes_hw_px'])
        return (f'- warm-up before timing: {w["iterations"]} run(s) on each frame size ({sizes}),'
                f' {w["seconds"]:.2f} s, excluded from latency and throughput')
    return f'- warm-up before timing: {w.get("policy", "none")}'


def _latency_row(name: str, s: dict) -> str:
    return f'| {name} | {s.get("count", 0)} | ' + ' | '.join(
        _fmt(s.get(k), 2) for k in ('mean_ms', 'p50_ms', 'p90_ms', 'p99_ms', 'max_ms')) + ' |'


def _realtime_markdown(rt: dict) -> list:
    node, clock, nr = rt['node'], rt['clock'], rt.get('node_reported')
    cams = ', '.join(f'`{t}` -> {c}' for t, c in node['cameras'].items())
    how = 'started by this command' if node.get('started_here') else 'already running'
    lines = ['## Real-time behaviour (live mode)', '',
             f'Node `{node["name"]}` ({how}), cameras {cams}, '
             f'{node["input_transport"]} input. Clock: {clock["mode"]}, /clock '
             f'{clock["clock_published"]}, rate x{_fmt(clock["rate"], 2)}; frames carry '
             f'{clock["stamps"]}.', '',
             '| what | count |', '|---|---|',
             f'| frames published into the node | {rt["frames_published"]} |',
             f'| frames with outputs received | {rt["outputs_received"]} |',
             f'| dropped (no output) | {rt["dropped_frames"]} (rate {_fmt(rt["drop_rate"])}) |',
             f'| outputs with a stamp never published | {rt["outputs_with_unknown_stamp"]} |',
             f'| outputs with another frame_id | {rt["frame_id_mismatches"]} |']
    if nr:
        lines += [f'| node: frames received | {nr["frames_received"]} |',
                  f'| node: frames published | {nr["frames_published"]} |',
                  f'| node: dropped by its one-slot buffer | {nr["frames_dropped"]} |',
                  f'| node: bad inputs | {nr["bad_inputs"]} |',
                  f'| lost before the node (DDS) | {nr["frames_lost_before_node"]} |']
    lines += ['', f'Output rate {_fmt(rt["output_rate_hz"], 2)} Hz, input rate '
              f'{_fmt(rt["input_rate_hz"], 2)} Hz, over {_fmt(rt["playback_s"], 1)} s of '
              'playback.' + ('' if nr else ' The node\'s diagnostics were not received.')
              + (f' Node counters baseline: {nr["baseline"]}.' if nr else ''), '',
              '| latency (ms) | frames | mean | p50 | p90 | p99 | max |',
              '|---|---|---|---|---|---|---|',
              _latency_row(f'stamp to publish ({clock["latency_units"]})',
                           rt['stamp_to_publish_latency_ms']),
              _latency_row('input publish to output publish (wall)',
                           rt['input_to_output_latency_ms']), '']
    return lines


def render_plots(report: dict, out_dir: Path, overlays: list, latency_samples: dict
                 ) -> dict[str, Path]:
    """Latency CDF per stage, per-class AP / IoU bars, overlay grid; returns name -> path."""
    import matplotlib
    matplotlib.use('Agg', force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    note = ' (random weights: not accuracy)' if not report.get('scores_are_accuracy') else ''
    keys = LIVE_KEYS if report.get('realtime') is not None else STAGE_KEYS
    if any(latency_samples.get(k) for k in keys):
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            v = np.sort(np.asarray(latency_samples.get(key, []), np.float64))
            if v.size and v.max() > 0:
                ax.step(v, np.arange(1, v.size + 1) / v.size, where='post', label=key[:-3])
        ax.set_xscale('symlog', linthresh=1.0)
        ax.set_xlabel('latency (ms)')
        ax.set_ylabel('fraction of frames')
        ax.set_title('Live latency CDF' if keys == LIVE_KEYS else 'Latency CDF per stage')
        ax.grid(True, alpha=0.3)
        ax.legend()
        paths['latency'] = _save(fig, out_dir / 'latency_cdf.png')
    for key, section, metric in (('ap', 'detection', 'AP'), ('iou', 'segmentation', 'IoU')):
        sec = report.get(section)
        if not sec:
            continue
        names = list(sec['per_class'])
        vals = [sec['per_class'][n][metric] for n in names]
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(names) + 2), 3.5))
        ax.bar(range(len(names)), [v if v is not None else 0 for v in vals],
               color=['C0' if v is not None else 'lightgray' for v in vals])
        ax.set_xticks(range(len(names)), names, rotation=45, ha='right')
        ax.set_ylim(0, 1)
        ax.set_ylabel(metric)
        ax.set_title(f'Per-class {metric}{note} (grey: not defined)')
        paths[key] = _save(fig, out_dir / f'per_class_{metric.lower()}.png')
    if overlays:
        import cv2
        n = len(overlays)
        cols = min(3, n)
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis('off')
        for ax, (caption, png) in zip(axes.flat, overlays, strict=False):
            img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
            if img is not None:
                ax.imshow(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
            ax.set_title(caption, fontsize=7)
        paths['overlays'] = _save(fig, out_dir / 'overlays.png')
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


__all__ = ['RANDOM_WARNING', 'build_report', 'provenance', 'render_markdown', 'render_plots',
           'write_report']
