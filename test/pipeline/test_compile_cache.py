"""torch.compile's on-disk cache: a restarted process loads the compiled model, not recompiles."""

import json
import os
from pathlib import Path
import subprocess
import sys

import pytest

from mamba_perception.errors import SetupError
from mamba_perception.models.bundle import create_random_bundle
from mamba_perception.pipeline import use_compile_cache

# One process = one node start: build a compiled Pipeline, serve a frame, report what inductor's
# FX graph cache did (counters of this process only).
START = '''
import json, sys, time
import numpy as np
import torch
from mamba_perception.pipeline import Pipeline
t = time.perf_counter()
pipe = Pipeline(sys.argv[1], compile=True, compile_cache_dir=sys.argv[2])
pipe(np.zeros((64, 64, 3), np.uint8))
c = torch._dynamo.utils.counters['inductor']
print(json.dumps({'first_frame_s': time.perf_counter() - t, 'hit': c['fxgraph_cache_hit'],
                  'miss': c['fxgraph_cache_miss']}))
'''


def start(bundle: Path, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != 'TORCHINDUCTOR_CACHE_DIR'}
    proc = subprocess.run([sys.executable, '-c', START, str(bundle), str(cache)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_restart_loads_the_compiled_model_from_the_cache_dir(tmp_path):
    bundle = create_random_bundle(tmp_path / 'seg.safetensors', tasks=('segmentation',),
                                  num_classes=3).path
    cache = tmp_path / 'nested' / 'compile_cache'  # created on demand
    first = start(bundle, cache)
    assert first['miss'] >= 1 and first['hit'] == 0
    assert any(cache.iterdir())  # the entries landed where asked, not in the temp dir
    again = start(bundle, cache)
    assert again['hit'] >= 1 and again['miss'] == 0
    print(f"first start {first['first_frame_s']:.1f} s, restart {again['first_frame_s']:.1f} s")


def test_use_compile_cache_sets_the_directory(tmp_path, monkeypatch):
    monkeypatch.delenv('TORCHINDUCTOR_CACHE_DIR', raising=False)
    path = use_compile_cache(tmp_path / 'c')
    assert path == str(tmp_path / 'c') and os.path.isdir(path)
    assert os.environ['TORCHINDUCTOR_CACHE_DIR'] == path
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    with pytest.raises(SetupError, match='cannot be created'):
        use_compile_cache(blocker / 'c')


# One process: batches 2 and 3 through a compiled Pipeline with a dynamic batch size, then
# batch 1; how many graphs dynamo compiled, and the largest difference to eager.
DYNAMIC_BATCH = '''
import json, sys
import numpy as np
import torch
from mamba_perception.pipeline import Pipeline
eager = Pipeline(sys.argv[1])
pipe = Pipeline(sys.argv[1], compile=True, compile_dynamic_batch=True)
rng = np.random.default_rng(0)
changed = []
for batch in (2, 3, 1):
    frames = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(batch)]
    changed += [float((a.class_mask != b.class_mask).mean())
                for a, b in zip(pipe(frames), eager(frames))]
print(json.dumps({'graphs': torch._dynamo.utils.counters['stats']['unique_graphs'],
                  'changed': max(changed)}))
'''


def test_dynamic_batch_compiles_once_for_every_batch_above_one(tmp_path):
    """compile_dynamic_batch: batches 2 and 3 share one graph (a static compile makes one per
    batch size), batch 1 has its own; the class masks are those of eager."""
    bundle = create_random_bundle(tmp_path / 'seg.safetensors', tasks=('segmentation',),
                                  num_classes=3).path
    env = {**os.environ, 'TORCHINDUCTOR_CACHE_DIR': str(tmp_path / 'inductor')}
    proc = subprocess.run([sys.executable, '-c', DYNAMIC_BATCH, str(bundle)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report['graphs'] == 2, report
    assert report['changed'] < 1e-3, report
