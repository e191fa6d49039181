"""compile_inference: torch.compile with inner LayerNorm rows kept persistent on torch < 2.14."""

import pytest
import torch
from torch._inductor.virtualized import V
import torch.nn.functional as F

from mamba_perception import inductor_choices


def test_handler_is_in_force_during_compiled_calls_only(monkeypatch):
    monkeypatch.setattr(inductor_choices, 'needs_backport', lambda: True)
    seen = []

    def fake_compile(fn, **kwargs):  # records the choices handler when the graph would compile
        seen.append(kwargs)
        return lambda *args: (type(V.choices), fn(*args))

    monkeypatch.setattr(torch, 'compile', fake_compile)
    before = V.choices
    fn = inductor_choices.compile_inference(torch.neg, dynamic=False, options={'a': 1})
    handler, out = fn(torch.ones(2))
    assert seen == [{'dynamic': False, 'options': {'a': 1}}]
    assert handler is inductor_choices._choices_class()
    assert torch.equal(out, -torch.ones(2))
    assert V.choices is before  # restored after the call
    monkeypatch.setattr(inductor_choices, 'PERSISTENT_INNER_REDUCTIONS', False)
    handler, _ = fn(torch.ones(2))
    assert handler is type(before)


def test_handler_is_restored_when_the_call_raises(monkeypatch):
    monkeypatch.setattr(inductor_choices, 'needs_backport', lambda: True)
    before = V.choices
    with pytest.raises(RuntimeError, match='boom'):
        with inductor_choices.persistent_inner_reductions():
            assert isinstance(V.choices, inductor_choices._choices_class())
            raise RuntimeError('boom')
    assert V.choices is before


def test_no_handler_where_torch_decides_with_the_tiling_scores():
    from torch._inductor.codegen.simd_kernel_features import SIMDKernelFeatures

    if hasattr(SIMDKernelFeatures, 'with_tiling_scores'):  # torch >= 2.14 (CI)
        assert not inductor_choices.needs_backport()
    else:
        assert inductor_choices.needs_backport()
    before = V.choices
    with inductor_choices.persistent_inner_reductions():
        assert (V.choices is before) != inductor_choices.needs_backport()


def test_compiled_layer_norm_matches_eager_on_cpu():
    weight, bias = torch.randn(384), torch.randn(384)

    def add_norm(x, y):
        return F.layer_norm(x + y, (384,), weight, bias)

    x, y = torch.randn(64, 384), torch.randn(64, 384)
    torch._dynamo.reset()
    out = inductor_choices.compile_inference(add_norm, dynamic=False)(x, y)
    torch._dynamo.reset()
    torch.testing.assert_close(out, add_norm(x, y), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_large_inner_layer_norm_is_persistent_on_cuda():
    """VMamba's out_norm over the SS2D scan's two parts (``y[0].float() + y[1]``) with 16384
    rows of 384 channels (stage 3 at 2048^2): above 2 * 32 * SMs rows torch 2.11-2.13 alone
    write a looped kernel (the second part's offset reads are not "contiguous" to the IR's
    hint); compile_inference keeps each row in registers."""
    from torch._inductor.utils import run_and_get_code

    weight = torch.randn(384, device='cuda')
    bias = torch.randn(384, device='cuda')

    def parts_norm(y):
        return F.layer_norm(y[0].float() + y[1], (384,), weight, bias).half()

    y = torch.randn(2, 16384, 384, device='cuda', dtype=torch.float16)
    kinds = {}
    with torch._inductor.config.patch(fx_graph_cache=False):
        for name, compile_fn in (('plain', torch.compile),
                                 ('ours', inductor_choices.compile_inference)):
            torch._dynamo.reset()
            out, code = run_and_get_code(compile_fn(parts_norm, dynamic=False), y)
            torch.testing.assert_close(out, parts_norm(y), rtol=2e-3, atol=2e-3)
            source = '\n'.join(code)
            kinds[name] = {kind for kind in ('triton_per_fused', 'triton_red_fused')
                           if kind in source}
    torch._dynamo.reset()
    assert kinds['ours'] == {'triton_per_fused'}, kinds
    if inductor_choices.needs_backport():
        assert kinds['plain'] == {'triton_red_fused'}, kinds  # what the backport is for


def test_an_inductor_whose_internals_moved_keeps_its_choice_and_warns_once(monkeypatch, caplog):
    """A decision that fails (here: features without the attributes it reads) leaves inductor's
    kwargs as they were, with one warning for the process, not one per kernel."""
    monkeypatch.setattr(inductor_choices, '_warned', False)
    handler = inductor_choices._choices()
    kwargs = {'features': None, 'tiling_scores': None}
    with caplog.at_level('WARNING', logger='mamba_perception.inductor_choices'):
        for _ in range(3):
            assert handler.triton_kernel_kwargs(None, None, [], kwargs) == kwargs
    assert ["kept inductor's own persistent-reduction choice" in r.getMessage()
            for r in caplog.records] == [True]
