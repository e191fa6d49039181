"""Fine-tuning on a tiny generated dataset: the loss must go down and a loadable bundle result."""

import csv
import json

import cv2
import numpy as np
import pytest

from mamba_perception.models.bundle import create_random_bundle, load_bundle
from mamba_perception.pipeline import Pipeline
from mamba_perception.train import build_parser, main, train

COLORS = {1: (230, 40, 40), 2: (40, 220, 60)}  # class id -> RGB
CATEGORY_IDS = {1: 3, 2: 7}  # non-contiguous COCO category ids


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    """Six 64x80 images with one red and one green rectangle; COCO JSON and PNG masks."""
    root = tmp_path_factory.mktemp('data')
    (root / 'images').mkdir()
    (root / 'masks').mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(6):
        h, w = 64, 80
        image = rng.integers(90, 130, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        for cls, color in COLORS.items():
            bw, bh = int(rng.integers(16, 28)), int(rng.integers(16, 28))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            image[y:y + bh, x:x + bw] = color
            mask[y:y + bh, x:x + bw] = cls
            annotations.append({
                'id': len(annotations) + 1, 'image_id': i + 1, 'category_id': CATEGORY_IDS[cls],
                'bbox': [x, y, bw, bh], 'area': bw * bh, 'iscrowd': 0,
                'segmentation': [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
        mask[:, :2] = 255  # ignored strip
        name = f'img{i}.png'
        cv2.imwrite(str(root / 'images' / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / 'masks' / name), mask)
        images.append({'id': i + 1, 'file_name': name, 'height': h, 'width': w})
    coco = {'images': images, 'annotations': annotations,
            'categories': [{'id': 7, 'name': 'green'}, {'id': 3, 'name': 'red'}]}
    (root / 'train.json').write_text(json.dumps(coco))
    (root / 'classes.txt').write_text('background\nred\ngreen\n')
    return root


def run_args(dataset, out, task, steps=30, extra=()):
    base = ['--out', str(out), '--steps', str(steps), '--batch-size', '2', '--workers', '0',
            '--device', 'cpu', '--lr', '1e-3', '--no-augment', '--quiet', '--eval-every', '30',
            '--save-every', '30']
    if task == 'detection':
        base += ['--train-json', str(dataset / 'train.json'), '--train-images',
                 str(dataset / 'images'), '--val-json', str(dataset / 'train.json')]
    else:
        base += ['--train-images', str(dataset / 'images'), '--train-masks',
                 str(dataset / 'masks'), '--val-images', str(dataset / 'images'),
                 '--val-masks', str(dataset / 'masks'), '--classes',
                 str(dataset / 'classes.txt')]
    return build_parser().parse_args([task, *base, *extra])


def mean(values):
    return sum(values) / len(values)


def test_detection_finetune_30_steps(dataset, tmp_path):
    init = create_random_bundle(tmp_path / 'init.safetensors', tasks=('detection',),
                                num_classes=5)  # other class count: class layers re-initialised
    out = tmp_path / 'run'
    summary = train(run_args(dataset, out, 'detection', extra=['--init', str(init.path)]))
    losses = summary['losses']
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert mean(losses[-5:]) < 0.8 * mean(losses[:5]), losses
    assert summary['init_tensors_copied'] > 0 and summary['init_tensors_fresh'] > 0
    bundle = load_bundle(summary['bundle'])
    assert not bundle.random_init and bundle.class_names == ['red', 'green']
    assert bundle.metadata['source']['init'] == init.content_hash
    result = Pipeline(bundle, score_threshold=0.0)(np.zeros((64, 80, 3), np.uint8))
    assert result.detections is not None and result.class_mask is None
    evals = list(csv.DictReader(open(out / 'eval.csv')))
    assert len(evals) == 1 and 0.0 <= float(evals[0]['mAP']) <= 1.0
    assert len(list(csv.reader(open(out / 'log.csv')))) == 31  # header + 30 steps
    # Resume continues from the checkpoint's step.
    again = train(run_args(dataset, out, 'detection', steps=32,
                           extra=['--init', str(init.path), '--resume']))
    assert again['steps'] == 32 and len(again['losses']) == 2


def test_segmentation_finetune_30_steps(dataset, tmp_path, capsys):
    out = tmp_path / 'seg'
    argv = ['segmentation', *_argv(dataset, out), '--backbone', 'vmamba_test']
    assert main(argv) == 0
    assert 'wrote' in capsys.readouterr().out
    summary = json.loads((out / 'summary.json').read_text())
    log = list(csv.DictReader(open(out / 'log.csv')))
    losses = [float(row['loss']) for row in log]
    assert len(losses) == 30 and mean(losses[-5:]) < 0.8 * mean(losses[:5]), losses
    assert 0.0 <= summary['evals'][0]['mIoU'] <= 1.0
    bundle = load_bundle(out / 'model.safetensors')
    assert bundle.class_names == ['background', 'red', 'green']
    mask = Pipeline(bundle)(np.zeros((64, 80, 3), np.uint8)).class_mask
    assert mask.shape == (64, 80) and mask.max() <= 2


def _argv(dataset, out):
    args = run_args(dataset, out, 'segmentation')
    return ['--out', str(out), '--steps', '30', '--batch-size', '2', '--workers', '0',
            '--device', 'cpu', '--lr', '1e-3', '--no-augment', '--quiet', '--eval-every', '30',
            '--train-images', args.train_images, '--train-masks', args.train_masks,
            '--val-images', args.val_images, '--val-masks', args.val_masks,
            '--classes', args.classes]


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(dataset, tmp_path):
    """DistributedDataParallel over Gloo: two CPU processes, one bundle written by rank 0."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    torchrun = shutil.which('torchrun') or os.path.join(os.path.dirname(sys.executable),
                                                        'torchrun')
    out = tmp_path / 'ddp'
    cmd = [torchrun, '--standalone', '--nproc-per-node', '2', '-m',
           'mamba_perception.train', 'segmentation', '--backbone', 'vmamba_test',
           *_argv(dataset, out)]
    cmd[cmd.index('--steps') + 1] = '4'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    # Own process group: on a timeout the worker processes go too, not only torchrun (orphaned
    # workers would wait on their Gloo peers forever).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f'torchrun did not finish in 240 s:\n{stderr[-3000:]}')
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['steps'] == 4 and len(list(csv.reader(open(out / 'log.csv')))) == 5
    load_bundle(out / 'model.safetensors')


def test_init_from_backbone_only_bundle(dataset, tmp_path):
    """An ImageNet (backbone-only) bundle starts a segmentation fine-tune: backbone copied."""
    import torch

    from mamba_perception.models import create_model
    from mamba_perception.models.convert import main as convert
    src = tmp_path / 'cls.pth'
    torch.save({'model': create_model('vmamba_test').state_dict()}, src)
    init = tmp_path / 'in1k.safetensors'
    assert convert(['classification', str(src), str(init), '--backbone', 'vmamba_test']) == 0
    args = run_args(dataset, tmp_path / 'run', 'segmentation', steps=2,
                    extra=['--init', str(init)])
    summary = train(args)
    backbone_tensors = sum(1 for k in load_bundle(init).tensors if k.startswith('backbone.'))
    assert summary['init_tensors_copied'] == backbone_tensors
    assert summary['init_tensors_fresh'] > 0  # the new UperNet
