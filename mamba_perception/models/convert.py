r"""``convert``: official VMamba / Vim checkpoints (.pth) -> mamba_perception bundles.

One converter per source format, chosen by the caller (no format sniffing)::

    convert classification vssm1_tiny_0230s_ckpt_epoch_264.pth in1k.safetensors \
        --backbone vmamba_tiny
    convert mmdet mask_rcnn_vssm_fpn_coco_tiny_s_epoch_12.pth coco.safetensors \
        --backbone vmamba_tiny
    convert mmseg upernet_vssm_4xb4-160k_ade20k-512x512_tiny_s_iter_160000.pth ade.safetensors \
        --backbone vmamba_tiny

The ``.pth`` files are read with the models package's allow-listed weights-only unpickler
(:func:`mamba_perception.models.checkpoint.load_checkpoint_file`); the backbone keys go through
the architecture's ``checkpoint_filter_fn``. Head keys are mapped by explicit tables (below);
any key left over, missing or mis-shaped is an error that names it.

**classification** -> backbone-only bundle (``tasks: []``) in the dense-task layout, the start of
fine-tuning; the ImageNet classifier is dropped and VMamba's ``outnorm0-3`` (absent from
classification checkpoints) keep their identity initialisation.

**mmdet** (Mask R-CNN / Faster R-CNN with FPN, ``state_dict`` of an mmengine checkpoint) ->
torchvision layout; see :mod:`mamba_perception.models.heads.detection` for the numerical
conventions. Key map::

    neck.lateral_convs.{i}.conv.*          -> detector.neck.inner_blocks.{i}.0.*
    neck.fpn_convs.{i}.conv.*              -> detector.neck.layer_blocks.{i}.0.*
    rpn_head.rpn_conv.*                    -> detector.rpn.head.conv.0.0.*
    rpn_head.rpn_cls.* / rpn_reg.*         -> detector.rpn.head.cls_logits.* / bbox_pred.*
    roi_head.bbox_head.shared_fcs.{0,1}.*  -> detector.roi_heads.box_head.fc6.* / fc7.*
    roi_head.bbox_head.fc_cls.*            -> detector.roi_heads.box_predictor.cls_score.*
        rows rotated: mmdet [fg_0..fg_79, bg] -> torchvision [bg, fg_0..fg_79]
    roi_head.bbox_head.fc_reg.*            -> detector.roi_heads.box_predictor.bbox_pred.*
        4 zero rows prepended for the background (class-agnostic 4 rows are repeated)
    roi_head.mask_head.convs.{i}.conv.*    -> detector.roi_heads.mask_head.{i}.0.*
    roi_head.mask_head.upsample.*          -> detector.roi_heads.mask_predictor.conv5_mask.*
    roi_head.mask_head.conv_logits.*       -> detector.roi_heads.mask_predictor.mask_fcn_logits.*
        1 zero row prepended for the background

**mmseg** (UperNet, ``state_dict``): ``decode_head.*`` is already our layout;
``auxiliary_head.*`` (training-only FCN head) is dropped unless ``--keep-auxiliary``.

Class names default to COCO-80 (mmdet) and ADE20K-150 (mmseg); input policies to the official
test pipelines (mmdet: keep-ratio resize into 1333x800; mmseg: into 2048x512).
"""

import argparse
import hashlib
import os
import re
import sys
from typing import Any, Mapping, Optional, Sequence

import torch

from mamba_perception.errors import CheckpointError, MambaPerceptionError

MMDET_INPUT = dict(max_long_side_px=1333, max_short_side_px=800, allow_upscale=True)
MMSEG_INPUT = dict(max_long_side_px=2048, max_short_side_px=512, allow_upscale=True)

