r"""``train``: fine-tune a bundle on your own detection or segmentation data.

Data formats:

* **detection**: a COCO-format JSON (``images``, ``annotations`` with ``bbox`` [x, y, w, h] and
  optional polygon ``segmentation``, ``categories``) plus its image folder. Categories become
  class ids 0..K-1 in increasing category-id order; ``iscrowd`` annotations are skipped. With
  polygons on every annotation the mask branch is trained too, otherwise boxes only.
* **segmentation**: an image folder and a mask folder of PNGs with the same file stems, pixel
  value = class id, 255 = ignore (``--reduce-zero-label`` for ADE20K-style 0 = "other").

Runs on one GPU/CPU, or several with ``torchrun --nproc-per-node N -m mamba_perception.train``
(DistributedDataParallel; NCCL on CUDA, Gloo on CPU)::

    train detection --init vmamba_tiny_coco.safetensors --train-json train.json \\
        --train-images imgs/ --val-json val.json --val-images imgs/ --out runs/mine \\
        --steps 20000 --batch-size 4 --amp bf16

Starting point (``--init``): any bundle. Tensors whose name and shape match the new model are
copied (a COCO bundle fine-tuned to 80 COCO classes keeps everything; a new class count keeps
backbone, FPN and RPN and re-initialises the class-specific layers); the backbone must load
completely. Without ``--init``, ``--backbone NAME`` starts from random weights.

Each run writes to ``--out``: ``last.pt`` (weights, optimiser, scaler, step; ``--resume``
continues from it), ``log.csv`` (losses and learning rate), ``eval.csv`` (COCO mAP via
faster-coco-eval or mIoU from a confusion matrix, every ``--eval-every`` steps), TensorBoard
events with ``--tensorboard``, and ``model.safetensors``, the fine-tuned bundle.
"""

import argparse
import csv
import json
import logging
import math
import os
from pathlib import Path
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
import torch.distributed as dist
import torch.nn.functional as F

from mamba_perception.errors import ParameterError

log = logging.getLogger('mamba_perception.train')
IGNORE_INDEX = 255
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp')


# --------------------------------------------------------------------------------------------
# Data

