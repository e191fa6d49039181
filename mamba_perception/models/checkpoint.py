"""Safe loading of the official VMamba / Vim checkpoint files and strict loading into our models.

The official ``.pth`` files are pickles. They are read with ``torch.load(weights_only=True)``,
whose unpickler builds nothing but tensors and plain containers, plus an explicit allow-list:

* ``argparse.Namespace`` (Vim stores its training arguments under ``'args'``), the real class;
* ``yacs.config.CfgNode`` (VMamba stores its training config under ``'config'``), rebuilt as an
  inert ``dict`` subclass defined here, so yacs need not be installed and no yacs code runs.

Any other global in the file is refused with a :class:`CheckpointError` that names it. Loading
into a model is always strict; every error names the key and, for shape mismatches, both shapes,
and says which architecture the checkpoint looks like when it does not fit.
"""

import argparse
from collections import OrderedDict
import math
import os
import pickle
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from mamba_perception.errors import CheckpointError

Shape = Tuple[int, ...]


class CfgNodeStandIn:
    """Allow-list entry for ``yacs.config.CfgNode``: rebuilt as a plain ``OrderedDict``.

    The weights-only unpickler fills only exact dict / OrderedDict instances, so ``__new__``
    returns an ``OrderedDict``; the node's items land in it and its flags (``__immutable__``...)
    in its ``__dict__``. Plain data only; no yacs code runs and yacs need not be installed.
    """

    def __new__(cls, *args, **kwargs):  # noqa: D102
        return OrderedDict()


# name in the pickle -> class used to rebuild it (the weights-only unpickler's allow-list)
SAFE_GLOBALS: Dict[str, type] = {
    'argparse.Namespace': argparse.Namespace,
    'yacs.config.CfgNode': CfgNodeStandIn,
}

STATE_DICT_KEYS = ('model', 'state_dict', 'model_ema', 'module')


def _safe_globals_list(extra: Mapping[str, type]) -> List[Any]:
    out: List[Any] = []
    for name, cls in {**SAFE_GLOBALS, **dict(extra)}.items():
        real = f'{cls.__module__}.{cls.__qualname__}'
        out.append(cls if real == name else (cls, name))
    return out


def load_checkpoint_file(path: str, map_location: Any = 'cpu',
                         extra_globals: Optional[Mapping[str, type]] = None) -> Any:
    """Unpickle a checkpoint file with the weights-only unpickler and :data:`SAFE_GLOBALS`.

    Args:
        path: ``.pth`` / ``.pt`` file.
        map_location: as for ``torch.load``.
        extra_globals: more ``{'module.Name': class}`` entries to allow, for the caller's own
            trusted metadata classes.

    Raises:
        CheckpointError: the file is missing or not a torch pickle, or it needs a global that is
            not allowed (the message lists them).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path!r} does not exist or is not a file')
    try:
        with torch.serialization.safe_globals(_safe_globals_list(extra_globals or {})):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        allowed = set(SAFE_GLOBALS) | set(extra_globals or {})
        try:
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                      if g not in allowed]
        except Exception:  # noqa: BLE001 - only used to improve the message
            unsafe = []
        if unsafe:
            raise CheckpointError(
                f'checkpoint {path!r} refused: it needs the non-allow-listed global(s) '
                f'{", ".join(sorted(unsafe))}; only plain tensors/containers and '
                f'{", ".join(sorted(allowed))} are unpickled. If you trust the file and these '
                f'classes are plain data, pass them in extra_globals.') from None
        text = str(exc)
        if 'WeightsUnpickler error:' in text:
            text = text.split('WeightsUnpickler error:', 1)[1].split('Check the documentation')[0]
        raise CheckpointError(
            f'checkpoint {path!r} refused by the weights-only unpickler: '
            f'{" ".join(text.split())}') from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f'checkpoint {path!r} is not a readable torch file: {exc}') from None


def extract_state_dict(obj: Any, key: Optional[str] = None, prefix: str = '',
                       source: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """Pick the state dict out of a checkpoint container.

    Args:
        obj: what :func:`load_checkpoint_file` returned.
        key: container key to use; default the first of ``'model'``, ``'state_dict'``,
            ``'model_ema'``, ``'module'`` present, or ``obj`` itself when it maps names to tensors.
        prefix: keep only keys starting with it and strip it (``'backbone.'`` for the backbone
            of an mmdet / mmseg checkpoint).
        source: name used in error messages.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{source} holds a {type(obj).__name__}, not a dict')
    if key is not None:
        if key not in obj:
            raise CheckpointError(
                f'{source} has no entry {key!r}; it has {", ".join(map(repr, obj))}')
        sd = obj[key]
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        found = [k for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)]
        if not found:
            raise CheckpointError(
                f'{source} has no state dict: expected one of {", ".join(STATE_DICT_KEYS)}, '
                f'found keys {", ".join(map(repr, list(obj)[:20]))}')
        sd = obj[found[0]]
    if not isinstance(sd, Mapping):
        raise CheckpointError(f'{source} entry {key!r} is a {type(sd).__name__}, not a dict')
    out = {}
    for name, value in sd.items():
        if prefix:
            if not name.startswith(prefix):
                continue
            name = name[len(prefix):]
        if name.startswith('module.'):  # DataParallel / DDP wrapper
            name = name[len('module.'):]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f'{source} entry {name!r} is a {type(value).__name__}, not a tensor')
        out[name] = value
    if not out:
        where = f' under {prefix!r}' if prefix else ''
        raise CheckpointError(f'{source} has no tensors{where}')
    return out


