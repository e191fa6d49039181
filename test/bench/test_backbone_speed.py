"""bench/backbone_speed.py helpers that run without a GPU."""

from bench_modules import load

from mamba_perception.pipeline import COMPILE_OPTIONS

backbone_speed = load('backbone_speed')


def test_ours_compile_as_the_pipeline_baselines_with_inductor_defaults():
    ours = backbone_speed.compile_kwargs_for('vmamba_tiny', 'compile')
    assert ours == {'options': COMPILE_OPTIONS}
    assert backbone_speed.compile_kwargs_for('vit_small_patch16_224', 'compile') == {'mode': None}
    assert backbone_speed.compile_kwargs_for('convnext_tiny', 'compile-max') == {
        'mode': 'max-autotune-no-cudagraphs'}
    ours_max = backbone_speed.compile_kwargs_for('vim_tiny', 'compile-max')['options']
    assert ours_max['max_autotune'] is True and ours_max['inplace_buffers'] is False
    # an ablation of one of our options on the command line reaches inductor
    ablated = backbone_speed.compile_kwargs_for('vmamba_tiny', 'compile',
                                                ['inplace_buffers=true'])
    assert 'inplace_buffers' not in ablated['options']
