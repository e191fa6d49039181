"""Where a backbone's activation memory peaks: live tensor bytes op by op, without a GPU.

Issue #8 asks for VMamba-T's peak memory at 2048x2048 to be no more than ViT-S's. The GPU
benchmark (``backbone_speed.py``) reports the peak; this script says which tensors make it. The
model runs on fake tensors (``FakeTensorMode``: shapes and dtypes, no data, no arithmetic,
so 2048x2048 takes seconds) under CPU autocast in bf16 (the bytes of fp16), inside
a ``TorchDispatchMode`` that adds each op's new output storages to a live-bytes count and takes
them off when they are freed. Two emulations of the GPU run: LayerNorm computes in fp32 and
returns fp32, as CUDA autocast does (CPU autocast would keep the input dtype), and custom ops
(the scan, the fused pre-norm ops) count as their outputs only, as their CUDA kernels allocate
nothing else worth counting. Parameters and the input are reported apart. Eager order and
lifetimes, so an upper bound on what inductor's fusion and buffer reuse leave.

Usage::

    python bench/activation_memory.py --model vmamba_tiny --size 2048x2048 \
        [--fused-mlp-max-channels 256] [--fused-tail-max-channels 256] \
        [--out /tmp/activation_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parse_size  # noqa: E402  (HxW, as the speed benchmark)

MIB = 2 ** 20


class LiveBytes(TorchDispatchMode):
    """Count the bytes of the storages that ops return while they are alive; keep the peak.

    A storage is counted once however many views of it are returned; ``peak_trace`` holds the
    ops (name, output shape, dtype, live MiB after the op) leading up to the peak.
    """

    def __init__(self, trace: int = 8) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_trace: list = []
        self._alive: set = set()
        self._recent: list = []
        self._trace = trace

    def _count(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        key, size = storage._cdata, storage.nbytes()  # the StorageImpl (fake ones too)
        if size == 0 or key in self._alive:
            return
        self._alive.add(key)
        self.live += size
        weakref.finalize(storage, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        self._alive.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.native_layer_norm.default and args[0].dtype != torch.float32:
            # CUDA autocast runs layer_norm in fp32 (fp32 out); CPU autocast would not
            args = (args[0].float(), args[1], *(a.float() if isinstance(a, torch.Tensor)
                                                else a for a in args[2:]))
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        for tensor in flat:
            self._count(tensor)
        first = next((t for t in flat if isinstance(t, torch.Tensor)), None)
        if first is None:
            return out
        self._recent.append((func.overloadpacket.__name__, list(first.shape),
                             str(first.dtype).replace('torch.', ''), round(self.live / MIB, 2)))
        del self._recent[:-self._trace]
        if self.live > self.peak:
            self.peak = self.live
            self.peak_trace = list(self._recent)
        return out


def measure(build, size, dtype=torch.bfloat16) -> dict:
    """Peak live activation bytes of ``build().forward_intermediates`` on a (1, 3, *size) input.

    ``build`` makes the (real) model; its parameters and buffers are then swapped for fake
    copies, and the forward runs under ``FakeTensorMode``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    started = time.perf_counter()
    model = build()
    fake = FakeTensorMode()
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    table[name] = fake.from_tensor(tensor, static_shapes=True)
    with fake:
        x = torch.empty(1, 3, *size)
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype), LiveBytes() as live:
            outs = model.forward_intermediates(x)
            kept = sum(o.untyped_storage().nbytes() for o in outs)
    return {'activation_peak_mib': round(live.peak / MIB, 2),
            'outputs_mib': round(kept / MIB, 2),
            'outputs': [[list(o.shape), str(o.dtype).replace('torch.', '')] for o in outs],
            'params_mib': round(sum(p.numel() * p.element_size()
                                    for p in model.parameters()) / MIB, 2),
            'input_mib': round(x.numel() * x.element_size() / MIB, 2),
            'ops_up_to_peak': live.peak_trace,
            'seconds': round(time.perf_counter() - started, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='vmamba_tiny')
    parser.add_argument('--size', type=parse_size, default=(1024, 1024), help='HxW')
    parser.add_argument('--fused-mlp-max-channels', type=int)
    parser.add_argument('--fused-tail-max-channels', type=int)
    parser.add_argument('--out')
    args = parser.parse_args(argv)
    from mamba_perception.models import create_model, vmamba
    from mamba_perception.models.layers import cast_autocast_weights

    for flag, name in ((args.fused_mlp_max_channels, 'FUSED_MLP_MAX_CHANNELS'),
                       (args.fused_tail_max_channels, 'FUSED_SS2D_TAIL_MAX_CHANNELS')):
        if flag is not None:
            setattr(vmamba, name, flag)

    def build():
        return cast_autocast_weights(create_model(args.model, num_classes=0).eval(),
                                     torch.bfloat16)

    result = {'model': args.model, 'size': list(args.size),
              'fusion': {name: getattr(vmamba, name) for name in (
                  'FUSED_MLP_MAX_CHANNELS', 'FUSED_SS2D_TAIL_MAX_CHANNELS')},
              **measure(build, args.size)}
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)
    print(f"{args.model} {args.size[0]}x{args.size[1]}: activation peak "
          f"{result['activation_peak_mib']} MiB (outputs {result['outputs_mib']}, params "
          f"{result['params_mib']}, input {result['input_mib']}; {result['seconds']} s); the ops "
          "up to the peak (name, output shape, dtype, live MiB):")
    for op in result['ops_up_to_peak']:
        print('  ', *op)
    return 0


if __name__ == '__main__':
    sys.exit(main())