# --------------------------------------------------------------------------------------------
# What does a state dict look like?

def _shape(v: Any) -> Shape:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)


def _family(sd: Mapping[str, Any]) -> Optional[str]:
    """'vim', 'vmamba' or None, from the key names of a state dict (ours or official)."""
    if any(k.endswith(('mixer.A_b_log', 'mixer.A_log')) for k in sd):
        return 'vim'
    if any(k.endswith(('.op.A_logs', '.self_attention.A_logs')) for k in sd):
        return 'vmamba'
    return None


def describe_state_dict(sd: Mapping[str, Any]) -> str:
    """One line naming the architecture a state dict (ours or official) was made for.

    ``sd`` maps names to tensors or to shapes.
    """
    from . import vim as vim_mod
    from . import vmamba as vmamba_mod

    keys = list(sd)
    family = _family(sd)
    if family == 'vim':
        depth = len({k.split('.')[1] for k in keys if k.startswith('layers.')})
        dim = _shape(sd['patch_embed.proj.weight'])[0] if 'patch_embed.proj.weight' in sd else '?'
        tokens = _shape(sd['pos_embed'])[1] if 'pos_embed' in sd else '?'
        stride = {197: 16, 730: 8}.get(tokens, '?')
        guess = [n for n, c in vim_mod.MODEL_CONFIGS.items()
                 if c.get('embed_dim') == dim and c.get('depth') == depth
                 and c.get('stride', 16) == stride and n != 'vim_test']
        text = f'Vim (embed_dim {dim}, depth {depth}, {tokens} position slots)'
        return text + (f' = {guess[0]}' if guess else '')
    if family == 'vmamba':
        depths: Dict[int, int] = {}
        for k in keys:
            m = re.match(r'layers\.(\d+)\.blocks\.(\d+)\.', k)
            if m:
                i, j = int(m.group(1)), int(m.group(2))
                depths[i] = max(depths.get(i, 0), j + 1)
        depth_t = tuple(depths[i] for i in sorted(depths))
        w = sd.get('layers.0.blocks.0.op.in_proj.weight',
                   sd.get('layers.0.blocks.0.self_attention.in_proj.weight'))
        w = _shape(w) if w is not None else None
        dim = int(w[1]) if w is not None else '?'
        ratio = (w[0] / w[1]) if w is not None else '?'
        guess = [n for n, c in vmamba_mod.MODEL_CONFIGS.items()
                 if tuple(c['depths']) == depth_t and c['dims'] == dim
                 and c['ssm_ratio'] == ratio and n != 'vmamba_test']
        layout = ('backbone with outnorm0-3' if any(k.startswith('outnorm') for k in keys)
                  else 'classifier' if any(k.startswith('classifier.') for k in keys) else '')
        text = (f'VMamba (dims {dim}, depths {"-".join(map(str, depth_t))}, ssm_ratio {ratio}'
                f'{", " + layout if layout else ""})')
        return text + (f' = {guess[0]}' if guess else '')
    return f'unknown architecture ({len(keys)} tensors, e.g. {", ".join(keys[:3])})'


