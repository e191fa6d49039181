"""Fixtures for the pipeline tests: small random bundles, built once per session."""

import pytest
import torch

from mamba_perception.models.bundle import create_random_bundle


@pytest.fixture(scope='session', autouse=True)
def _two_threads():
    # CI has 2 cores; more threads only add contention there.
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope='session')
def bundle_path(tmp_path_factory):
    """Det + seg random bundle (vmamba_test backbone, narrow heads, 3 classes) on disk."""
    path = tmp_path_factory.mktemp('bundles') / 'random_detseg.safetensors'
    create_random_bundle(path, backbone='vmamba_test', num_classes=3,
                         input_policy={'max_long_side_px': 256, 'max_short_side_px': 256})
    return path


@pytest.fixture(scope='session')
def pipeline(bundle_path):
    from mamba_perception.pipeline import Pipeline
    return Pipeline(bundle_path, score_threshold=0.0)
