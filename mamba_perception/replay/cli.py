r"""``replay``: evaluate a model bundle on rosbags: accuracy, latency, drops, in one report.

::

    replay BAG [BAG ...] --bundle model.safetensors --out report_dir \\
        [--topics /camera/image_raw] [--gt-detections /camera/gt/detections] \\
        [--gt-masks /camera/gt/mask] [--device cuda] [--workers 2 --devices cuda:0,cuda:1]

    replay BAG --live [--rate 1.0] [--node-already-running] --bundle model.safetensors \\
        [--gt-detections ...] [--node-param warmup_iterations:=1 ...] [--wall-time]

BAG is a rosbag2 folder (sqlite3 or MCAP), a bare ``.mcap``/``.bag`` file, or a folder of those.
Frames run through the same :class:`~mamba_perception.pipeline.Pipeline` the node uses, one by
one, in the bag's order (offline: deterministic, as fast as the device allows).

With --live the bag's camera topics are published at their recorded rate (x --rate) into a real
perception_node over DDS, started here (its log is OUT/node.log; sim time: /clock is published,
from the bag's /clock topic or else from its log times) or already running (its use_sim_time
is asked); the report gets a ``realtime`` section (stamp-to-publish latency, drops, output
rate) beside the accuracy of the outputs that came back. See mamba_perception.replay.live.

Exit codes: 0 complete; 2 bad arguments; 3 a bag could not be read completely (the report is
written with everything before the error); 4 setup problem (bundle, device, library), no
report; 130 interrupted by Ctrl-C (the partial report is written).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import concurrent.futures
from dataclasses import dataclass
import functools
import logging
import multiprocessing
import os
from pathlib import Path
import sys
from typing import Any, Optional

from mamba_perception.errors import MambaPerceptionError, ParameterError, SetupError
from mamba_perception.replay.bag import BagReader, bag_hash, find_bags
from mamba_perception.replay.evaluate import (
    Evaluation,
    ReplayOptions,
    evaluate_bag,
    load_bag_truth,
    load_coco_truth,
    new_evaluation,
    parse_topic_map,
)
from mamba_perception.replay.report import build_report, provenance, write_report

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_BAG_ERROR = 3
EXIT_SETUP = 4
EXIT_INTERRUPTED = 130


@dataclass
class ReplayResult:
    """What :func:`run_replay` did: the report dict, the files written, the exit code."""

    report: dict
    paths: dict
    exit_code: int
    evaluation: Evaluation


def make_pipeline(bundle: Any, device: str = 'cpu', precision: str = 'fp32',
                  score_threshold: float = 0.3, nms_iou: float = 0.5,
                  max_detections: int = 100) -> Any:
    """Build the node's Pipeline (imported here so that ``import replay`` stays torch-free)."""
    from mamba_perception.pipeline import Pipeline
    return Pipeline(bundle, device=device, precision=precision,
                    score_threshold=score_threshold, nms_iou=nms_iou,
                    max_detections=max_detections)