# (regex on the mmdet key without its section prefix, replacement in our layout)
MMDET_RULES: list[tuple[str, str]] = [
    (r'^neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)$', r'detector.neck.inner_blocks.\1.0.\2'),
    (r'^neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)$', r'detector.neck.layer_blocks.\1.0.\2'),
    (r'^rpn_head\.rpn_conv\.(weight|bias)$', r'detector.rpn.head.conv.0.0.\1'),
    (r'^rpn_head\.rpn_cls\.(weight|bias)$', r'detector.rpn.head.cls_logits.\1'),
    (r'^rpn_head\.rpn_reg\.(weight|bias)$', r'detector.rpn.head.bbox_pred.\1'),
    (r'^roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)$',
     r'detector.roi_heads.box_head.fc6.\1'),
    (r'^roi_head\.bbox_head\.shared_fcs\.1\.(weight|bias)$',
     r'detector.roi_heads.box_head.fc7.\1'),
    (r'^roi_head\.bbox_head\.fc_cls\.(weight|bias)$',
     r'detector.roi_heads.box_predictor.cls_score.\1'),
    (r'^roi_head\.bbox_head\.fc_reg\.(weight|bias)$',
     r'detector.roi_heads.box_predictor.bbox_pred.\1'),
    (r'^roi_head\.mask_head\.convs\.(\d+)\.conv\.(weight|bias)$',
     r'detector.roi_heads.mask_head.\1.0.\2'),
    (r'^roi_head\.mask_head\.upsample\.(weight|bias)$',
     r'detector.roi_heads.mask_predictor.conv5_mask.\1'),
    (r'^roi_head\.mask_head\.conv_logits\.(weight|bias)$',
     r'detector.roi_heads.mask_predictor.mask_fcn_logits.\1'),
]


# --------------------------------------------------------------------------------------------
# Pure state-dict converters (tested against key/shape manifests)

