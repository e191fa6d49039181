"""VMamba and Vim backbones (one file per architecture) and the model registry.

``create_model(name, **overrides)`` builds a model from the plain :data:`MODELS` dict; the
overrides are passed to the model's constructor and win over the configuration. Every model has
``feature_info``, ``forward_features``, ``forward_intermediates`` (four NCHW maps at strides
4/8/16/32) and ``forward`` (logits). Building a model imports no kernels; running one imports
``mamba_perception_kernels``.
"""

from typing import Callable, Dict, List

from torch import nn

from . import vim, vmamba

MODELS: Dict[str, Callable[..., nn.Module]] = {
    'vmamba_tiny': vmamba.vmamba_tiny,
    'vmamba_small': vmamba.vmamba_small,
    'vmamba_base': vmamba.vmamba_base,
    'vmamba_test': vmamba.vmamba_test,
    'vim_tiny': vim.vim_tiny,
    'vim_small': vim.vim_small,
    'vim_base': vim.vim_base,
    'vim_tiny_plus': vim.vim_tiny_plus,
    'vim_small_plus': vim.vim_small_plus,
    'vim_test': vim.vim_test,
}

# The per-architecture function that maps an official state dict onto our key names.
CHECKPOINT_FILTERS: Dict[str, Callable] = {
    'vmamba': vmamba.checkpoint_filter_fn,
    'vim': vim.checkpoint_filter_fn,
}


def list_models() -> List[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(MODELS)


def architecture(name: str) -> str:
    """``'vmamba'`` or ``'vim'`` for a model name."""
    if name not in MODELS:
        raise KeyError(f'unknown model {name!r}; known: {", ".join(list_models())}')
    return 'vim' if name.startswith('vim') else 'vmamba'


def create_model(name: str, **overrides) -> nn.Module:
    """Build model ``name`` (see :func:`list_models`) with constructor ``overrides``.

    Examples: ``create_model('vmamba_tiny')`` (ImageNet classifier, official key layout),
    ``create_model('vmamba_small', backbone=True)`` (the official mmdet/mmseg backbone layout
    with ``outnorm{i}``, no classifier), ``create_model('vim_small', num_classes=0, fpn=True)``.
    """
    if name not in MODELS:
        raise KeyError(f'unknown model {name!r}; known: {", ".join(list_models())}')
    model = MODELS[name](**overrides)
    model.model_name = name
    return model


__all__ = ['CHECKPOINT_FILTERS', 'MODELS', 'architecture', 'create_model', 'list_models']