def run_replay(bags: Sequence[os.PathLike | str], bundle: Any, out_dir: os.PathLike | str, *,
               topics: Sequence[str] = (), gt_detections: Sequence[str] = (),
               gt_masks: Sequence[str] = (), gt_coco: Optional[str] = None,
               gt_mask_dir: Optional[str] = None, gt_key: str = 'index',
               stamp_tolerance_ms: float = 0.0, device: str = 'cpu', precision: str = 'fp32',
               score_threshold: float = 0.3, nms_iou: float = 0.5, max_detections: int = 100,
               max_frames: Optional[int] = None, overlays: int = 6, workers: int = 1,
               devices: Sequence[str] = (), progress: bool = True, hash_bags: bool = True,
               warmup_iterations: int = 2, write_bag: Optional[os.PathLike | str] = None,
               write_bag_storage: Optional[str] = None,
               predictor_factory: Optional[Callable[..., Any]] = None,
               argv: Optional[Sequence[str]] = None) -> ReplayResult:
    """Replay ``bags`` through the bundle and write the report into ``out_dir``.

    ``predictor_factory(device)`` replaces the Pipeline (tests use an oracle); it must be
    picklable when ``workers`` > 1. Bag errors do not raise: they are recorded in the report
    and give exit code 3. Setup errors (bundle, device) raise.

    ``write_bag``: write the camera topics and the predictions into a new bag there (a folder of
    one bag per input bag when there are several), in ``write_bag_storage`` (default: the
    input's storage); see :class:`~mamba_perception.replay.evaluate.PredictionBag`.
    """
    paths_in = find_bags(bags)
    if workers < 1:
        raise ParameterError(f'--workers must be >= 1, got {workers}')
    if write_bag is not None and len(paths_in) == 1 and Path(write_bag).exists():
        raise ParameterError(f'--write-bag {write_bag}: exists already, not overwriting')
    if write_bag_storage not in (None, 'mcap', 'sqlite3'):
        raise ParameterError(f"--write-bag-storage must be 'mcap' or 'sqlite3', got "
                             f'{write_bag_storage!r}')
    factory = predictor_factory or functools.partial(
        make_pipeline, bundle, precision=precision, score_threshold=score_threshold,
        nms_iou=nms_iou, max_detections=max_detections)
    options = ReplayOptions(camera_topics=tuple(topics), gt_detections=tuple(gt_detections),
                            gt_masks=tuple(gt_masks), stamp_tolerance_ns=int(
                                stamp_tolerance_ms * 1e6), max_frames=max_frames,
                            overlays=overlays, hash_bags=hash_bags,
                            warmup_iterations=warmup_iterations,
                            write_bag=None if write_bag is None else str(write_bag),
                            write_bag_storage=write_bag_storage,
                            write_bag_per_input=len(paths_in) > 1)
    device_list = list(devices) or [device]
    argv = list(argv) if argv is not None else sys.argv
    if workers > 1 and len(paths_in) > 1:
        evaluation, prov, interrupted = _run_parallel(paths_in, factory, options, gt_coco,
                                                      gt_mask_dir, gt_key, workers, device_list,
                                                      progress)
        prov['command'] = argv
        prov['devices'] = device_list
    else:
        predictor = factory(device_list[0])
        if gt_coco or gt_mask_dir:
            options.coco_truth = load_coco_truth(gt_coco, predictor.class_names, gt_mask_dir,
                                                 gt_key, options.stamp_tolerance_ns)
        prov = provenance(predictor, str(bundle) if bundle is not None else None, argv)
        evaluation = new_evaluation(predictor)
        interrupted = _run_serial(paths_in, predictor, options, evaluation, progress)
    report = build_report(evaluation, prov, 'interrupted' if interrupted else None)
    written = write_report(report, out_dir, evaluation.overlays, evaluation.latency.samples)
    code = (EXIT_INTERRUPTED if interrupted else
            EXIT_BAG_ERROR if report['status'] != 'complete' else EXIT_OK)
    return ReplayResult(report, written, code, evaluation)


