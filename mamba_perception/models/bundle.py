"""Model bundles: one safetensors file holding the weights and a JSON metadata block.

A bundle is everything the pipeline needs to run a model, in one file that loads without
executing code (safetensors holds raw tensors; the metadata is JSON text in its header)::

    {
      "format": "mamba_perception.bundle", "format_version": 1,
      "architecture": "perception_model",
      "config": {"backbone": {"name": "vmamba_tiny", "kwargs": {"backbone": true}},
                 "detection": {"num_classes": 80, ...} | null,
                 "segmentation": {"num_classes": 150, ...} | null},
      "tasks": ["detection"],         # [] for a backbone-only bundle (fine-tuning start)
      "classes": {"names": [...], "colors_rgb": [[r, g, b], ...]},
      "input": {"color_order": "RGB", "mean": [123.675, 116.28, 103.53],
                "std": [58.395, 57.12, 57.375], "max_long_side_px": 1333,
                "max_short_side_px": 800, "allow_upscale": false, "pad_multiple_px": 32},
      "trained_on": "COCO train2017 (official VMamba Mask R-CNN 1x release)",
      "random_init": false,
      "source": {...converter provenance...},
      "created_utc": "...", "mamba_perception_version": "0.1.0",
      "content_hash": "sha256:..."
    }

``mean``/``std`` are in 0-255 pixel units, applied to RGB. One class list serves both heads:
detection class ids and segmentation mask values index the same ``classes.names``.

The content hash covers every tensor (name, dtype, shape, bytes) and the metadata without the
hash itself; :func:`load_bundle` recomputes it, so any edit after writing is refused. Loading
into a model is strict, and every mismatch is reported with its key and both shapes.
"""

from dataclasses import dataclass
import datetime
import hashlib
import json
import logging
import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from mamba_perception.errors import BundleError

FORMAT = 'mamba_perception.bundle'
FORMAT_VERSION = 1
METADATA_KEY = 'mamba_perception'
ARCHITECTURES = ('perception_model',)
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
DEFAULT_INPUT = dict(color_order='RGB', mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                     max_long_side_px=1333, max_short_side_px=800, allow_upscale=False,
                     pad_multiple_px=32)
RANDOM_INIT_NOTE = ('NOTHING: RANDOM-INITIALISED WEIGHTS for tests and demos only; '
                    'every detection and mask it produces is meaningless')
_REQUIRED = ('format', 'format_version', 'architecture', 'config', 'tasks', 'classes', 'input',
             'trained_on', 'random_init', 'content_hash')

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# Hashing and validation

