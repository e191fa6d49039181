"""Bundles with known numerical behaviour, shared by the pipeline and the ROS tests.

Importable from any test folder (pytest puts test/ on sys.path through test/conftest.py).
"""

import torch

from mamba_perception.models.bundle import Bundle, content_hash, create_random_bundle, save_bundle


def fp16_overflow_bundle(path=None, **kwargs):
    """A random bundle whose fp16 activations overflow (Inf, then NaN) on saturated white only.

    The first stem conv's output channel 0 sums its 3x3x3 normalised inputs with weight ``w``,
    chosen so that a patch of pure white (255) exceeds fp16's largest value (65504) while a patch
    of 254 stays below it: under fp16 autocast a white frame gives Inf there and the LayerNorm
    after it NaN everywhere downstream, as an fp16 deployment of an over-scaled model would.
    In fp32 nothing overflows. Any other keyword goes to ``create_random_bundle``.

    Returns the saved bundle when ``path`` is given, else an in-memory :class:`Bundle`.
    """
    bundle = create_random_bundle(None, **kwargs)
    mean = torch.tensor(bundle.input_policy['mean'])
    std = torch.tensor(bundle.input_policy['std'])
    white, near_white = (9 * float(((v - mean) / std).sum()) for v in (255.0, 254.0))
    tensors = dict(bundle.tensors)
    name = 'backbone.patch_embed.0'
    weight, bias = tensors[f'{name}.weight'].clone(), tensors[f'{name}.bias'].clone()
    assert weight.shape[1:] == (3, 3, 3), weight.shape
    weight[0] = 65520.0 / ((white + near_white) / 2)  # 65520: where fp16 rounds to Inf
    bias[0] = 0.0
    tensors[f'{name}.weight'], tensors[f'{name}.bias'] = weight, bias
    meta = {k: v for k, v in bundle.metadata.items() if k != 'content_hash'}
    if path is not None:
        return save_bundle(path, tensors, meta)
    meta['content_hash'] = content_hash(tensors, meta)
    return Bundle(meta, tensors, None)
