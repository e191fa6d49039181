"""The README's main job: from a sample bag of real video to a replay report, in one command.

::

    python -m mamba_perception.replay.demo      # what `tools/dev demo` runs

1. builds the sample bag from OpenCV's ``vtest.avi`` if it is not there yet (MCAP,
   ``sensor_msgs/Image`` + ``sensor_msgs/CompressedImage``, see :mod:`.sample`);
2. creates the default bundle if it is missing. Until trained weights exist it is
   RANDOM-INITIALISED: the report says so in its first line and presents no accuracy;
3. replays the compressed camera topic through the Pipeline and writes the report;
4. prints where the report is.

Everything goes into ``$MAMBA_PERCEPTION_DEMO_DIR`` (default
``~/.cache/mamba_perception/demo``), or ``--dir``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import sys
from typing import Optional, Sequence

from mamba_perception.errors import MambaPerceptionError

DEMO_CLASSES = ('person', 'bicycle', 'car', 'motorcycle', 'bus', 'truck')
BUNDLE_NAME = 'default_random_vmamba_test.safetensors'


def demo_dir() -> Path:
    """Default working folder of the demo."""
    if os.environ.get('MAMBA_PERCEPTION_DEMO_DIR'):
        return Path(os.environ['MAMBA_PERCEPTION_DEMO_DIR'])
    cache = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache')
    return cache / 'mamba_perception' / 'demo'


def default_bundle(folder: Path) -> Path:
    """Return the demo's bundle, created (random weights, loudly labelled) if missing."""
    path = folder / BUNDLE_NAME
    if not path.exists():
        from mamba_perception.models.bundle import create_random_bundle
        folder.mkdir(parents=True, exist_ok=True)
        create_random_bundle(path, backbone='vmamba_test', class_names=DEMO_CLASSES, seed=0)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; returns the replay exit code."""
    from mamba_perception.replay import sample
    from mamba_perception.replay.cli import print_summary, run_replay

    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dir', type=Path, default=None, help='working folder (see module doc)')
    p.add_argument('--frames', type=int, default=20,
                   help='frames of vtest.avi in the sample bag (default %(default)s)')
    p.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    p.add_argument('--bundle', type=Path, default=None, help='bundle (default: the demo one)')
    args = p.parse_args(argv)
    folder = args.dir or demo_dir()
    folder.mkdir(parents=True, exist_ok=True)
    bag = folder / f'vtest_sample_{args.frames}'
    try:
        if not bag.exists():
            print(f'building the sample bag {bag} from {sample.find_sample_video()} ...')
            sample.build_sample_bag(bag, count=args.frames)
        bundle = args.bundle or default_bundle(folder)
        device = args.device
        if device is None:
            import torch
            device = 'cuda' if torch.cuda.is_available() else 'cpu'
        print(f'replaying {sample.COMPRESSED_TOPIC} of {bag} with {bundle} on {device} ...')
        result = run_replay([bag], bundle, folder / 'report', topics=[sample.COMPRESSED_TOPIC],
                            device=device,
                            argv=['python', '-m', 'mamba_perception.replay.demo',
                                  *(argv if argv is not None else sys.argv[1:])])
    except MambaPerceptionError as err:
        print(f'demo: error: {err}', file=sys.stderr)
        return 4
    print_summary(result)
    print(f'\nThe report is at {result.paths["markdown"]}')
    return result.exit_code


if __name__ == '__main__':
    sys.exit(main())
