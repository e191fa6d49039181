"""bench/common.py helpers that run without a GPU."""

from bench_modules import load
import pytest
from torch._inductor import config as inductor_config


def test_apply_inductor_config_sets_and_rejects(monkeypatch):
    common = load('common')
    # monkeypatch restores the entries after the test (inductor's config is process-wide)
    monkeypatch.setattr(inductor_config, 'coordinate_descent_tuning',
                        inductor_config.coordinate_descent_tuning)
    monkeypatch.setattr(inductor_config.triton, 'unique_kernel_names',
                        inductor_config.triton.unique_kernel_names)
    applied = common.apply_inductor_config(['coordinate_descent_tuning=true',
                                            'triton.unique_kernel_names=false'])
    assert applied == {'coordinate_descent_tuning': True, 'triton.unique_kernel_names': False}
    assert inductor_config.coordinate_descent_tuning is True
    assert inductor_config.triton.unique_kernel_names is False
    with pytest.raises(ValueError, match='has no'):
        common.apply_inductor_config(['no_such_setting=1'])
    with pytest.raises(ValueError, match='KEY=VALUE'):
        common.apply_inductor_config(['coordinate_descent_tuning'])