def run_live_replay(bag: os.PathLike | str, bundle: Optional[os.PathLike | str],
                    out_dir: os.PathLike | str, *, topics: Sequence[str] = (),
                    gt_detections: Sequence[str] = (), gt_masks: Sequence[str] = (),
                    gt_coco: Optional[str] = None, gt_mask_dir: Optional[str] = None,
                    gt_key: str = 'index', stamp_tolerance_ms: float = 0.0,
                    device: Optional[str] = 'cpu', precision: Optional[str] = 'fp32',
                    node_already_running: bool = False, node_params: Sequence[str] = (),
                    live_options: Any = None, progress: bool = True, hash_bags: bool = True,
                    domain_id: Optional[int] = None,
                    argv: Optional[Sequence[str]] = None) -> ReplayResult:
    """Live mode: play ``bag`` into a real perception node and write the report into ``out_dir``.

    The node is started here (``bundle`` on ``device`` / ``precision``, plus ``node_params``
    ``NAME:=VALUE``) unless ``node_already_running``; ``live_options`` is a
    :class:`~mamba_perception.replay.live.LiveOptions` (rate, clock, node name, cameras). The
    report is the offline one with a ``realtime`` section; accuracy is scored over the frames
    whose outputs came back. Node problems raise :class:`~.live.LiveError` (a SetupError).
    """
    from mamba_perception.replay import live
    paths = find_bags([bag])
    if len(paths) != 1:
        raise ParameterError(f'--live plays one bag at a time; {bag} holds {len(paths)}')
    path = paths[0]
    options = live_options or live.LiveOptions()
    if not node_already_running:
        if bundle is None:
            raise ParameterError('--bundle is needed to start the node (or give '
                                 '--node-already-running)')
        if not Path(bundle).expanduser().is_file():
            raise SetupError(f'{bundle}: no such bundle file')
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gt_topics = [item.split('=', 1)[-1] for item in (*gt_detections, *gt_masks)]
    with BagReader(path) as reader:  # a missing ground-truth topic fails before the node starts
        reader.require_topics(gt_topics)
    start = None
    if not node_already_running:
        def start(cameras: Any, transport: str, sim_time: bool) -> Any:
            argv_node = live.node_argv(bundle, cameras, transport, sim_time, options, device,
                                       precision, node_params)
            return live.start_node(argv_node, log_path=out / 'node.log')
    bar = _progress_bar(progress, 'live', 'frame')
    try:
        run = live.play(path, topics, gt_topics, options, start=start, domain_id=domain_id,
                        on_frame=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    model = live.node_model(run, bundle)
    cameras = [t for t, _ in run.cameras]
    tolerance_ns = int(stamp_tolerance_ms * 1e6)
    if gt_coco or gt_mask_dir:
        truth = load_coco_truth(gt_coco, model.class_names, gt_mask_dir, gt_key, tolerance_ns)
    else:
        with BagReader(path) as reader:
            truth, error = load_bag_truth(
                reader, parse_topic_map(gt_detections, cameras, '--gt-detections'),
                parse_topic_map(gt_masks, cameras, '--gt-masks'), model.class_names,
                tolerance_ns)
        if error and not run.bag.get('error'):
            run.bag.update(error=error, status='partial')
    run.bag['gt_unknown_class_boxes'] = truth.unknown_class_boxes
    if hash_bags:
        run.bag.update(bag_hash(path))
    evaluation = live.score(run, model, truth if truth else None)
    prov = provenance(model, str(bundle) if bundle is not None else model.bundle.path,
                      list(argv) if argv is not None else sys.argv)
    report = build_report(evaluation, prov, 'interrupted' if run.interrupted else None,
                          realtime=live.realtime_summary(run))
    written = write_report(report, out, evaluation.overlays, live.latency_samples(run))
    code = (EXIT_INTERRUPTED if run.interrupted else
            EXIT_BAG_ERROR if report['status'] != 'complete' else EXIT_OK)
    return ReplayResult(report, written, code, evaluation)


def _run_serial(paths: Sequence[Path], predictor: Any, options: ReplayOptions,
                evaluation: Evaluation, progress: bool) -> bool:
    bar = _progress_bar(progress, 'frames', 'frame')
    try:
        def on_total(n: int) -> None:
            if bar is not None:
                bar.total = (bar.total or 0) + n
                bar.refresh()

        for path in paths:
            if bar is not None:
                bar.set_description(Path(path).name)
            evaluate_bag(path, predictor, options, evaluation,
                         bar.update if bar is not None else None, on_total)
    except KeyboardInterrupt:
        return True
    finally:
        if bar is not None:
            bar.close()
    return False


def _progress_bar(enabled: bool, desc: str, unit: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=0, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                bar_format='{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} '
                           '[{elapsed}<{remaining}, {rate_fmt}]')


# -- parallel: one predictor per worker process, bags handed out one at a time ---------------

_WORKER: dict = {}


def _worker_init(factory: Callable[..., Any], devices: Any, options: ReplayOptions,
                 gt: tuple) -> None:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    device = devices.get()
    predictor = factory(device)
    if gt[0] or gt[1]:
        options.coco_truth = load_coco_truth(gt[0], predictor.class_names, gt[1], gt[2],
                                             options.stamp_tolerance_ns)
    _WORKER.update(predictor=predictor, options=options, device=device)


def _worker_bag(path: Path) -> tuple[Evaluation, dict]:
    predictor = _WORKER['predictor']
    evaluation = new_evaluation(predictor)
    evaluate_bag(path, predictor, _WORKER['options'], evaluation)
    for bag in evaluation.bags:
        bag['device'] = _WORKER['device']
    return evaluation, provenance(predictor)


def _run_parallel(paths: Sequence[Path], factory: Callable[..., Any], options: ReplayOptions,
                  gt_coco: Optional[str], gt_mask_dir: Optional[str], gt_key: str, workers: int,
                  devices: list, progress: bool) -> tuple[Evaluation, dict, bool]:
    ctx = multiprocessing.get_context('spawn')
    queue = ctx.Manager().Queue()
    workers = min(workers, len(paths))
    for i in range(workers):
        queue.put(devices[i % len(devices)])
    bar = _progress_bar(progress, 'bags', 'bag')
    if bar is not None:
        bar.total = len(paths)
    results: dict[int, tuple[Evaluation, dict]] = {}
    interrupted = False
    with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_worker_init,
            initargs=(factory, queue, options, (gt_coco, gt_mask_dir, gt_key))) as pool:
        futures = {pool.submit(_worker_bag, p): i for i, p in enumerate(paths)}
        try:
            for fut in concurrent.futures.as_completed(futures):
                results[futures[fut]] = fut.result()
                if bar is not None:
                    bar.update(1)
        except KeyboardInterrupt:
            interrupted = True
            for fut in futures:
                fut.cancel()
        finally:
            if bar is not None:
                bar.close()
    if not results:
        raise MambaPerceptionError('no bag finished before the run was interrupted')
    ordered = [results[i] for i in sorted(results)]
    merged, prov = ordered[0]
    for evaluation, _ in ordered[1:]:
        merged.merge(evaluation)
    merged.interrupted |= interrupted
    return merged, prov, interrupted


