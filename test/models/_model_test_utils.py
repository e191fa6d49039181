"""Helpers for the model tests: manifests, synthetic official checkpoints, official math."""

import argparse
import contextlib
import json
import math
from pathlib import Path
import sys
import types

from mamba_perception_kernels import selective_scan_ref
import torch
import torch.nn.functional as F

MANIFEST_DIR = Path(__file__).parent / 'manifests'


def manifest(family):
    """Parsed ``manifests/{family}_official.json``."""
    return json.loads((MANIFEST_DIR / f'{family}_official.json').read_text())


def manifest_keys(entry):
    """``{key: tuple(shape)}`` of one manifest model entry (e.g. 'vmamba_tiny.backbone')."""
    family = 'vim' if entry.startswith('vim') else 'vmamba'
    return {k: tuple(v) for k, v in manifest(family)['models'][entry]['keys'].items()}


def synthetic_state_dict(keys):
    """A state dict with the given key -> shape, each tensor a distinct constant.

    Tensors are stride-0 expansions of one element, so even VMamba-B costs a few KB to save.
    Tensor i holds the value i / 1000 (so tests can check where each value landed).
    """
    return {k: torch.full((1,), i / 1000.0).expand(shape) if shape else torch.tensor(i / 1000.0)
            for i, (k, shape) in enumerate(keys.items())}


@contextlib.contextmanager
def fake_yacs():
    """Make ``yacs.config.CfgNode`` importable (the real one if installed, else a look-alike).

    The look-alike pickles the same way as the real class (a dict subclass whose flags live
    in the instance ``__dict__``), which is what the official VMamba checkpoints contain.
    """
    try:
        import yacs.config  # noqa: F401
        yield sys.modules['yacs.config'].CfgNode
        return
    except ImportError:
        pass
    yacs = types.ModuleType('yacs')
    config = types.ModuleType('yacs.config')

    class CfgNode(dict):
        def __init__(self, init_dict=None):
            super().__init__(init_dict or {})
            self.__dict__['__immutable__'] = False
            self.__dict__['__deprecated_keys__'] = set()
            self.__dict__['__renamed_keys__'] = {}
            self.__dict__['__new_allowed__'] = False

    CfgNode.__module__ = 'yacs.config'
    CfgNode.__qualname__ = 'CfgNode'
    config.CfgNode = CfgNode
    yacs.config = config
    sys.modules['yacs'] = yacs
    sys.modules['yacs.config'] = config
    try:
        yield CfgNode
    finally:
        sys.modules.pop('yacs.config', None)
        sys.modules.pop('yacs', None)


def save_vmamba_official(path, state_dict):
    """Save like ``classification/utils/utils.py::save_checkpoint_ema`` does."""
    with fake_yacs() as cfg_node:
        config = cfg_node({'MODEL': cfg_node({'TYPE': 'vssm', 'NAME': 'vssm1_tiny_0230s'}),
                           'DATA': cfg_node({'IMG_SIZE': 224})})
        torch.save({
            'model': state_dict,
            'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-3, 'params': [0, 1]}]},
            'lr_scheduler': {'t_initial': 300, 'lr_min': 1e-5},
            'max_accuracy': 82.6,
            'scaler': {'scale': 65536.0, 'growth_factor': 2.0},
            'epoch': 264,
            'config': config,
            'model_ema': state_dict,
            'max_accuray_ema': 82.5,
        }, path)


def save_vim_official(path, state_dict):
    """Save like Vim's DeiT-style ``main.py`` does (with an ``argparse.Namespace``)."""
    args = argparse.Namespace(model='vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_'
                                    'embed_with_midclstok_div2', input_size=224, lr=5e-4,
                              drop_path=0.0, no_amp=True, epochs=300, mixup=0.8)
    torch.save({'model': state_dict, 'optimizer': {'state': {}, 'param_groups': []},
                'lr_scheduler': {'base_values': [5e-4]}, 'epoch': 299,
                'model_ema': state_dict, 'scaler': {}, 'args': args}, path)


# --------------------------------------------------------------------------------------------
# The official forward math, transcribed with the sequential reference scan. Used as the oracle
# for our fused-kernel modules.

def cross_scan(x):
    """(B, C, H, W) -> (B, 4, C, H*W): row-major, column-major, and their reverses."""
    r = x.flatten(2)
    c = x.transpose(2, 3).flatten(2)
    return torch.stack([r, c, r.flip(-1), c.flip(-1)], dim=1)


def cross_merge(ys, h, w):
    """(B, 4, C, L) -> (B, C, H, W): sum of the routes put back in place."""
    b, _, c, _ = ys.shape
    r = ys[:, 0] + ys[:, 2].flip(-1)
    col = ys[:, 1] + ys[:, 3].flip(-1)
    return r.view(b, c, h, w) + col.view(b, c, w, h).transpose(2, 3)


def ss2d_official(op, x_nhwc):
    """Official ``forwardv2`` + ``forward_corev2(no_einsum=True)`` of an SS2D (v05_noz)."""
    k, n, r, di = op.k_group, op.d_state, op.dt_rank, op.d_inner
    x = op.in_proj(x_nhwc).permute(0, 3, 1, 2)
    x = F.silu(op.conv2d(x))
    b, _, h, w = x.shape
    length = h * w
    xs = cross_scan(x)
    x_dbl = F.conv1d(xs.reshape(b, -1, length), op.x_proj_weight.view(-1, di, 1), groups=k)
    dts, bs, cs = torch.split(x_dbl.view(b, k, -1, length), [r, n, n], dim=2)
    dts = F.conv1d(dts.contiguous().view(b, -1, length), op.dt_projs_weight.view(k * di, -1, 1),
                   groups=k)
    ys = selective_scan_ref(xs.reshape(b, -1, length), dts, -torch.exp(op.A_logs.float()),
                            bs.contiguous(), cs.contiguous(), op.Ds.float(),
                            delta_bias=op.dt_projs_bias.view(-1).float(), delta_softplus=True)
    y = cross_merge(ys.view(b, k, di, length), h, w)
    y = F.layer_norm(y.permute(0, 2, 3, 1), (di,), op.out_norm.weight, op.out_norm.bias,
                     op.out_norm.eps)
    return op.out_proj(y)


def bimamba_official(mixer, h):
    """Official bimamba-v2 forward: the backward branch runs on ``xz.flip(-1)``."""
    length = h.shape[1]
    n, r = mixer.d_state, mixer.dt_rank
    xz = mixer.in_proj(h).transpose(1, 2)

    def branch(xz, conv, x_proj, dt_proj, a_log, d):
        x, z = xz.chunk(2, dim=1)
        x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=conv.weight.shape[-1] - 1,
                            groups=x.shape[1])[..., :length])
        x_dbl = x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
        dt, b, c = torch.split(x_dbl, [r, n, n], dim=-1)
        delta = dt_proj.weight @ dt.transpose(1, 2)
        return selective_scan_ref(x, delta, -torch.exp(a_log.float()),
                                  b.transpose(1, 2)[:, None].contiguous(),
                                  c.transpose(1, 2)[:, None].contiguous(), d.float(), z=z,
                                  delta_bias=dt_proj.bias.float(), delta_softplus=True)

    out = branch(xz, mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D)
    out_b = branch(xz.flip(-1), mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log,
                   mixer.D_b)
    return mixer.out_proj(((out + out_b.flip(-1)) / 2).transpose(1, 2))


def num_params(model):
    return sum(math.prod(p.shape) for p in model.parameters())
