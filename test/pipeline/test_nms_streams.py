"""nms_each: many NMS calls at once give exactly the calls made one by one."""

import pytest
import torch
from torchvision.ops import batched_nms, nms

from mamba_perception.models.heads.nms_streams import MAX_STREAMS, nms_each


def random_groups(count, device, with_idxs=False):
    g = torch.Generator().manual_seed(0)
    groups = []
    for k in range(count):
        n = [0, 1, 50, 700][k % 4]
        xy = torch.rand(n, 2, generator=g) * 300
        boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 80], 1)
        group = (boxes, torch.rand(n, generator=g))
        if with_idxs:
            group += (torch.randint(0, 4, (n,), generator=g),)
        groups.append(tuple(t.to(device) for t in group))
    return groups


def check(groups, iou):
    got = nms_each(groups, iou)
    assert len(got) == len(groups)
    for group, keep in zip(groups, got, strict=True):
        want = nms(*group, iou) if len(group) == 2 else batched_nms(*group, iou)
        assert keep.device == group[0].device and torch.equal(keep, want)
    return got


@pytest.mark.parametrize('with_idxs', [False, True])
def test_nms_each_cpu(with_idxs):
    got = check(random_groups(9, 'cpu', with_idxs), 0.5)
    assert len(got[3]) < 700  # NMS removed boxes: the comparison is not trivial
    assert nms_each([], 0.5) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('with_idxs', [False, True])
def test_nms_each_cuda_streams(with_idxs):
    """More groups than streams; the results are used on the main stream right away."""
    groups = random_groups(2 * MAX_STREAMS + 3, 'cuda', with_idxs)
    with torch.inference_mode():
        got = check(groups, 0.6)
        sums = torch.stack([k.sum() for k in got])  # queued on the main stream
        want = torch.stack([nms(*g[:2], 0.6).sum() if not with_idxs else
                            batched_nms(*g, 0.6).sum() for g in groups])
    assert torch.equal(sums, want)