def _split_backbone(sd: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    backbone = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
    rest = {k: v for k, v in sd.items() if not k.startswith('backbone.')}
    return backbone, rest


def _filter_backbone(backbone_name: str, sd: Mapping[str, torch.Tensor]) -> dict:
    from mamba_perception.models import CHECKPOINT_FILTERS, architecture
    return dict(CHECKPOINT_FILTERS[architecture(backbone_name)](dict(sd)))


def convert_mmdet_state_dict(sd: Mapping[str, torch.Tensor], backbone_name: str
                             ) -> tuple[dict, dict]:
    """Map an mmdet FPN Mask/Faster R-CNN state dict onto ours.

    Returns ``(state_dict, detection_config)``; the config (``num_classes``, widths,
    ``with_mask``) is read from the tensor shapes. Unmapped keys raise :class:`CheckpointError`.
    """
    backbone, rest = _split_backbone(sd)
    if not backbone:
        raise CheckpointError("mmdet checkpoint has no 'backbone.*' keys")
    out = {f'backbone.{k}': v for k, v in _filter_backbone(backbone_name, backbone).items()}
    rules = [(re.compile(p), r) for p, r in MMDET_RULES]
    leftovers = []
    for key, value in rest.items():
        for pattern, repl in rules:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            leftovers.append(key)
    if leftovers:
        raise CheckpointError(f'mmdet checkpoint keys with no counterpart in our Mask R-CNN: '
                              f'{", ".join(sorted(leftovers)[:20])}')
    for key in ('detector.roi_heads.box_predictor.cls_score.weight',
                'detector.neck.inner_blocks.0.0.weight', 'detector.roi_heads.box_head.fc6.weight'):
        if key not in out:
            raise CheckpointError(f'mmdet checkpoint lacks the tensor that maps to {key!r}')
    pre = 'detector.roi_heads.'
    num_classes = out[pre + 'box_predictor.cls_score.weight'].shape[0] - 1
    for suffix in ('weight', 'bias'):  # fc_cls: background last -> first
        key = f'{pre}box_predictor.cls_score.{suffix}'
        out[key] = torch.cat([out[key][-1:], out[key][:-1]])
        key = f'{pre}box_predictor.bbox_pred.{suffix}'
        reg = out[key]
        if reg.shape[0] == 4:  # reg_class_agnostic: one box for all classes
            reg = reg.repeat(num_classes, *([1] * (reg.ndim - 1)))
        if reg.shape[0] != 4 * num_classes:
            raise CheckpointError(f'mmdet fc_reg.{suffix} has {reg.shape[0]} rows; expected '
                                  f'4 x {num_classes} classes')
        out[key] = torch.cat([reg.new_zeros((4, *reg.shape[1:])), reg])
        key = f'{pre}mask_predictor.mask_fcn_logits.{suffix}'
        if key in out:
            logits = out[key]
            out[key] = torch.cat([logits.new_zeros((1, *logits.shape[1:])), logits])
    with_mask = any(k.startswith(pre + 'mask_') for k in out)
    config = dict(num_classes=int(num_classes),
                  fpn_channels=int(out['detector.neck.inner_blocks.0.0.weight'].shape[0]),
                  representation_size=int(out[pre + 'box_head.fc6.weight'].shape[0]),
                  with_mask=with_mask)
    if with_mask:
        config['mask_channels'] = int(out[pre + 'mask_head.0.0.weight'].shape[0])
    return out, config


def convert_mmseg_state_dict(sd: Mapping[str, torch.Tensor], backbone_name: str,
                             keep_auxiliary: bool = False) -> tuple[dict, dict]:
    """Map an mmseg UperNet state dict onto ours; returns ``(state_dict, seg_config)``."""
    backbone, rest = _split_backbone(sd)
    if not backbone:
        raise CheckpointError("mmseg checkpoint has no 'backbone.*' keys")
    out = {f'backbone.{k}': v for k, v in _filter_backbone(backbone_name, backbone).items()}
    leftovers = []
    for key, value in rest.items():
        if key.startswith('decode_head.'):
            out[key] = value
        elif key.startswith('auxiliary_head.'):
            if keep_auxiliary:
                out[key] = value
        else:
            leftovers.append(key)
    if leftovers:
        raise CheckpointError(f'mmseg checkpoint keys with no counterpart in our UperNet: '
                              f'{", ".join(sorted(leftovers)[:20])}')
    if 'decode_head.conv_seg.weight' not in out:
        raise CheckpointError("mmseg checkpoint lacks 'decode_head.conv_seg.weight' (is it an "
                              'UperNet checkpoint?)')
    weight = out['decode_head.conv_seg.weight']
    config = dict(num_classes=int(weight.shape[0]), channels=int(weight.shape[1]),
                  pool_scales=[1, 2, 3, 6][:len({k.split('.')[2] for k in out
                                                 if k.startswith('decode_head.psp_modules.')})])
    if keep_auxiliary and any(k.startswith('auxiliary_head.') for k in out):
        config['auxiliary'] = True
    return out, config


def convert_classification_state_dict(sd: Mapping[str, torch.Tensor], backbone_name: str,
                                      model: torch.nn.Module) -> dict:
    """Map an official ImageNet state dict onto the dense-layout backbone ``model``.

    The classifier is dropped; keys the classification checkpoint cannot have (VMamba's
    ``outnorm{i}``) keep the model's initialisation.
    """
    filtered = _filter_backbone(backbone_name, sd)
    own = model.state_dict()
    filtered = {k: v for k, v in filtered.items()
                if not k.startswith(('classifier.', 'head.')) or k in own}
    for key in own:
        if key not in filtered and key.startswith(('outnorm', 'fpn')):
            filtered[key] = own[key].clone()
    return {f'backbone.{k}': v for k, v in filtered.items()}


# --------------------------------------------------------------------------------------------
# File-level conversion

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def convert_file(kind: str, src: str, dst: str, backbone: str, *,
                 class_names: Optional[Sequence[str]] = None,
                 trained_on: Optional[str] = None, keep_auxiliary: bool = False,
                 key: Optional[str] = None) -> Any:
    """Convert one checkpoint file into a bundle at ``dst``; returns the :class:`Bundle`."""
    from mamba_perception.models import create_model
    from mamba_perception.models.bundle import (
        check_state_dict,
        dense_backbone_kwargs,
        make_metadata,
        save_bundle,
    )
    from mamba_perception.models.checkpoint import extract_state_dict, load_checkpoint_file
    from mamba_perception.models.heads import build_perception_model
    from mamba_perception.models.heads.classes import ADE20K_CLASSES, COCO_CLASSES

    obj = load_checkpoint_file(src)
    sd = extract_state_dict(obj, key=key, source=f'checkpoint {src!r}')
    backbone_cfg = {'name': backbone, 'kwargs': dense_backbone_kwargs(backbone)}
    config: dict = {'backbone': backbone_cfg, 'detection': None, 'segmentation': None}
    if kind == 'classification':
        dense = create_model(backbone, **backbone_cfg['kwargs'])
        state = convert_classification_state_dict(sd, backbone, dense)
        names: Sequence[str] = []
        default_trained_on = 'ImageNet-1k classification (official release)'
        policy: dict = {}
    elif kind == 'mmdet':
        state, config['detection'] = convert_mmdet_state_dict(sd, backbone)
        names = class_names or (COCO_CLASSES if config['detection']['num_classes'] == 80 else [])
        default_trained_on = 'COCO train2017 detection (official mmdet release)'
        policy = MMDET_INPUT
    elif kind == 'mmseg':
        state, config['segmentation'] = convert_mmseg_state_dict(sd, backbone, keep_auxiliary)
        names = class_names or (ADE20K_CLASSES
                                if config['segmentation']['num_classes'] == 150 else [])
        default_trained_on = 'ADE20K semantic segmentation (official mmseg release)'
        policy = MMSEG_INPUT
    else:
        raise CheckpointError(f'unknown checkpoint kind {kind!r}: use classification, mmdet '
                              'or mmseg')
    for task in ('detection', 'segmentation'):
        if config[task] is not None and len(names) != config[task]['num_classes']:
            raise CheckpointError(f'{src}: {task} head has {config[task]["num_classes"]} '
                                  f'classes; pass --classes with that many names '
                                  f'(got {len(names)})')
    model = build_perception_model(config, device='meta')
    check_state_dict(model, state, where=f'converted {src}')
    meta = make_metadata(
        config=config, class_names=list(names), input_policy=policy,
        trained_on=trained_on or default_trained_on,
        source={'kind': kind, 'file': os.path.basename(src), 'sha256': _sha256(src),
                'converter': 'mamba_perception.models.convert'})
    return save_bundle(dst, state, meta)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog='convert', description='Convert an official VMamba/Vim checkpoint into a bundle.')
    parser.add_argument('kind', choices=('classification', 'mmdet', 'mmseg'),
                        help='source format (never guessed)')
    parser.add_argument('checkpoint', help='official .pth file')
    parser.add_argument('output', help='bundle to write (.safetensors)')
    parser.add_argument('--backbone', required=True,
                        help='registry name of the backbone, e.g. vmamba_tiny')
    parser.add_argument('--classes', help='text file with one class name per line '
                        '(default: COCO-80 for mmdet, ADE20K-150 for mmseg)')
    parser.add_argument('--trained-on', help='free text stored in the metadata')
    parser.add_argument('--keep-auxiliary', action='store_true',
                        help='mmseg: keep the auxiliary FCN head (training only)')
    parser.add_argument('--key', help='checkpoint entry holding the weights (default: '
                        'model / state_dict / model_ema / module, first found)')
    args = parser.parse_args(argv)
    names = None
    if args.classes:
        with open(args.classes, encoding='utf-8') as f:
            names = [line.strip() for line in f if line.strip()]
    try:
        bundle = convert_file(args.kind, args.checkpoint, args.output, args.backbone,
                              class_names=names, trained_on=args.trained_on,
                              keep_auxiliary=args.keep_auxiliary, key=args.key)
    except (MambaPerceptionError, KeyError) as err:
        print(f'convert: error: {err}', file=sys.stderr)
        return 1
    print(f'wrote {args.output}: {bundle.name}, {len(bundle.tensors)} tensors, '
          f'{bundle.content_hash}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
