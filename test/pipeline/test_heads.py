"""Heads on plain feature maps: shapes, dtypes, key layouts and the mmdet conventions."""

import pytest
import torch
from torchvision.ops import roi_align

from mamba_perception.models.heads import FCNHead, MaskRCNNHead, UPerHead
from mamba_perception.models.heads.detection import (
    AlignedMultiScaleRoIAlign,
    MMDetAnchorGenerator,
)

CHANNELS = [16, 32, 64, 128]


def feature_maps(batch=2, height=64, width=96, channels=CHANNELS):
    torch.manual_seed(0)
    return [torch.randn(batch, c, height // s, width // s)
            for c, s in zip(channels, (4, 8, 16, 32), strict=True)]


def test_uperhead_shapes_and_mmseg_keys():
    head = UPerHead(CHANNELS, num_classes=150, channels=32).eval()
    out = head(feature_maps(height=256, width=128))
    assert out.shape == (2, 150, 64, 32) and out.dtype == torch.float32
    keys = set(head.state_dict())
    for key in ('psp_modules.0.1.conv.weight', 'psp_modules.3.1.bn.running_var',
                'bottleneck.conv.weight', 'lateral_convs.2.conv.weight',
                'fpn_convs.0.bn.weight', 'fpn_bottleneck.conv.weight', 'conv_seg.weight',
                'conv_seg.bias'):
        assert key in keys, key
    assert not any(k.endswith('conv.bias') for k in keys)  # ConvModule: no bias before BN
    assert head.state_dict()['bottleneck.conv.weight'].shape == (32, 128 + 4 * 32, 3, 3)
    assert head.state_dict()['fpn_bottleneck.conv.weight'].shape == (32, 4 * 32, 3, 3)


def test_uperhead_any_class_count_and_aux_head():
    feats = feature_maps(batch=1)
    assert UPerHead(CHANNELS, num_classes=7, channels=16).eval()(feats).shape == (1, 7, 16, 24)
    aux = FCNHead(64, num_classes=7, channels=8).eval()
    assert aux(feats).shape == (1, 7, 4, 6)
    with pytest.raises(ValueError, match='4 input levels'):
        UPerHead(CHANNELS[:3])


def test_anchors_follow_mmdet_convention():
    gen = MMDetAnchorGenerator()
    base = gen.cell_anchors[0]  # stride 4, size 32, ratios 0.5, 1, 2
    # mmdet: w = 32 / sqrt(r), h = 32 * sqrt(r), centred on 0, not rounded
    assert torch.allclose(base[0], torch.tensor([-22.6274, -11.3137, 22.6274, 11.3137]),
                          atol=1e-4)
    assert torch.equal(base[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    # P6 of a 736-px-high input is 12 cells high: the stride must stay 64 (not 736 // 12 = 61)
    from torchvision.models.detection.image_list import ImageList
    maps = [torch.zeros(1, 1, 184 // 2 ** i, 320 // 2 ** i) for i in range(4)]
    maps.append(torch.zeros(1, 1, 12, 10))
    anchors = gen(ImageList(torch.zeros(1, 3, 736, 1280), [(720, 1280)]), maps)[0]
    p6 = anchors[-12 * 10 * 3:].view(12, 10, 3, 4)
    centres = (p6[..., :2] + p6[..., 2:]) / 2
    assert torch.allclose(centres[1, 2, 1], torch.tensor([128.0, 64.0]))


def test_anchors_are_cached_per_grid():
    from torchvision.models.detection.image_list import ImageList

    def maps(h, w):
        return [torch.zeros(1, 1, h // 2 ** i, w // 2 ** i) for i in range(5)]

    gen = MMDetAnchorGenerator()
    images = ImageList(torch.zeros(2, 3, 736, 1280), [(720, 1280), (700, 1270)])
    first = gen(images, maps(184, 320))
    assert len(first) == 2 and first[0] is first[1]
    again = gen(images, maps(184, 320))
    assert again[0] is first[0]  # the same size: no rebuild
    other = gen(ImageList(torch.zeros(1, 3, 512, 512), [(512, 512)]), maps(128, 128))[0]
    fresh = MMDetAnchorGenerator()(ImageList(torch.zeros(1, 3, 512, 512), [(512, 512)]),
                                   maps(128, 128))[0]
    assert other.shape == fresh.shape == (3 * sum((128 // 2 ** i) ** 2 for i in range(5)), 4)
    assert torch.equal(other, fresh)
    assert torch.equal(gen(images, maps(184, 320))[0], first[0])  # the first grid intact


def test_roi_align_is_aligned():
    # Feature map value = x coordinate of the cell centre in image pixels at stride 4.
    pool = AlignedMultiScaleRoIAlign(['0', '1', '2', '3'], 1, sampling_ratio=0)
    feats = {}
    for i in range(4):
        stride = 4 * 2 ** i
        xs = (torch.arange(128 // stride, dtype=torch.float32) + 0.5) * stride
        feats[str(i)] = xs.view(1, 1, 1, -1).expand(1, 1, 32 // stride, -1).clone()
    box = torch.tensor([[40.0, 8.0, 72.0, 24.0]])  # small box -> level 0 (stride 4)
    out = pool(feats, [box], [(32, 128)])
    # aligned=True: the pooled value is the box centre exactly (56); aligned=False is not
    assert out.item() == pytest.approx(56.0, abs=1e-4)
    unaligned = roi_align(feats['0'], [box], 1, spatial_scale=0.25, sampling_ratio=0)
    assert unaligned.item() != pytest.approx(56.0, abs=1e-1)


def test_roi_align_levels_match_box_by_box():
    """Boxes of several images and all four levels pool exactly as one roi_align per box."""
    torch.manual_seed(0)
    pool = AlignedMultiScaleRoIAlign(['0', '1', '2', '3'], 7, sampling_ratio=0)
    feats = {str(i): torch.randn(2, 8, 256 // (4 * 2 ** i), 384 // (4 * 2 ** i))
             for i in range(4)}
    sizes = [(256, 384), (240, 380)]
    boxes = []
    for n in (30, 17):
        xy = torch.rand(n, 2) * torch.tensor([300.0, 200.0])
        side = torch.exp(torch.rand(n, 1) * 6.6)  # 1..735 px: every level gets boxes
        wh = side * (0.7 + 0.6 * torch.rand(n, 2))
        boxes.append(torch.cat([xy, xy + wh], 1))
    out = pool(feats, boxes, sizes)
    levels = pool.map_levels(boxes)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1)
                      for i, b in enumerate(boxes)])
    for k in range(len(rois)):
        level = int(levels[k])
        want = roi_align(feats[str(level)], rois[k:k + 1], 7, spatial_scale=1 / 2 ** (level + 2),
                         sampling_ratio=0, aligned=True)
        torch.testing.assert_close(out[k:k + 1], want, rtol=0, atol=0)


def test_maskrcnn_inference_parts():
    head = MaskRCNNHead(CHANNELS, num_classes=3, fpn_channels=32, representation_size=64,
                        mask_channels=16, rpn_post_nms_top_n_test=50).eval()
    sizes = [(64, 96), (50, 70)]
    with torch.no_grad():
        pyramid, objectness, deltas = head.dense(feature_maps())
        assert [tuple(p.shape[-2:]) for p in pyramid] == [(16, 24), (8, 12), (4, 6), (2, 3),
                                                          (1, 2)]
        assert objectness[0].shape == (2, 3, 16, 24) and deltas[0].shape == (2, 12, 16, 24)
        proposals = head.proposals(pyramid, objectness, deltas, sizes)
        assert all(p.shape[1] == 4 and p.shape[0] <= 50 for p in proposals)
        cands = head.candidates(pyramid, proposals, sizes)
        for (boxes, scores, ids), p, (h, w) in zip(cands, proposals, sizes, strict=True):
            assert boxes.shape == (p.shape[0] * 3, 4) and boxes.dtype == torch.float32
            assert scores.shape == ids.shape == (p.shape[0] * 3,) and ids.dtype == torch.int64
            assert set(ids.tolist()) <= {0, 1, 2}
            assert boxes[:, 2].max() <= w and boxes[:, 3].max() <= h and boxes.min() >= 0
            assert ((scores >= 0) & (scores <= 1)).all()
        masks = head.masks(pyramid, [cands[0][0][:4]], [cands[0][2][:4]], sizes[:1])
        assert masks[0].shape == (4, 1, 28, 28)


@pytest.mark.parametrize('pre_nms_top_n', [1000, 40])
def test_proposals_equal_torchvision_filter_proposals(pre_nms_top_n):
    """Per-level NMS gives torchvision's batched-over-levels result, boxes and order."""
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    torch.manual_seed(0)
    head = MaskRCNNHead(CHANNELS, num_classes=3, fpn_channels=32, representation_size=64,
                        mask_channels=16, rpn_pre_nms_top_n_test=pre_nms_top_n,
                        rpn_post_nms_top_n_test=300).eval()
    sizes = [(64, 96), (50, 70)]
    with torch.no_grad():
        pyramid, objectness, deltas = head.dense(feature_maps())
        # spread the deltas so that boxes overlap in many ways and NMS removes a good share
        deltas = [d * 20 for d in deltas]
        ours = head.proposals(pyramid, objectness, deltas, sizes)
        rpn = head.rpn
        anchors = rpn.anchor_generator(ImageList(pyramid[0], sizes), list(pyramid))
        obj, reg = concat_box_prediction_layers(objectness, deltas)
        boxes = rpn.box_coder.decode(reg.float(), anchors).view(2, -1, 4)
        per_level = [o[0].numel() for o in objectness]
        want, _ = rpn.filter_proposals(boxes, obj.float(), sizes, per_level)
    for got, ref in zip(ours, want, strict=True):
        assert 0 < got.shape[0] < sum(min(pre_nms_top_n, n) for n in per_level)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_maskrcnn_training_losses_backprop():
    head = MaskRCNNHead(CHANNELS, num_classes=3, fpn_channels=32, representation_size=64,
                        mask_channels=16).train()
    feats = [f.requires_grad_() for f in feature_maps()]
    masks = torch.zeros(1, 64, 96, dtype=torch.uint8)
    masks[:, 10:40, 20:60] = 1
    targets = [{'boxes': torch.tensor([[20.0, 10.0, 60.0, 40.0]]), 'labels': torch.tensor([0]),
                'masks': masks},
               {'boxes': torch.tensor([[5.0, 5.0, 30.0, 30.0]]), 'labels': torch.tensor([2]),
                'masks': masks}]
    losses = head(feats, [(64, 96), (64, 96)], targets)
    assert set(losses) == {'loss_objectness', 'loss_rpn_box_reg', 'loss_classifier',
                           'loss_box_reg', 'loss_mask'}
    sum(losses.values()).backward()
    assert feats[0].grad is not None and torch.isfinite(feats[0].grad).all()
    # Box-only targets skip the mask branch.
    no_masks = [{k: v for k, v in t.items() if k != 'masks'} for t in targets]
    assert 'loss_mask' not in head(feats, [(64, 96), (64, 96)], no_masks)
    with pytest.raises(ValueError, match='needs targets'):
        head(feats, [(64, 96)])
