"""Heads on plain feature maps: shapes, dtypes, key layouts and the mmdet conventions."""

import pytest
import torch
from torchvision.ops import roi_align

from mamba_perception.models.heads import FCNHead, MaskRCNNHead, UPerHead, segmentation
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


def test_uperhead_coarse_fusion_gives_the_same_logits(monkeypatch):
    torch.manual_seed(2)
    head = UPerHead(CHANNELS, num_classes=11, channels=16).double().eval()
    for bn in head.modules():  # running statistics away from the identity
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
    feats = [f.double() for f in feature_maps(height=64, width=96)]
    monkeypatch.setattr(segmentation, 'COARSE_FUSION', False)
    want = head(feats)
    monkeypatch.setattr(segmentation, 'COARSE_FUSION', True)
    got = head(feats)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # training keeps the modules' path (the fused one has no reason to be differentiated)
    calls, fuse = [], head._fuse_coarse
    monkeypatch.setattr(head, '_fuse_coarse', lambda outs: calls.append(1) or fuse(outs))
    head.train()(feats)
    assert not calls
    with torch.no_grad():
        head.eval()(feats)
    assert calls == [1]


def test_uperhead_coarse_fusion_rounds_like_the_modules_under_autocast(monkeypatch):
    # 16-bit autocast: nine tap maps rounded and summed per level instead of one conv's fp32
    # accumulation; the logits' error against float64 stays of the modules' order
    channels = [24, 48, 96, 192]
    feats = feature_maps(batch=1, height=192, width=320, channels=channels)
    head = UPerHead(channels, num_classes=20, channels=64).eval()
    with torch.no_grad():
        want = head.double()([f.double() for f in feats])
        head.float()
        errors = {}
        for coarse in (False, True):
            monkeypatch.setattr(segmentation, 'COARSE_FUSION', coarse)
            with torch.autocast('cpu', dtype=torch.bfloat16):
                got = head(feats).double()
            errors[coarse] = float((got - want).norm() / want.norm())
    assert errors[False] < 0.02 and errors[True] < 2 * errors[False], errors


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


