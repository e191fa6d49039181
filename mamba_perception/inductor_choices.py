"""torch.compile for our models: inner LayerNorm-like reductions kept in registers on torch < 2.14.

Inductor writes a row reduction (a LayerNorm over C channels) either as a *persistent* kernel,
which holds each row in registers and reads it once, or as a *looped* one, which walks the row
in R0_BLOCK pieces twice (statistics, then the normalised output). torch 2.11-2.13 take that
decision (``InductorChoices.should_use_persistent_reduction``) from a reduction hint computed
without the kernel's tiling scores; above ``2 * 32 * SMs`` rows (8448 on an H100 / H200) the IR
leaves the hint at DEFAULT, and a LayerNorm fused with its residual add is then looped although
the same kernel's source is generated with the INNER hint (the tiling scores say the channels are
the contiguous axis). torch 2.14 decides with the tiling scores
(``SIMDKernelFeatures.with_tiling_scores``). VMamba-T's stage-3 LayerNorms (384 channels) cross
that row count at batch 4 at 1280x720 (14400 rows) and at batch 1 at 2048^2 (16384): looped,
they took 16-22 us a launch at batch 4 on an H200 against ~11 us of bytes (PERF_NOTES.md).

:func:`compile_inference` is ``torch.compile`` whose calls (and so its compiles) run with an
``InductorChoices`` that takes the persistent kernel where torch 2.14 would: the tiling-score
hint is INNER, the row is at most 1024 elements (the INNER threshold of both versions) and
inductor set no override itself (sort, dynamic row length). On torch >= 2.14, on CPU (C++
kernels) and with ``PERSISTENT_INNER_REDUCTIONS = False`` it is plain ``torch.compile``.

Caveat: the choice is not part of inductor's on-disk cache key; a graph compiled once without it
(an older version of this package, an ablation run) is served from the cache as it was compiled.
Ablations use one ``TORCHINDUCTOR_CACHE_DIR`` per setting.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable, Iterator

import torch

__all__ = ["PERSISTENT_INNER_REDUCTIONS", "compile_inference", "needs_backport",
           "persistent_inner_reductions"]

log = logging.getLogger(__name__)

PERSISTENT_INNER_REDUCTIONS = True  # False: plain torch.compile (bench ablation)
INNER_PERSISTENT_MAX_ELEMENTS = 1024  # inductor's persistent threshold for INNER reductions


@functools.lru_cache(maxsize=None)
def needs_backport() -> bool:
    """Whether this torch decides persistent reductions without the tiling scores (< 2.14)."""
    try:
        from torch._inductor.choices import InductorChoices
        from torch._inductor.codegen.simd_kernel_features import SIMDKernelFeatures
    except ImportError:  # an inductor too different to patch: leave it alone
        return False
    return (not hasattr(SIMDKernelFeatures, 'with_tiling_scores')
            and hasattr(InductorChoices, 'triton_kernel_kwargs'))


def wants_persistent(features: Any, kernel_kwargs: dict, default_choice: bool) -> bool:
    """Decide, as torch 2.14 would, whether one Triton kernel is persistent (backport).

    True only where inductor's own choice (``default_choice``) was a looped kernel, inductor did
    not force either kind, and the hint with the tiling scores is INNER for a row of at most
    ``INNER_PERSISTENT_MAX_ELEMENTS``.
    """
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    if default_choice or 'override_persistent_reduction' in kernel_kwargs:
        return False
    if not features.is_reduction() or kernel_kwargs.get('tiling_scores') is None:
        return False
    if features.get_reduction_hint(kernel_kwargs['tiling_scores']) != ReductionHint.INNER:
        return False
    return bool(V.graph.sizevars.statically_known_leq(features.reduction_numel,
                                                      INNER_PERSISTENT_MAX_ELEMENTS))


_warned = False


def _warn_once(exc: Exception) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    log.warning('inductor_choices: kept inductor\'s own persistent-reduction choice (%s: %s); '
                'LayerNorms over many rows may run as looped kernels', type(exc).__name__, exc)


@functools.lru_cache(maxsize=None)
def _choices_class() -> type:
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices

    class PersistentInnerReductions(InductorChoices):
        """InductorChoices with torch 2.14's persistent-reduction decision for inner rows."""

        def triton_kernel_kwargs(self, kernel_cls, features, groups, kernel_kwargs):
            kwargs = super().triton_kernel_kwargs(kernel_cls, features, groups, kernel_kwargs)
            if not config.triton.persistent_reductions or config.triton.multi_kernel:
                return kwargs
            # (A cooperative reduction, whose split rows change the thresholds, is only chosen
            # for rows far longer than INNER_PERSISTENT_MAX_ELEMENTS: nothing to exclude here.)
            try:
                default = self.should_use_persistent_reduction(features, False)
                if wants_persistent(features, kwargs, default):
                    kwargs = {**kwargs, 'override_persistent_reduction': True}
            except Exception as exc:  # an inductor whose internals moved: its own choice
                _warn_once(exc)
            return kwargs

    return PersistentInnerReductions


@functools.lru_cache(maxsize=None)
def _choices() -> Any:
    # One handler for every call: compile_inference enters it around each compiled call
    # (each frame in Pipeline), so it is built once, not per call.
    return _choices_class()()


@contextlib.contextmanager
def persistent_inner_reductions() -> Iterator[None]:
    """Within: inductor compiles (this thread) with the backported decision, where needed."""
    if not (PERSISTENT_INNER_REDUCTIONS and needs_backport()):
        yield
        return
    from torch._inductor.virtualized import V

    with V.set_choices_handler(_choices()):
        yield


def compile_inference(fn: Callable, **compile_kwargs) -> Callable:
    """``torch.compile(fn, **kwargs)`` whose calls run in :func:`persistent_inner_reductions`.

    torch.compile compiles lazily, on the first call with a new input shape, in the calling
    thread: entering the handler around every call covers every recompile (it only sets a
    thread-local, nothing on the GPU). Where this torch needs no backport (>= 2.14) the
    compiled function is returned as it is: no wrapper on every frame.
    """
    compiled = torch.compile(fn, **compile_kwargs)
    if not needs_backport():
        return compiled

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with persistent_inner_reductions():
            return compiled(*args, **kwargs)

    return call
