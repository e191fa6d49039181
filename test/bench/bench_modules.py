"""Import a bench/ script as a module for its tests (bench/ is not a package)."""

import importlib.util
from pathlib import Path
import sys

BENCH = Path(__file__).resolve().parents[2] / 'bench'


def load(name):
    """Import bench/<name>.py, leaving sys.path and a top-level 'common' module as they were."""
    path, had_common = list(sys.path), 'common' in sys.modules
    spec = importlib.util.spec_from_file_location(f'bench_{name}', BENCH / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
        if not had_common:
            sys.modules.pop('common', None)
    return module
