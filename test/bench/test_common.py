"""bench/common.py helpers that run without a GPU."""

from bench_modules import load
import pytest
from torch._inductor import config as inductor_config


def test_apply_inductor_config_sets_and_rejects():
    common = load('common')
    # inductor's config is process-wide: restored by hand (pytest's monkeypatch deletes the
    # attribute on undo, which removes the setting from inductor's config module)
    triton_config = inductor_config.triton
    before = (inductor_config.coordinate_descent_tuning, triton_config.unique_kernel_names)
    try:
        applied = common.apply_inductor_config(['coordinate_descent_tuning=true',
                                                'triton.unique_kernel_names=false'])
        assert applied == {'coordinate_descent_tuning': True,
                           'triton.unique_kernel_names': False}
        assert inductor_config.coordinate_descent_tuning is True
        assert inductor_config.triton.unique_kernel_names is False
        with pytest.raises(ValueError, match='has no'):
            common.apply_inductor_config(['no_such_setting=1'])
        with pytest.raises(ValueError, match='KEY=VALUE'):
            common.apply_inductor_config(['coordinate_descent_tuning'])
    finally:
        inductor_config.coordinate_descent_tuning, triton_config.unique_kernel_names = before
    assert inductor_config.coordinate_descent_tuning == before[0]


def test_lowrank_tuning_option_updates_the_tuning_and_rejects_unknown_keys(monkeypatch):
    import argparse

    from mamba_perception_kernels.triton import ss2d_lowrank

    common = load('common')
    monkeypatch.setattr(ss2d_lowrank, 'TUNING', dict(ss2d_lowrank.TUNING))
    parser = argparse.ArgumentParser()
    common.add_lowrank_tuning_option(parser)
    default = common.apply_lowrank_tuning_option(parser.parse_args([]))
    assert default == ss2d_lowrank.TUNING
    in_use = common.apply_lowrank_tuning_option(parser.parse_args(
        ['--lowrank-tuning', '{"seq_delta_map_max_bytes": 67108864}']))
    assert ss2d_lowrank.TUNING['seq_delta_map_max_bytes'] == 67108864
    assert in_use == {**default, 'seq_delta_map_max_bytes': 67108864}
    # a misspelt key would otherwise time the default under the new name
    with pytest.raises(SystemExit, match='seq_delta_map_max_byte'):
        common.apply_lowrank_tuning_option(parser.parse_args(
            ['--lowrank-tuning', '{"seq_delta_map_max_byte": 1}']))
    assert ss2d_lowrank.TUNING == in_use


def test_compile_kwargs_are_the_pipelines_options_unless_ablated():
    from mamba_perception.pipeline import COMPILE_OPTIONS

    common = load('common')
    assert common.compile_kwargs() == {'options': COMPILE_OPTIONS}
    assert COMPILE_OPTIONS['inplace_buffers'] is False
    max_autotune = common.compile_kwargs('max-autotune-no-cudagraphs')['options']
    assert max_autotune['max_autotune'] is True and max_autotune['inplace_buffers'] is False
    # a --inductor-config setting of the same key must reach inductor, not be overridden
    ablated = common.compile_kwargs(None, ['inplace_buffers=true', 'max_autotune=false'])
    assert 'inplace_buffers' not in ablated['options']
    # a timm baseline compiles as a user would: the mode alone
    assert common.compile_kwargs('max-autotune-no-cudagraphs', baseline=True) == {
        'mode': 'max-autotune-no-cudagraphs'}


def test_best_launch_config_sums_over_groups_and_skips_errors():
    common = load('common')
    groups = [[{'variant': 'floor', 'us': 1.0},
               {'variant': 'op', 'a': 1, 'b': 2, 'us': 10.0, 'rel_l2': 0.0},
               {'variant': 'op', 'a': 2, 'b': 2, 'us': 8.0, 'rel_l2': 0.0},
               {'variant': 'op', 'a': 3, 'b': 2, 'error': 'out of resources'}],
              [{'variant': 'op', 'a': 1, 'b': 2, 'us': 10.0},
               {'variant': 'op', 'a': 2, 'b': 2, 'us': 13.0}]]
    # fastest in the first group alone (8 us), not over both (21 vs 20)
    assert common.best_launch_config(groups, ('a', 'b')) == ({'a': 1, 'b': 2}, 20.0)


def test_time_launch_config_reports_a_configuration_that_fails():
    common = load('common')

    def run():
        raise RuntimeError('out of resources: shared memory')
    assert common.time_launch_config(run, None, {'a': 1}) == {
        'variant': 'op', 'a': 1, 'error': 'out of resources: shared memory'}


def test_compile_model_gives_ours_the_pipelines_choices_and_baselines_plain(monkeypatch):
    import argparse

    import torch
    from torch._inductor.virtualized import V

    from mamba_perception import inductor_choices

    common = load('common')
    monkeypatch.setattr(inductor_choices, 'needs_backport', lambda: True)
    monkeypatch.setattr(torch, 'compile', lambda fn, **kwargs: lambda: type(V.choices))
    ours = common.compile_model(None, dynamic=False)
    baseline = common.compile_model(None, baseline=True, dynamic=False)
    assert ours() is inductor_choices._choices_class()
    assert baseline() is not inductor_choices._choices_class()
    # --persistent-norms off: ours compile plainly too, and the provenance says so
    parser = argparse.ArgumentParser()
    common.add_persistent_norms_option(parser)
    monkeypatch.setattr(inductor_choices, 'PERSISTENT_INNER_REDUCTIONS', True)
    applied = common.apply_persistent_norms_option(parser.parse_args(['--persistent-norms',
                                                                      'off']))
    assert applied == {'persistent_inner_reductions': False, 'needed_by_this_torch': True}
    assert ours() is not inductor_choices._choices_class()


def test_parse_size_reads_height_by_width_and_rejects_bad_sizes():
    import argparse

    common = load('common')
    assert common.parse_size('720x1280') == (720, 1280)
    assert common.parse_size('2048X2048') == (2048, 2048)
    for bad, why in (('720', 'not HxW'), ('axb', 'not HxW'), ('1x2x3', 'not HxW'),
                     ('16x1280', '>= 32')):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            common.parse_size(bad)