def test_anchors_at_equal_the_anchor_grid():
    """Anchors from (cell, base anchor) indices are the grid's, bit for bit, on every level."""
    from torchvision.models.detection.image_list import ImageList
    gen = MMDetAnchorGenerator()
    # 1280x736: P6 is 12 cells high (H / 32 = 23 is odd), stride 64 all the same
    maps = [torch.zeros(1, 1, 184 // 2 ** i, 320 // 2 ** i) for i in range(4)]
    maps.append(torch.zeros(1, 1, 12, 10))
    grid = gen(ImageList(torch.zeros(1, 3, 736, 1280), [(720, 1280)]), maps)[0]
    start = 0
    for level, m in enumerate(maps):
        height, width = m.shape[-2:]
        index = torch.arange(height * width * 3)
        got = gen.anchors_at(level, index // 3, index % 3, width)
        assert torch.equal(got, grid[start:start + len(index)]), level
        start += len(index)
    assert start == len(grid)
    assert 'base_anchors' not in gen.state_dict()  # derived: bundles do not carry it


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
        dense = head.dense(feature_maps())
        pyramid = dense['pyramid']
        assert [tuple(p.shape[-2:]) for p in pyramid] == [(16, 24), (8, 12), (4, 6), (2, 3),
                                                          (1, 2)]
        # P2 keeps pre_nms_top_n (1000) of its 3 * 16 * 24 anchors, the others all of theirs
        num_boxes = 1000 + 3 * (8 * 12 + 4 * 6 + 2 * 3 + 1 * 2)
        boxes, scores = dense['rpn_boxes'], dense['rpn_scores']
        assert boxes.shape == (2, num_boxes, 4) and boxes.dtype == torch.float32
        assert scores.shape == (2, num_boxes) and scores.dtype == torch.float32
        assert ((scores > 0) & (scores < 1)).all()
        for key in ('rpn_objectness_finite', 'rpn_deltas_finite'):
            assert dense[key].dtype == torch.bool and dense[key].tolist() == [True, True]
        proposals = head.proposals(pyramid, boxes, scores, sizes)
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


def test_dense_flags_non_finite_rpn_outputs_per_image():
    head = MaskRCNNHead(CHANNELS, num_classes=3, fpn_channels=32, representation_size=64,
                        mask_channels=16).eval()
    feats = feature_maps(batch=3)
    feats[2][1, :, 0, 0] = float('nan')  # image 1's stride-16 map: P4, then P3 and P2
    with torch.no_grad():
        dense = head.dense(feats)
    assert dense['rpn_objectness_finite'].tolist() == [True, False, True]
    assert dense['rpn_deltas_finite'].tolist() == [True, False, True]
    with torch.no_grad():  # Inf in the box regression weights only: deltas, not objectness
        head.rpn.head.bbox_pred.weight[5, 0, 0, 0] = float('inf')
        dense = head.dense(feature_maps(batch=3))
    assert dense['rpn_objectness_finite'].tolist() == [True, True, True]
    assert dense['rpn_deltas_finite'].tolist() == [False, False, False]


def rpn_head_outputs(head, feats, spread=20.0):
    """FPN maps and RPN head outputs, with the deltas spread so that boxes overlap in many ways
    (NMS removes a good share) and reach past the images, and no two anchors of an image of
    equal score: a random head's logits are all near 0, their sigmoids tie in float32, and
    torchvision orders tied boxes as its (unstable) sort happens to."""
    pyramid = head.dense(feats)['pyramid']
    objectness, deltas = head.rpn.head(pyramid)
    generator = torch.Generator().manual_seed(0)
    per_level = [o[0].numel() for o in objectness]
    logits = [torch.linspace(-4, 4, sum(per_level))[torch.randperm(sum(per_level),
                                                                   generator=generator)]
              for _ in range(len(feats[0]))]
    levels = torch.stack(logits).split(per_level, dim=1)
    objectness = [v.reshape(o.shape) for v, o in zip(levels, objectness, strict=True)]
    return pyramid, objectness, [d * spread for d in deltas]


def torchvision_proposals(head, pyramid, objectness, deltas, sizes):
    """torchvision's RegionProposalNetwork inference from the RPN head outputs."""
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    rpn = head.rpn
    anchors = rpn.anchor_generator(ImageList(pyramid[0], sizes), list(pyramid))
    obj, reg = concat_box_prediction_layers(objectness, deltas)
    boxes = rpn.box_coder.decode(reg.float(), anchors).view(len(sizes), -1, 4)
    per_level = [o[0].numel() for o in objectness]
    return rpn.filter_proposals(boxes, obj.float(), sizes, per_level)[0]


@pytest.mark.parametrize('pre_nms_top_n', [1000, 40])
def test_pre_nms_proposals_equal_torchvision_top_n(pre_nms_top_n):
    """The dense part's top-n boxes and scores: torchvision's before its clip, bit for bit."""
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    head = MaskRCNNHead(CHANNELS, num_classes=3, fpn_channels=32, representation_size=64,
                        mask_channels=16, rpn_pre_nms_top_n_test=pre_nms_top_n).eval()
    with torch.no_grad():
        # 96x160: P2 has 2880 anchors, so 1000 selects there too
        pyramid, objectness, deltas = rpn_head_outputs(head, feature_maps(height=96, width=160))
        boxes, scores = head.pre_nms_proposals(objectness, deltas)
        rpn = head.rpn
        anchors = rpn.anchor_generator(ImageList(pyramid[0], [(96, 160)] * 2), list(pyramid))
        obj, reg = concat_box_prediction_layers(objectness, deltas)
        all_boxes = rpn.box_coder.decode(reg.float(), anchors).view(2, -1, 4)
        obj = obj.reshape(2, -1)
        top_n_idx = rpn._get_top_n_idx(obj, [o[0].numel() for o in objectness])
    batch_idx = torch.arange(2)[:, None]
    assert boxes.shape == (2, top_n_idx.shape[1], 4)
    assert top_n_idx.shape[1] < obj.shape[1]
    torch.testing.assert_close(boxes, all_boxes[batch_idx, top_n_idx], rtol=0, atol=0)
    torch.testing.assert_close(scores, torch.sigmoid(obj[batch_idx, top_n_idx]), rtol=0, atol=0)


@pytest.mark.parametrize('pre_nms_top_n', [1000, 40])
def test_proposals_equal_torchvision_filter_proposals(pre_nms_top_n):
    """Per-level NMS gives torchvision's batched-over-levels result, boxes and order."""
    torch.manual_seed(0)
    head = MaskRCNNHead(CHANNELS, num_classes=3, fpn_channels=32, representation_size=64,
                        mask_channels=16, rpn_pre_nms_top_n_test=pre_nms_top_n,
                        rpn_post_nms_top_n_test=300).eval()
    sizes = [(64, 96), (50, 70)]
    with torch.no_grad():
        pyramid, objectness, deltas = rpn_head_outputs(head, feature_maps())
        ours = head.proposals(pyramid, *head.pre_nms_proposals(objectness, deltas), sizes)
        want = torchvision_proposals(head, pyramid, objectness, deltas, sizes)
    per_level = [o[0].numel() for o in objectness]
    for got, ref in zip(ours, want, strict=True):
        assert 0 < got.shape[0] < sum(min(pre_nms_top_n, n) for n in per_level)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_proposals_clip_each_image_to_its_own_size():
    """Images of one padded shape and different sizes in one batch (one CUDA graph serves
    them): each image's proposals are clipped to its own size, as torchvision's and as alone."""
    torch.manual_seed(0)
    head = MaskRCNNHead(CHANNELS, num_classes=3, fpn_channels=32, representation_size=64,
                        mask_channels=16, rpn_post_nms_top_n_test=300).eval()
    sizes = [(64, 96), (40, 96), (64, 50), (33, 65)]  # all padded to 64x96
    with torch.no_grad():
        pyramid, objectness, deltas = rpn_head_outputs(head, feature_maps(batch=4))
        boxes, scores = head.pre_nms_proposals(objectness, deltas)
        ours = head.proposals(pyramid, boxes, scores, sizes)
        want = torchvision_proposals(head, pyramid, objectness, deltas, sizes)
        alone = [head.proposals([p[i:i + 1] for p in pyramid], boxes[i:i + 1], scores[i:i + 1],
                                [size])[0] for i, size in enumerate(sizes)]
    for got, ref, one, (h, w), unclipped in zip(ours, want, alone, sizes, boxes, strict=True):
        assert (unclipped[:, 2] > w).any() and (unclipped[:, 3] > h).any()  # the clip matters
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        torch.testing.assert_close(got, one, rtol=0, atol=0)
        assert got.min() >= 0 and got[:, 0::2].max() == w and got[:, 1::2].max() == h


def test_candidates_equal_torchvision_decode_and_clip_per_image():
    """The box head's boxes of all images decoded and clipped at once, each to its own size."""
    import torch.nn.functional as F
    from torchvision.ops import clip_boxes_to_image

    head = MaskRCNNHead(CHANNELS, num_classes=3, fpn_channels=32, representation_size=64,
                        mask_channels=16, rpn_post_nms_top_n_test=50).eval()
    sizes = [(64, 96), (40, 70), (64, 50), (50, 96)]  # one padded shape
    with torch.no_grad():
        head.roi_heads.box_predictor.bbox_pred.weight.mul_(200)  # boxes reach past the images
        dense = head.dense(feature_maps(batch=4))
        pyramid = dense['pyramid']
        proposals = head.proposals(pyramid, dense['rpn_boxes'], dense['rpn_scores'], sizes)
        proposals[2] = proposals[2][:0]  # an image without proposals
        got = head.candidates(pyramid, proposals, sizes)
        heads = head.roi_heads
        features = heads.box_head(heads.box_roi_pool(head._pyramid_dict(pyramid), proposals,
                                                     sizes))
        logits, regression = heads.box_predictor(features)
        boxes = heads.box_coder.decode(regression, proposals)
        scores = F.softmax(logits, -1)
    counts = [len(p) for p in proposals]
    for (b, s, ids), want_b, want_s, (h, w) in zip(got, boxes.split(counts), scores.split(counts),
                                                   sizes, strict=True):
        n = len(want_b)
        if n:
            assert (want_b[..., 2] > w).any() or (want_b[..., 3] > h).any()  # the clip matters
        want_b = clip_boxes_to_image(want_b, (h, w))[:, 1:].reshape(-1, 4)
        torch.testing.assert_close(b, want_b, rtol=0, atol=0)
        torch.testing.assert_close(s, want_s[:, 1:].reshape(-1), rtol=0, atol=0)
        assert torch.equal(ids, torch.arange(3).repeat(n))
    assert [len(c[1]) for c in got] == [3 * n for n in counts] and counts[0] > 0


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
