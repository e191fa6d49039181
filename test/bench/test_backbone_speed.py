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


def test_peak_counts_weights_input_and_activations_not_what_warm_up_left(monkeypatch):
    """The allocator's counters stand in for a GPU's: a first row must not carry the
    workspace that the process's first GEMM allocated during its warm-up calls."""
    import torch

    mib = 2 ** 20
    allocator = {'now': 0, 'peak': 0}

    def alloc(nbytes):
        allocator['now'] += nbytes
        allocator['peak'] = max(allocator['peak'], allocator['now'])

    def step():  # 32 MiB of activations and outputs, freed when the caller drops them
        alloc(32 * mib)
        alloc(-32 * mib)

    monkeypatch.setattr(torch.cuda, 'synchronize', lambda: None)
    monkeypatch.setattr(torch.cuda, 'memory_allocated', lambda: allocator['now'])
    monkeypatch.setattr(torch.cuda, 'max_memory_allocated', lambda: allocator['peak'])
    monkeypatch.setattr(torch.cuda, 'reset_peak_memory_stats',
                        lambda: allocator.update(peak=allocator['now']))
    alloc(100 * mib)  # another row's model, still cached
    alloc(10 * mib + 5 * mib)  # this row's weights and input
    alloc(40 * mib)  # cuBLAS's workspace, allocated by a warm-up call
    mem = backbone_speed.peak_of(step, weights_bytes=10 * mib, input_bytes=5 * mib)
    assert mem == {'weights_mib': 10.0, 'peak_mem_mib': 47.0, 'peak_mem_above_weights_mib': 37.0}