def content_hash(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> str:
    """``'sha256:<hex>'`` of all tensors (sorted by name) and the metadata minus the hash."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to('cpu').contiguous()
        h.update(f'{name}|{str(t.dtype)}|{tuple(t.shape)}|'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    meta = {k: v for k, v in metadata.items() if k != 'content_hash'}
    h.update(json.dumps(meta, sort_keys=True, separators=(',', ':')).encode())
    return 'sha256:' + h.hexdigest()


def _fail(where: str, message: str) -> BundleError:
    return BundleError(f'{where}: {message}')


def validate_metadata(meta: Mapping[str, Any], where: str = 'bundle') -> None:
    """Raise :class:`BundleError` naming the first missing or malformed metadata key."""
    for key in _REQUIRED:
        if key not in meta:
            raise _fail(where, f'metadata key {key!r} is missing')
    if meta['format'] != FORMAT:
        raise _fail(where, f"metadata 'format' is {meta['format']!r}, expected {FORMAT!r}")
    if meta['format_version'] != FORMAT_VERSION:
        raise _fail(where, f"metadata 'format_version' is {meta['format_version']!r}; this "
                    f'version of mamba_perception reads version {FORMAT_VERSION}')
    if meta['architecture'] not in ARCHITECTURES:
        raise _fail(where, f"metadata 'architecture' is {meta['architecture']!r}, expected one "
                    f'of {ARCHITECTURES}')
    config = meta['config']
    if not isinstance(config, dict) or not isinstance(config.get('backbone'), dict) \
            or not isinstance(config['backbone'].get('name'), str):
        raise _fail(where, "metadata 'config.backbone.name' is missing or not a string")
    tasks = tuple(meta['tasks'])
    expected = tuple(t for t in ('detection', 'segmentation') if config.get(t) is not None)
    if tasks != expected:
        raise _fail(where, f"metadata 'tasks' is {list(tasks)} but 'config' has heads for "
                    f'{list(expected)}')
    names = meta['classes'].get('names') if isinstance(meta['classes'], dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _fail(where, "metadata 'classes.names' must be a list of strings")
    for task in tasks:
        n = config[task].get('num_classes')
        if n != len(names):
            raise _fail(where, f"metadata 'config.{task}.num_classes' is {n} but "
                        f"'classes.names' has {len(names)} names")
    if 'segmentation' in tasks and len(names) > 255:
        raise _fail(where, f"{len(names)} segmentation classes do not fit a uint8 mask "
                    '(255 is reserved for ignore)')
    colors = np.asarray(meta['classes'].get('colors_rgb', [])).reshape(-1, 3)
    if colors.shape != (len(names), 3) or colors.min(initial=0) < 0 \
            or colors.max(initial=0) > 255:
        raise _fail(where, f"metadata 'classes.colors_rgb' must be {len(names)} RGB triplets "
                    f'in 0..255, got shape {colors.shape}')
    inp = meta['input']
    for key in DEFAULT_INPUT:
        if key not in inp:
            raise _fail(where, f"metadata 'input.{key}' is missing")
    if inp['color_order'] != 'RGB':
        raise _fail(where, f"metadata 'input.color_order' is {inp['color_order']!r}; "
                    "bundles store RGB statistics")
    for key in ('mean', 'std'):
        if len(inp[key]) != 3:
            raise _fail(where, f"metadata 'input.{key}' needs 3 values, got {inp[key]!r}")
    if any(s <= 0 for s in inp['std']):
        raise _fail(where, f"metadata 'input.std' must be positive, got {inp['std']!r}")
    if int(inp['pad_multiple_px']) % 32:
        raise _fail(where, "metadata 'input.pad_multiple_px' must be a multiple of 32, got "
                    f"{inp['pad_multiple_px']!r}")
    for key in ('max_long_side_px', 'max_short_side_px'):
        if inp[key] is not None and int(inp[key]) < 32:
            raise _fail(where, f"metadata 'input.{key}' must be null or >= 32, got {inp[key]!r}")


def check_state_dict(module: nn.Module, tensors: Mapping[str, torch.Tensor],
                     where: str = 'bundle') -> None:
    """Raise :class:`BundleError` unless ``tensors`` has exactly the module's keys and shapes.

    The error lists every problem (the first 20 of each kind) with both shapes. Works on
    meta-device modules (no memory for weights).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [f'{k}: {where} has {tuple(tensors[k].shape)}, model expects '
              f'{tuple(expected[k].shape)}'
              for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    problems = []
    for title, items in (('shape mismatch', shapes), ('missing from ' + where, missing),
                         ('unexpected in ' + where, unexpected)):
        if items:
            more = f' (and {len(items) - 20} more)' if len(items) > 20 else ''
            problems.append(f'{title}: ' + '; '.join(items[:20]) + more)
    if problems:
        raise BundleError(f'{where} does not fit the model it describes: ' + ' | '.join(problems))


def load_state_dict_strict(module: nn.Module, tensors: Mapping[str, torch.Tensor],
                           where: str = 'bundle') -> None:
    """Copy ``tensors`` into ``module`` after :func:`check_state_dict`."""
    check_state_dict(module, tensors, where)
    module.load_state_dict(dict(tensors), strict=True)


# --------------------------------------------------------------------------------------------
# The bundle

@dataclass
class Bundle:
    """Weights + metadata of one model. Build the network with :meth:`build_model`."""

    metadata: dict
    tensors: dict
    path: Optional[str] = None

    @property
    def content_hash(self) -> str:
        """The ``sha256:`` hash stored in (and verified against) the metadata."""
        return self.metadata['content_hash']

    @property
    def tasks(self) -> tuple:
        """Subset of ('detection', 'segmentation')."""
        return tuple(self.metadata['tasks'])

    @property
    def class_names(self) -> list:
        """Class names; detection class ids and mask values index this list."""
        return list(self.metadata['classes']['names'])

    @property
    def class_colors(self) -> np.ndarray:
        """(K, 3) uint8 RGB colours, one per class."""
        return np.asarray(self.metadata['classes']['colors_rgb'], dtype=np.uint8).reshape(-1, 3)

    @property
    def input_policy(self) -> dict:
        """Resize / pad / normalisation policy (see the module docstring)."""
        return dict(self.metadata['input'])

    @property
    def random_init(self) -> bool:
        """True when the weights are random (test and demo bundles)."""
        return bool(self.metadata['random_init'])

    @property
    def name(self) -> str:
        """A short human-readable description for logs."""
        src = self.path or '<in memory>'
        kind = 'RANDOM-INIT ' if self.random_init else ''
        backbone = self.metadata['config']['backbone']['name']
        return f"{kind}{backbone} {'+'.join(self.tasks)} ({src})"

    def build_model(self, device: Union[str, torch.device] = 'cpu') -> nn.Module:
        """Build the :class:`PerceptionModel` and load the weights strictly; eval mode."""
        from mamba_perception.models.heads import build_perception_model
        try:
            model = build_perception_model(self.metadata['config'])
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f'{self.path or "bundle"}: metadata config cannot build a model: '
                              f'{err}') from err
        load_state_dict_strict(model, self.tensors, where=self.path or 'bundle')
        return model.to(device).eval()

    def save(self, path: PathLike) -> 'Bundle':
        """Write to ``path`` (atomically); returns self with ``path`` set."""
        save_bundle(path, self.tensors, self.metadata)
        self.path = os.fspath(path)
        return self


def make_metadata(*, config: dict, class_names: Sequence[str],
                  class_colors: Optional[np.ndarray] = None,
                  input_policy: Optional[Mapping[str, Any]] = None,
                  trained_on: str, random_init: bool = False,
                  source: Optional[Mapping[str, Any]] = None) -> dict:
    """Metadata dict for :func:`save_bundle` (without the content hash, which is added there)."""
    from mamba_perception import __version__
    from mamba_perception.models.heads.classes import palette
    colors = palette(len(class_names)) if class_colors is None else np.asarray(class_colors)
    meta = {
        'format': FORMAT,
        'format_version': FORMAT_VERSION,
        'architecture': 'perception_model',
        'config': json.loads(json.dumps(config)),
        'tasks': [t for t in ('detection', 'segmentation') if config.get(t) is not None],
        'classes': {'names': [str(n) for n in class_names],
                    'colors_rgb': colors.astype(int).reshape(-1, 3).tolist()},
        'input': {**DEFAULT_INPUT, **dict(input_policy or {})},
        'trained_on': trained_on,
        'random_init': bool(random_init),
        'source': dict(source or {}),
        'created_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'mamba_perception_version': __version__,
    }
    if random_init:
        meta['WARNING'] = 'RANDOM-INITIALISED WEIGHTS: NOT A TRAINED MODEL'
    return meta


def save_bundle(path: PathLike, tensors: Union[nn.Module, Mapping[str, torch.Tensor]],
                metadata: Mapping[str, Any]) -> Bundle:
    """Write a bundle file; ``tensors`` is a state dict or a module. Returns the bundle."""
    from safetensors.torch import save_file
    if isinstance(tensors, nn.Module):
        tensors = tensors.state_dict()
    seen: set = set()
    flat = {}
    for name, t in tensors.items():
        t = t.detach().to('cpu').contiguous()
        if t.data_ptr() in seen and t.numel():  # safetensors refuses shared storage
            t = t.clone()
        seen.add(t.data_ptr())
        flat[name] = t
    meta = dict(metadata)
    meta['content_hash'] = content_hash(flat, meta)
    validate_metadata(meta, where=os.fspath(path))
    tmp = f'{os.fspath(path)}.tmp-{os.getpid()}'
    save_file(flat, tmp, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files
    os.replace(tmp, path)
    return Bundle(meta, flat, os.fspath(path))


def load_bundle(path: PathLike, verify: bool = True) -> Bundle:
    """Read a bundle; refuses (BundleError) files that are not bundles or were modified.

    Only safetensors parsing and ``json.loads`` run on the file's bytes: no unpickling.
    """
    from safetensors import safe_open
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise BundleError(f'{where}: no such bundle file')
    try:
        with safe_open(where, framework='pt', device='cpu') as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise BundleError(f'{where}: not a readable safetensors file ({type(err).__name__}: '
                          f'{err}); bundles are written by `convert` or save_bundle') from err
    if METADATA_KEY not in header:
        raise BundleError(f'{where}: safetensors file without {METADATA_KEY!r} metadata: not a '
                          'mamba_perception bundle (convert checkpoints with `convert`)')
    try:
        meta = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise BundleError(f'{where}: metadata is not valid JSON ({err})') from err
    if not isinstance(meta, dict):
        raise BundleError(f'{where}: metadata is {type(meta).__name__}, expected an object')
    validate_metadata(meta, where)
    if verify:
        actual = content_hash(tensors, meta)
        if actual != meta['content_hash']:
            raise BundleError(
                f"{where}: content hash mismatch: metadata says {meta['content_hash']}, the "
                f'file hashes to {actual}; the bundle was modified after it was written')
    bundle = Bundle(meta, tensors, where)
    if bundle.random_init:
        log.warning('bundle %s has RANDOM-INITIALISED weights: outputs are meaningless', where)
    return bundle


# --------------------------------------------------------------------------------------------
# Random bundles for tests and demos

def dense_backbone_kwargs(backbone: str) -> dict:
    """Return the constructor overrides that give a registry backbone its dense-task layout."""
    from mamba_perception.models import architecture
    if architecture(backbone) == 'vmamba':
        return {'backbone': True}  # official MM_VSSM layout: outnorm{i}, no classifier
    return {'num_classes': 0, 'fpn': True}  # Vim: learned multi-scale adapter, no head


def head_config(tasks: Sequence[str], num_classes: int, size: str = 'full') -> dict:
    """Head configs: ``'full'`` = the official sizes, ``'test'`` = narrow heads for CI."""
    if size not in ('full', 'test'):
        raise ValueError(f"head size must be 'full' or 'test', got {size!r}")
    small = size == 'test'
    cfg: dict = {'detection': None, 'segmentation': None}
    if 'detection' in tasks:
        cfg['detection'] = dict(num_classes=num_classes, fpn_channels=32 if small else 256,
                                representation_size=64 if small else 1024,
                                mask_channels=32 if small else 256)
        if small:
            cfg['detection'].update(rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
                                    rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
                                    box_batch_size_per_image=64)
    if 'segmentation' in tasks:
        cfg['segmentation'] = dict(num_classes=num_classes, channels=32 if small else 512)
    unknown = set(tasks) - {'detection', 'segmentation'}
    if unknown:
        raise ValueError(f'tasks must be a subset of (detection, segmentation), '
                         f'got {tuple(tasks)}')
    return cfg


def create_random_bundle(path: Optional[PathLike] = None, *, backbone: str = 'vmamba_test',
                         tasks: Sequence[str] = ('detection', 'segmentation'),
                         class_names: Optional[Sequence[str]] = None, num_classes: int = 3,
                         head_size: Optional[str] = None, seed: int = 0,
                         input_policy: Optional[Mapping[str, Any]] = None) -> Bundle:
    """Create a bundle of RANDOM weights (its metadata says so loudly) for tests and demos.

    ``head_size`` defaults to ``'test'`` for the ``*_test`` backbones and ``'full'`` otherwise.
    Written to ``path`` when given.
    """
    names = list(class_names) if class_names is not None else [
        f'class_{i}' for i in range(num_classes)]
    size = head_size or ('test' if backbone.endswith('_test') else 'full')
    config = {'backbone': {'name': backbone, 'kwargs': dense_backbone_kwargs(backbone)},
              **head_config(tuple(tasks), len(names), size)}
    from mamba_perception.models.heads import build_perception_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_perception_model(config)
    meta = make_metadata(config=config, class_names=names, input_policy=input_policy,
                         trained_on=RANDOM_INIT_NOTE, random_init=True,
                         source={'kind': 'random', 'seed': seed})
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if path is not None:
        return save_bundle(path, tensors, meta)
    meta['content_hash'] = content_hash(tensors, meta)
    validate_metadata(meta, '<random bundle>')
    return Bundle(meta, tensors, None)


__all__ = ['Bundle', 'BundleError', 'check_state_dict', 'content_hash', 'create_random_bundle',
           'dense_backbone_kwargs', 'head_config', 'load_bundle', 'load_state_dict_strict',
           'make_metadata', 'save_bundle', 'validate_metadata']