def _read_rgb(path: str) -> np.ndarray:
    import cv2
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ParameterError(f'image {path!r} cannot be read')
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format boxes (and polygon masks) as (image uint8 HWC, target dict) pairs."""

    def __init__(self, json_path: str, image_dir: str) -> None:
        with open(json_path, encoding='utf-8') as f:
            coco = json.load(f)
        for key in ('images', 'annotations', 'categories'):
            if key not in coco:
                raise ParameterError(f'{json_path}: COCO JSON has no {key!r} list')
        cats = sorted(coco['categories'], key=lambda c: c['id'])
        self.class_names = [c['name'] for c in cats]
        self.cat_to_class = {c['id']: i for i, c in enumerate(cats)}
        self.class_to_cat = [c['id'] for c in cats]
        self.images = sorted(coco['images'], key=lambda im: im['id'])
        self.image_dir = image_dir
        self.json_path = json_path
        self.anns: dict = {im['id']: [] for im in self.images}
        for ann in coco['annotations']:
            if ann.get('iscrowd', 0) or ann['image_id'] not in self.anns:
                continue
            self.anns[ann['image_id']].append(ann)
        self.with_masks = all(isinstance(a.get('segmentation'), list) and a['segmentation']
                              for anns in self.anns.values() for a in anns)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, dict]:
        import cv2
        info = self.images[index]
        image = _read_rgb(os.path.join(self.image_dir, info['file_name']))
        h, w = image.shape[:2]
        boxes, labels, masks = [], [], []
        for ann in self.anns[info['id']]:
            x, y, bw, bh = ann['bbox']
            if bw <= 1 or bh <= 1:
                continue
            boxes.append([x, y, x + bw, y + bh])
            labels.append(self.cat_to_class[ann['category_id']])
            if self.with_masks:
                mask = np.zeros((h, w), np.uint8)
                for poly in ann['segmentation']:
                    pts = np.asarray(poly, np.float32).reshape(-1, 2)
                    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
                masks.append(mask)
        target = {'boxes': np.asarray(boxes, np.float32).reshape(-1, 4),
                  'labels': np.asarray(labels, np.int64), 'image_id': info['id']}
        if self.with_masks:
            target['masks'] = np.asarray(masks, np.uint8).reshape(-1, h, w)
        return image, target


class SegmentationFolder(torch.utils.data.Dataset):
    """Images + same-stem PNG class-id masks (255 = ignore)."""

    def __init__(self, image_dir: str, mask_dir: str, reduce_zero_label: bool = False) -> None:
        masks = {p.stem: p for p in Path(mask_dir).glob('*.png')}
        self.items = [(str(p), str(masks[p.stem])) for p in sorted(Path(image_dir).iterdir())
                      if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in masks]
        if not self.items:
            raise ParameterError(f'no image in {image_dir!r} has a PNG mask of the same name in '
                                 f'{mask_dir!r}')
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[np.ndarray, dict]:
        import cv2
        image_path, mask_path = self.items[index]
        image = _read_rgb(image_path)
        mask = cv2.imread(mask_path, cv2.IMREAD_UNCHANGED)
        if mask is None or mask.ndim != 2 or mask.shape != image.shape[:2]:
            raise ParameterError(f'mask {mask_path!r} is not a single-channel PNG of the '
                                 f'image size {image.shape[:2]}')
        mask = mask.astype(np.int64)
        if self.reduce_zero_label:
            mask = np.where(mask == 0, IGNORE_INDEX, mask - 1)
            mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX
        return image, {'mask': mask.astype(np.uint8), 'image_id': index}


class Augment:
    """Random scale (keep aspect) into the input policy, horizontal flip, colour jitter."""

    def __init__(self, policy: dict, train: bool, scale_range: Sequence[float] = (0.75, 1.25),
                 seed: int = 0) -> None:
        self.policy, self.train, self.scale_range = policy, train, scale_range
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: np.ndarray, target: dict) -> tuple[np.ndarray, dict]:
        """Return the transformed image and target (boxes, masks, ``size`` = (h, w))."""
        import cv2

        from mamba_perception.pipeline import resized_size
        h, w = image.shape[:2]
        rh, rw = resized_size(h, w, self.policy)
        if self.train:
            s = self.rng.uniform(*self.scale_range)
            rh, rw = max(8, int(rh * s + 0.5)), max(8, int(rw * s + 0.5))
        target = dict(target)
        if (rh, rw) != (h, w):
            image = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_LINEAR)
            if 'boxes' in target:
                target['boxes'] = target['boxes'] * np.array([rw / w, rh / h] * 2, np.float32)
            for key in ('masks', 'mask'):
                if key in target and target[key].size:
                    m = target[key]
                    m = m[None] if m.ndim == 2 else m
                    m = np.stack([cv2.resize(x, (rw, rh), interpolation=cv2.INTER_NEAREST)
                                  for x in m])
                    target[key] = m[0] if key == 'mask' else m
                elif key == 'masks':
                    target[key] = np.zeros((0, rh, rw), np.uint8)
        if self.train and self.rng.random() < 0.5:
            image = image[:, ::-1]
            if 'boxes' in target:
                b = target['boxes'].copy()
                b[:, [0, 2]] = rw - target['boxes'][:, [2, 0]]
                target['boxes'] = b
            for key in ('masks', 'mask'):
                if key in target:
                    target[key] = target[key][..., ::-1]
        if self.train:
            alpha, beta = self.rng.uniform(0.8, 1.2), self.rng.uniform(-20, 20)
            image = np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)
        target['size'] = (rh, rw)
        return np.ascontiguousarray(image), {k: np.ascontiguousarray(v)
                                             if isinstance(v, np.ndarray) else v
                                             for k, v in target.items()}


class _Transformed(torch.utils.data.Dataset):
    def __init__(self, dataset: torch.utils.data.Dataset, transform: Augment) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        return self.transform(*self.dataset[index])


def collate(batch: list, mean: Sequence[float], std: Sequence[float], pad: int = 32) -> dict:
    """Normalise and pad a list of (image, target) to one (B, 3, H, W) tensor + targets."""
    from mamba_perception.pipeline import padded_size
    ph = max(padded_size(*t['size'], pad)[0] for _, t in batch)
    pw = max(padded_size(*t['size'], pad)[1] for _, t in batch)
    images = torch.zeros(len(batch), 3, ph, pw)
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)
    targets = []
    for i, (image, target) in enumerate(batch):
        h, w = target['size']
        images[i, :, :h, :w] = (torch.from_numpy(image).permute(2, 0, 1).float() - mean_t) / std_t
        t: dict = {'size': (h, w), 'image_id': target['image_id']}
        if 'boxes' in target:
            t['boxes'] = torch.from_numpy(target['boxes'])
            t['labels'] = torch.from_numpy(target['labels'])
            if 'masks' in target:
                m = torch.zeros(len(target['masks']), ph, pw, dtype=torch.uint8)
                m[:, :h, :w] = torch.from_numpy(target['masks'])
                t['masks'] = m
        if 'mask' in target:
            m = torch.full((ph, pw), IGNORE_INDEX, dtype=torch.long)
            m[:h, :w] = torch.from_numpy(target['mask']).long()
            t['mask'] = m
        targets.append(t)
    return {'images': images, 'targets': targets}


# --------------------------------------------------------------------------------------------
# Model, losses

class TrainModule(nn.Module):
    """One forward returning the loss dict, so DistributedDataParallel sees a single call."""

    def __init__(self, model: nn.Module, aux_weight: float = 0.4) -> None:
        super().__init__()
        self.model = model
        self.aux_weight = aux_weight

    def forward(self, images: torch.Tensor, targets: list) -> dict:
        """Return the named losses of the model's heads for one batch."""
        feats = self.model.features(images)
        losses: dict = {}
        if self.model.detector is not None and 'boxes' in targets[0]:
            det_targets = [{k: t[k] for k in ('boxes', 'labels', 'masks') if k in t}
                           for t in targets]
            losses.update(self.model.detector(feats, [t['size'] for t in targets], det_targets))
        if self.model.decode_head is not None and 'mask' in targets[0]:
            labels = torch.stack([t['mask'] for t in targets])
            logits = self.model.decode_head(feats)
            losses['loss_seg'] = _seg_loss(logits, labels)
            if self.model.auxiliary_head is not None:
                aux = self.model.auxiliary_head(feats)
                losses['loss_aux'] = self.aux_weight * _seg_loss(aux, labels)
        if not losses:
            raise ParameterError('the data has no targets for any head of this model')
        return losses