# -- command line -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """Build the ``replay`` argument parser."""
    p = argparse.ArgumentParser(prog='replay', description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 2)[2])
    p.add_argument('bags', nargs='+', help='rosbag2 folders, .mcap/.bag files or folders of them')
    p.add_argument('--bundle', help='model bundle (.safetensors); required unless '
                   '--live --node-already-running')
    p.add_argument('--out', default='replay_report', help='report folder (default %(default)s)')
    p.add_argument('--topics', nargs='+', default=(), metavar='TOPIC',
                   help='camera topics (default: every Image / CompressedImage topic)')
    p.add_argument('--gt-detections', nargs='+', default=(), metavar='[CAM=]TOPIC',
                   help='vision_msgs/Detection2DArray ground-truth topic(s), paired by stamp')
    p.add_argument('--gt-masks', nargs='+', default=(), metavar='[CAM=]TOPIC',
                   help='mono8 class-id mask topic(s) (255 = ignore), paired by stamp')
    p.add_argument('--gt-coco', help='COCO JSON ground truth (images keyed by --gt-key)')
    p.add_argument('--gt-mask-dir', help='folder of <key>.png class-id masks')
    p.add_argument('--gt-key', choices=('index', 'stamp'), default='index',
                   help='how COCO images / mask files name frames (default %(default)s)')
    p.add_argument('--stamp-tolerance-ms', type=float, default=0.0,
                   help='pair ground truth to the nearest stamp within this (default exact)')
    p.add_argument('--device', default='cpu', help="'cpu', 'cuda', 'cuda:1' ...")
    p.add_argument('--devices', default='', help='comma-separated devices, one per worker')
    p.add_argument('--workers', type=int, default=1, help='bags evaluated in parallel')
    p.add_argument('--precision', choices=('fp32', 'fp16', 'bf16'), default='fp32')
    p.add_argument('--score-threshold', type=float, default=0.3)
    p.add_argument('--nms-iou', type=float, default=0.5)
    p.add_argument('--max-frames', type=int, help='stop each bag after this many frames')
    p.add_argument('--overlays', type=int, default=6, help='overlay frames per bag in the report')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.add_argument('--no-hash', action='store_true', help='skip hashing the bag files')
    p.add_argument('--warmup-iterations', type=int, default=2, metavar='N',
                   help='Pipeline warm-up runs on each new frame size before it is timed, as the '
                        'node does at configure (default %(default)s; 0: none)')
    p.add_argument('--write-bag', metavar='OUT_BAG',
                   help='also write a new bag with the camera topics and the predictions '
                        '(<camera base>/detections, <camera base>/segmentation/mask) for '
                        'Foxglove / RViz; with several bags a folder of one bag per input')
    p.add_argument('--write-bag-storage', choices=('mcap', 'sqlite3'),
                   help='storage of --write-bag (default: that of the input bag)')
    g = p.add_argument_group('live mode (a real perception_node over DDS)')
    g.add_argument('--live', action='store_true',
                   help='publish the camera topics at recorded rate into a running node and '
                        'report its real-time behaviour with the accuracy of its outputs')
    g.add_argument('--rate', type=float, default=1.0, help='playback speed factor (default 1)')
    g.add_argument('--node-already-running', action='store_true',
                   help='do not start a node: one is running (ROS_DOMAIN_ID of this shell), '
                        'subscribed to the bag\'s camera topics')
    g.add_argument('--node-name', default='mamba_perception', help='node name (default '
                   '%(default)s)')
    g.add_argument('--node-namespace', default='', help='node namespace (av.launch.py: '
                   'perception); outputs are <namespace>/<camera>/...')
    g.add_argument('--cameras', nargs='+', default=(), metavar='[TOPIC=]NAME',
                   help='node camera names of the topics (default: the launch file rule, '
                        '/sensing/camera/front/image_raw -> front)')
    g.add_argument('--input-transport', choices=('raw', 'compressed'),
                   help='which camera topics to play when the bag has both (default raw)')
    time_group = g.add_mutually_exclusive_group()
    time_group.add_argument('--sim-time', dest='sim_time', action='store_true', default=None,
                            help='the node runs on /clock (default for a node started here)')
    time_group.add_argument('--wall-time', dest='sim_time', action='store_false',
                            help='the node runs on the system clock: frames are re-stamped')
    g.add_argument('--clock-hz', type=float, default=100.0,
                   help='rate of the /clock generated from the bag log times (default 100)')
    g.add_argument('--node-param', action='append', default=[], metavar='NAME:=VALUE',
                   help='extra parameter of the node started here (repeatable)')
    g.add_argument('--wait-for-node', type=float, metavar='S',
                   help='how long to wait for the node to be ready (default 120 s for a node '
                        'started here, 30 s for one already running)')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``replay`` console script; returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bundle is None and not (args.live and args.node_already_running):
        parser.error('--bundle is required (unless --live --node-already-running)')
    command = ['replay', *(argv if argv is not None else sys.argv[1:])]
    try:
        if args.live:
            if len(args.bags) != 1 or args.workers != 1:
                raise ParameterError('--live plays one bag, in one process')
            if args.write_bag:
                raise ParameterError('--write-bag is for offline replay (in live mode record '
                                     "the node's outputs with ros2 bag record)")
            from mamba_perception.replay.live import LiveOptions
            options = LiveOptions(
                rate=args.rate, sim_time=args.sim_time, clock_hz=args.clock_hz,
                node_name=args.node_name, namespace=args.node_namespace, cameras=args.cameras,
                input_transport=args.input_transport,
                wait_for_node_s=args.wait_for_node or (30.0 if args.node_already_running
                                                       else 120.0),
                max_frames=args.max_frames, overlays=args.overlays)
            result = run_live_replay(
                args.bags[0], args.bundle, args.out, topics=args.topics,
                gt_detections=args.gt_detections, gt_masks=args.gt_masks, gt_coco=args.gt_coco,
                gt_mask_dir=args.gt_mask_dir, gt_key=args.gt_key,
                stamp_tolerance_ms=args.stamp_tolerance_ms, device=args.device,
                precision=args.precision, node_already_running=args.node_already_running,
                node_params=args.node_param, live_options=options,
                progress=not args.no_progress, hash_bags=not args.no_hash, argv=command)
            print_summary(result)
            return result.exit_code
        result = run_replay(
            args.bags, args.bundle, args.out, topics=args.topics,
            gt_detections=args.gt_detections, gt_masks=args.gt_masks, gt_coco=args.gt_coco,
            gt_mask_dir=args.gt_mask_dir, gt_key=args.gt_key,
            stamp_tolerance_ms=args.stamp_tolerance_ms, device=args.device,
            precision=args.precision, score_threshold=args.score_threshold,
            nms_iou=args.nms_iou, max_frames=args.max_frames, overlays=args.overlays,
            workers=args.workers, devices=[d for d in args.devices.split(',') if d],
            progress=not args.no_progress, hash_bags=not args.no_hash,
            warmup_iterations=args.warmup_iterations, write_bag=args.write_bag,
            write_bag_storage=args.write_bag_storage, argv=command)
    except ParameterError as err:
        print(f'replay: error: {err}', file=sys.stderr)
        return EXIT_USAGE
    except MambaPerceptionError as err:
        print(f'replay: error: {err}', file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        print('replay: interrupted before any frame was processed', file=sys.stderr)
        return EXIT_INTERRUPTED
    print_summary(result)
    return result.exit_code


def print_summary(result: ReplayResult, file: Any = None) -> None:
    """Print a few console lines rendered from the report dict."""
    file = file or sys.stdout
    r = result.report
    if 'WARNING' in r:
        print(f'WARNING: {r["WARNING"]}', file=file)
    c = r['counts']
    print(f'status {r["status"]}: {c["frames"]} frames from {c["bags"]} bag(s)', file=file)
    for e in r['errors']:
        print(f'error: {e["error"]}', file=file)
    for w in r.get('warnings', ()):
        print(f'warning: {w["bag"]}: {w["warning"]}', file=file)
    if r.get('realtime'):
        rt = r['realtime']
        lat = rt['stamp_to_publish_latency_ms']
        print(f'live: {rt["frames_published"]} frames published, {rt["outputs_received"]} '
              f'with outputs, {rt["dropped_frames"]} dropped', file=file)
        if lat['count']:
            print(f'stamp-to-publish latency p50 {lat["p50_ms"]:.1f} ms, p99 '
                  f'{lat["p99_ms"]:.1f} ms', file=file)
    else:
        total = r['latency_ms']['total_ms']
        if total['count']:
            print(f'latency total p50 {total["p50_ms"]:.1f} ms, p99 {total["p99_ms"]:.1f} ms',
                  file=file)
    if r.get('detection'):
        print(f'detection mAP {r["detection"]["mAP"]}', file=file)
    if r.get('segmentation'):
        print(f'segmentation mIoU {r["segmentation"]["mIoU"]}', file=file)
    for b in r['bags']:
        if b.get('predictions_bag'):
            print(f'predictions bag: {b["predictions_bag"]["path"]}', file=file)
    print(f'report: {result.paths["markdown"]}', file=file)
    print(f'report.json: {result.paths["json"]}', file=file)


if __name__ == '__main__':
    sys.exit(main())