def _fmt(shape: Sequence[int]) -> str:
    return '(' + ', '.join(str(int(s)) for s in shape) + ')'


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor],
                     ignore_missing: Iterable[str] = (), source: str = 'checkpoint') -> None:
    """Raise :class:`CheckpointError` unless ``sd`` has exactly the model's keys and shapes.

    Args:
        ignore_missing: key prefixes the model may have that ``sd`` lacks (e.g. ``'outnorm'``
            when starting a detection backbone from an ImageNet checkpoint); they keep their
            initialisation.
    """
    ignore = tuple(ignore_missing)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(ignore)] if ignore else [
        k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in sd if k in own and _shape(sd[k]) != tuple(own[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    name = getattr(model, 'model_name', type(model).__name__)
    lines = [f'{source} does not fit model {name}: '
             f'{len(missing)} missing, {len(unexpected)} unexpected, '
             f'{len(mismatched)} shape-mismatched key(s).']
    if len(missing) + len(unexpected) > 4 or len(mismatched) > 2:
        lines.append(f'  the checkpoint looks like {describe_state_dict(sd)};')
        lines.append(f'  the model is {describe_state_dict(own)}.')
    limit = 12
    for k in mismatched[:limit]:
        lines.append(f'  shape mismatch for {k!r}: checkpoint {_fmt(_shape(sd[k]))} '
                     f'vs model {_fmt(own[k].shape)}')
    for k in missing[:limit]:
        lines.append(f'  missing key {k!r} (model {_fmt(own[k].shape)}) not in the checkpoint')
    for k in unexpected[:limit]:
        lines.append(f'  unexpected key {k!r} (checkpoint {_fmt(_shape(sd[k]))}) not in the model')
    for what, items in (('shape mismatches', mismatched), ('missing', missing),
                        ('unexpected', unexpected)):
        if len(items) > limit:
            lines.append(f'  ... and {len(items) - limit} more {what}')
    raise CheckpointError('\n'.join(lines))


def load_state_dict_strict(model: nn.Module, sd: Mapping[str, torch.Tensor],
                           ignore_missing: Iterable[str] = (),
                           source: str = 'checkpoint') -> nn.Module:
    """Check ``sd`` against the model (see :func:`check_state_dict`), then load it."""
    ignore = tuple(ignore_missing)
    check_state_dict(model, sd, ignore, source)
    if ignore:
        own = model.state_dict()
        sd = {**{k: v for k, v in own.items() if k.startswith(ignore) and k not in sd}, **sd}
    # A model built on the meta device (no init cost) takes the checkpoint's tensors as they are.
    meta = any(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(dict(sd), strict=True, assign=meta)
    return model


def load_official(model: nn.Module, path: str, key: Optional[str] = None, prefix: str = '',
                  ignore_missing: Iterable[str] = ()) -> nn.Module:
    """Load an official VMamba / Vim checkpoint file strictly into one of our models.

    Unpickles safely (:func:`load_checkpoint_file`), picks the state dict
    (:func:`extract_state_dict`), applies the architecture's ``checkpoint_filter_fn`` (legacy
    key renames), drops a classifier the model does not have (``num_classes=0`` /
    ``backbone=True``), and loads strictly.
    """
    from . import vim as vim_mod
    from . import vmamba as vmamba_mod

    path = os.fspath(path)
    obj = load_checkpoint_file(path)
    sd = extract_state_dict(obj, key=key, prefix=prefix, source=f'checkpoint {path!r}')
    # Key renames only when the checkpoint is of the model's family; otherwise the strict check
    # below reports the mismatch (and what the checkpoint looks like).
    family = _family(sd)
    if isinstance(model, vim_mod.VisionMamba) and family == 'vim':
        sd = vim_mod.checkpoint_filter_fn(sd, model)
    elif isinstance(model, vmamba_mod.VSSM) and family == 'vmamba':
        sd = vmamba_mod.checkpoint_filter_fn(sd, model)
    own = model.state_dict()
    for head in ('classifier.', 'head.'):
        if not any(k.startswith(head) for k in own) and any(k.startswith(head) for k in sd):
            sd = {k: v for k, v in sd.items() if not k.startswith(head)}
    return load_state_dict_strict(model, sd, ignore_missing, source=f'checkpoint {path!r}')


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameter elements."""
    return sum(math.prod(p.shape) for p in model.parameters())
