"""Pull named Triton kernels out of an inductor ``output_code`` log, one file per kernel.

A profile (``profile_backbone.py``) names inductor's kernels (``triton_per_fused_..._1``) but
not what they do or how they are launched. Run the same forward with ``TORCH_LOGS=output_code``
(the generated modules go to stderr), then keep only the kernels worth reading::

    TORCH_LOGS=output_code python bench/profile_backbone.py --model vmamba_tiny \
        --dtype bf16 --compile --no-eager --out $OUT/p.json 2> $OUT/output_code_bf16.log
    python bench/kernel_source.py $OUT/output_code_bf16.log \
        triton_per_fused__to_copy_native_layer_norm_1 --out-dir $OUT/kernels_bf16

Each kernel is written with the ``@triton_heuristics`` decorator that precedes it (its size
hints, reduction hint and configs). A name inductor defined twice (two compiled graphs) gets
every definition, separated by a ``# ---`` line.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

# async_compile.triton('NAME', '''SOURCE''', device_str='cuda')
_KERNEL = re.compile(r"async_compile\.triton\(\s*'(?P<name>\w+)'\s*,\s*'''(?P<src>.*?)'''",
                     re.S)

# The logging prefix torch writes before each line of the output_code artifact (torch 2.11 on
# the lent GPUs puts it on every line of the generated module, not only on the first):
# V1128 17:24:13.721000 516 torch/_inductor/graph.py:2552] [0/0] [__output_code] SOURCE LINE
_LOG_PREFIX = re.compile(r"^[DIVWE]\d{4} [\d:.]+ \d+ \S+\] \[[^\]]*\] \[__output_code\] ?",
                         re.M)


def kernel_sources(log_text: str, names=None) -> dict:
    """Return {kernel name: [source, ...]} for the (given) kernels defined in ``log_text``."""
    found = {}
    for match in _KERNEL.finditer(_LOG_PREFIX.sub('', log_text)):
        name = match.group('name')
        if names is None or name in names:
            found.setdefault(name, []).append(match.group('src').strip('\n'))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('log', help='a TORCH_LOGS=output_code log')
    parser.add_argument('names', nargs='*', help='kernel names (default: list them all)')
    parser.add_argument('--out-dir', default=None, help='write NAME.py files here')
    args = parser.parse_args(argv)
    with open(args.log, encoding='utf-8', errors='replace') as f:
        found = kernel_sources(f.read(), set(args.names) or None)
    missing = [n for n in args.names if n not in found]
    for name, sources in sorted(found.items()):
        print(f'{name}: {len(sources)} definition(s), {sum(map(len, sources))} chars')
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            with open(os.path.join(args.out_dir, f'{name}.py'), 'w', encoding='utf-8') as f:
                f.write('\n# ---\n'.join(sources) + '\n')
    if missing:
        print(f'not in {args.log}: {", ".join(missing)}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