def _seg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode='bilinear',
                           align_corners=False)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def init_from_bundle(model: nn.Module, bundle: Any) -> tuple[int, int]:
    """Copy every bundle tensor whose name and shape match; the backbone must load fully.

    Returns (tensors copied, tensors left at their initialisation).
    """
    own = model.state_dict()
    copied = {k: v for k, v in bundle.tensors.items() if k in own and own[k].shape == v.shape}
    missing_backbone = [k for k in own if k.startswith('backbone.') and k not in copied]
    if missing_backbone:
        raise ParameterError(f'--init bundle {bundle.path} does not provide the backbone: '
                             f'{len(missing_backbone)} backbone tensors missing or mis-shaped, '
                             f'e.g. {missing_backbone[0]}')
    model.load_state_dict({**own, **copied})
    return len(copied), len(own) - len(copied)


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """AdamW groups: no weight decay on norms, biases and the SSM's A_logs / Ds."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(('.bias', 'A_logs', 'Ds', 'A_b_log', 'D_b', 'A_log',
                                             'D')) or 'norm' in name
        (no_decay if skip else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then polynomial (power 1) decay to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * max(0.0, 1.0 - (step - warmup) / max(1, total - warmup))


# --------------------------------------------------------------------------------------------
# Evaluation

def evaluate(pipeline: Any, dataset: torch.utils.data.Dataset, task: str,
             num_classes: int) -> dict:
    """COCO box mAP (faster-coco-eval) or mIoU (confusion matrix, ignore 255) over a dataset."""
    if task == 'segmentation':
        conf = np.zeros((num_classes, num_classes), np.int64)
        for i in range(len(dataset)):
            image, target = dataset[i]
            pred = pipeline(image).class_mask.astype(np.int64)
            gt = target['mask'].astype(np.int64)
            valid = gt != IGNORE_INDEX
            conf += np.bincount(gt[valid] * num_classes + pred[valid],
                                minlength=num_classes ** 2).reshape(num_classes, num_classes)
        inter = np.diag(conf)
        union = conf.sum(0) + conf.sum(1) - inter
        present = conf.sum(1) > 0
        iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
        return {'mIoU': float(np.nanmean(iou[present])) if present.any() else 0.0,
                'aAcc': float(inter.sum() / max(conf.sum(), 1)), 'images': len(dataset)}
    from faster_coco_eval import COCO, COCOeval_faster
    results = []
    for i in range(len(dataset)):
        image, target = dataset[i]
        det = pipeline(image).detections
        for box, score, cls in zip(det.boxes_xyxy_px, det.scores, det.class_ids, strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append({'image_id': target['image_id'], 'category_id':
                            dataset.class_to_cat[int(cls)], 'bbox': [x1, y1, x2 - x1, y2 - y1],
                            'score': float(score)})
    if not results:
        return {'mAP': 0.0, 'AP50': 0.0, 'AP75': 0.0, 'images': len(dataset), 'detections': 0}
    gt = COCO(dataset.json_path)
    ev = COCOeval_faster(gt, gt.loadRes(results), 'bbox', print_function=lambda *a: None)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    stats = ev.stats
    return {'mAP': float(stats[0]), 'AP50': float(stats[1]), 'AP75': float(stats[2]),
            'images': len(dataset), 'detections': len(results)}


# --------------------------------------------------------------------------------------------
# The run

def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world > 1 and not dist.is_initialized():
        backend = 'nccl' if torch.cuda.is_available() else 'gloo'
        dist.init_process_group(backend)
    rank = dist.get_rank() if world > 1 else 0
    local = int(os.environ.get('LOCAL_RANK', '0'))
    return rank, world, local


def _bundle_from(model: nn.Module, base_meta: dict) -> Any:
    from mamba_perception.models.bundle import Bundle, content_hash
    tensors = {k: v.detach().to('cpu').clone() for k, v in model.state_dict().items()}
    meta = dict(base_meta)
    meta['content_hash'] = content_hash(tensors, meta)
    return Bundle(meta, tensors, None)


def train(args: argparse.Namespace) -> dict:
    """Run one fine-tuning job; returns a summary dict (also written to ``summary.json``)."""
    from tqdm import tqdm

    from mamba_perception.models.bundle import (
        dense_backbone_kwargs,
        head_config,
        load_bundle,
        make_metadata,
        save_bundle,
    )
    from mamba_perception.models.heads import build_perception_model
    from mamba_perception.pipeline import Pipeline

    rank, world, local = _distributed()
    device = torch.device(args.device if args.device != 'cuda' else f'cuda:{local}')
    torch.manual_seed(args.seed + rank)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    # data
    if args.task == 'detection':
        if not (args.train_json and args.train_images):
            raise ParameterError('detection needs --train-json and --train-images')
        train_set: Any = CocoDetection(args.train_json, args.train_images)
        class_names = train_set.class_names
        val_set = (CocoDetection(args.val_json, args.val_images or args.train_images)
                   if args.val_json else None)
    else:
        if not (args.train_images and args.train_masks and args.classes):
            raise ParameterError('segmentation needs --train-images, --train-masks, --classes')
        train_set = SegmentationFolder(args.train_images, args.train_masks,
                                       args.reduce_zero_label)
        with open(args.classes, encoding='utf-8') as f:
            class_names = [line.strip() for line in f if line.strip()]
        val_set = (SegmentationFolder(args.val_images, args.val_masks, args.reduce_zero_label)
                   if args.val_masks else None)

    # model
    init = load_bundle(args.init) if args.init else None
    if init is not None:
        backbone = init.metadata['config']['backbone']
        policy = init.input_policy
        size = 'full' if not backbone['name'].endswith('_test') else 'test'
    else:
        if not args.backbone:
            raise ParameterError('give --init BUNDLE or --backbone NAME (random start)')
        backbone = {'name': args.backbone, 'kwargs': dense_backbone_kwargs(args.backbone)}
        policy = {}
        size = 'test' if args.backbone.endswith('_test') else 'full'
    policy = {**(policy or {}), **({'max_long_side_px': args.max_long_side_px,
                                    'max_short_side_px': args.max_short_side_px}
                                   if args.max_long_side_px else {})}
    heads = head_config((args.task,), len(class_names), size)
    if init is not None and init.metadata['config'].get(args.task):
        heads[args.task] = {**init.metadata['config'][args.task],
                            'num_classes': len(class_names)}
    config = {'backbone': backbone, **heads}
    model = build_perception_model(config)
    copied = fresh = 0
    if init is not None:
        copied, fresh = init_from_bundle(model, init)
    model.to(device)
    meta = make_metadata(
        config=config, class_names=class_names, input_policy=policy,
        trained_on=(f'fine-tuned for {args.steps} steps on {args.train_json or args.train_images}'
                    f' from {init.name + " " + init.content_hash if init else "random weights"}'),
        random_init=False,
        source={'kind': 'train', 'init': init.content_hash if init else None,
                'steps': args.steps, 'task': args.task})
    mean, std = meta['input']['mean'], meta['input']['std']

    module: nn.Module = TrainModule(model)
    if world > 1:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == 'cuda' else None,
            find_unused_parameters=True)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    amp_dtype = {'none': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step = 0
    ckpt_path = out / 'last.pt'
    if args.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scaler.load_state_dict(state['scaler'])
        step = int(state['step'])
        log.info('resumed from %s at step %d', ckpt_path, step)

    data = _Transformed(train_set, Augment(meta['input'], train=not args.no_augment,
                                           seed=args.seed + rank))
    sampler = (torch.utils.data.DistributedSampler(data, world, rank, seed=args.seed)
               if world > 1 else torch.utils.data.RandomSampler(
                   data, generator=torch.Generator().manual_seed(args.seed)))
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        collate_fn=lambda b: collate(b, mean, std, int(meta['input']['pad_multiple_px'])),
        drop_last=len(data) >= args.batch_size * world, persistent_workers=args.workers > 0)

    writer = None
    if args.tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / 'tensorboard'))
    log_file = open(out / 'log.csv', 'a', newline='') if rank == 0 else None
    log_writer = csv.writer(log_file) if log_file else None
    losses_seen: list = []
    evals: list = []
    warmup = max(1, int(args.warmup_fraction * args.steps))
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0 or args.quiet,
               desc=f'train {args.task}')
    epoch = 0
    model.train()
    while step < args.steps:
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            sampler.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            if step >= args.steps:
                break
            lr = lr_at(step, args.steps, args.lr, warmup)
            for group in optimizer.param_groups:
                group['lr'] = lr
            images = batch['images'].to(device, non_blocking=True)
            targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()}
                       for t in batch['targets']]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                loss_dict = module(images, targets)
            loss = sum(loss_dict.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f'loss is {loss.item()} at step {step}: '
                                         f'{ {k: float(v) for k, v in loss_dict.items()} }')
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            values = {k: float(v.detach()) for k, v in loss_dict.items()}
            loss_value = float(loss.detach())
            losses_seen.append(loss_value)
            if log_writer is not None:
                if log_file.tell() == 0:
                    log_writer.writerow(['step', 'time_s', 'lr', 'loss', *sorted(values)])
                log_writer.writerow([step, f'{time.time():.3f}', f'{lr:.3e}',
                                     f'{loss_value:.5f}',
                                     *(f'{values[k]:.5f}' for k in sorted(values))])
                log_file.flush()
            if writer is not None:
                writer.add_scalar('train/loss', loss_value, step)
                for k, v in values.items():
                    writer.add_scalar(f'train/{k}', v, step)
            bar.update(1)
            bar.set_postfix(loss=f'{loss_value:.3f}', lr=f'{lr:.1e}')
            if rank == 0 and (step % args.save_every == 0 or step == args.steps):
                torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                            'scaler': scaler.state_dict(), 'step': step}, ckpt_path)
            if rank == 0 and val_set is not None and args.eval_every and (
                    step % args.eval_every == 0 or step == args.steps):
                pipe = Pipeline(_bundle_from(model, meta), device=str(device),
                                score_threshold=0.05)
                result = {'step': step,
                          **evaluate(pipe, val_set, args.task, len(class_names))}
                evals.append(result)
                _append_csv(out / 'eval.csv', result)
                if writer is not None:
                    for k, v in result.items():
                        if k != 'step':
                            writer.add_scalar(f'eval/{k}', v, step)
                model.train()
    bar.close()
    if log_file:
        log_file.close()
    summary: dict = {'steps': step, 'initial_loss': losses_seen[0] if losses_seen else None,
                     'final_loss': losses_seen[-1] if losses_seen else None,
                     'losses': losses_seen, 'evals': evals, 'init_tensors_copied': copied,
                     'init_tensors_fresh': fresh}
    if rank == 0:
        model.eval()
        bundle = save_bundle(out / 'model.safetensors', model, meta)
        summary['bundle'] = bundle.path
        summary['bundle_hash'] = bundle.content_hash
        (out / 'summary.json').write_text(json.dumps(
            {k: v for k, v in summary.items() if k != 'losses'}, indent=1))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, 'a', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``train``."""
    p = argparse.ArgumentParser(prog='train', description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('task', choices=('detection', 'segmentation'))
    p.add_argument('--out', required=True, help='run folder (checkpoint, logs, bundle)')
    p.add_argument('--init', help='bundle to start from (ImageNet, COCO, ADE20K, ...)')
    p.add_argument('--backbone', help='registry backbone for a random start (no --init)')
    p.add_argument('--train-json', help='detection: COCO-format annotations')
    p.add_argument('--train-images', help='image folder')
    p.add_argument('--train-masks', help='segmentation: PNG mask folder')
    p.add_argument('--val-json')
    p.add_argument('--val-images')
    p.add_argument('--val-masks')
    p.add_argument('--classes', help='segmentation: text file, one class name per line')
    p.add_argument('--reduce-zero-label', action='store_true',
                   help='segmentation: mask value 0 is "other" (ignored); ids shift down by 1')
    p.add_argument('--steps', type=int, default=1000)
    p.add_argument('--batch-size', type=int, default=2, help='per process')
    p.add_argument('--lr', type=float, default=1e-4)
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--warmup-fraction', type=float, default=0.05)
    p.add_argument('--clip-grad', type=float, default=0.0, help='max grad norm (0 = off)')
    p.add_argument('--amp', choices=('none', 'fp16', 'bf16'), default='none')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--eval-every', type=int, default=0, help='steps between evaluations')
    p.add_argument('--save-every', type=int, default=500)
    p.add_argument('--resume', action='store_true', help='continue from OUT/last.pt')
    p.add_argument('--max-long-side-px', type=int, help='override the input policy')
    p.add_argument('--max-short-side-px', type=int)
    p.add_argument('--no-augment', action='store_true')
    p.add_argument('--tensorboard', action='store_true')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point."""
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    args = build_parser().parse_args(argv)
    summary = train(args)
    if summary.get('bundle'):
        print(f"wrote {summary['bundle']} ({summary['bundle_hash']}); loss "
              f"{summary['initial_loss']:.4f} -> {summary['final_loss']:.4f}")
    return 0 if math.isfinite(summary.get('final_loss') or 0.0) else 1


if __name__ == '__main__':
    raise SystemExit(main())
