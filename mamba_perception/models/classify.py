"""``classify``: prove that an official checkpoint loaded right by classifying one image.

Usage::

    classify vssm1_tiny_0230s_ckpt_epoch_264.pth dog.jpg            # model guessed from keys
    classify --model vim_small vim_s_midclstok_80p5acc.pth dog.jpg --device cuda

Loads the checkpoint through the safe loader (strict), applies the official ImageNet evaluation
preprocessing (resize the short side to size / 0.875 with bicubic, centre crop, ImageNet
mean / std) and prints the top-k classes with their softmax scores. Exit status 0 on success,
2 for a bad argument or checkpoint.
"""

import argparse
from pathlib import Path
import sys
from typing import List, Optional, Sequence, Tuple

import torch

from mamba_perception.errors import CheckpointError, MambaPerceptionError, SetupError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSES_FILE = Path(__file__).resolve().parent.parent / 'data' / 'imagenet1k_classes.txt'


def imagenet_classes() -> List[str]:
    """Return the 1000 ImageNet-1k class names in label order (torchvision's list, offline)."""
    return CLASSES_FILE.read_text().splitlines()


def preprocess(path: str, size: int = 224, crop_pct: float = 0.875) -> torch.Tensor:
    """Image file -> (1, 3, size, size) float tensor, official eval preprocessing."""
    try:
        from PIL import Image
    except ImportError:
        raise SetupError('classify needs Pillow to read images: pip install pillow') from None
    try:
        img = Image.open(path).convert('RGB')
    except (OSError, ValueError) as exc:
        raise MambaPerceptionError(f'cannot read image {path!r}: {exc}') from None
    short = int(size / crop_pct)
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                     Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    x = x.view(size, size, 3).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std)[None]


def guess_model_name(checkpoint: str) -> str:
    """Model name for an official checkpoint, from its keys and shapes."""
    from .checkpoint import describe_state_dict, extract_state_dict, load_checkpoint_file

    sd = extract_state_dict(load_checkpoint_file(checkpoint), source=f'checkpoint {checkpoint!r}')
    text = describe_state_dict(sd)
    if ' = ' not in text:
        raise CheckpointError(f'cannot tell which model {checkpoint!r} is for ({text}); '
                              f'pass --model')
    return text.rsplit(' = ', 1)[1]


def classify(checkpoint: str, image: str, model_name: Optional[str] = None, top: int = 5,
             size: int = 224, device: str = 'cpu') -> List[Tuple[str, float]]:
    """Top-``top`` (class name, probability) of ``image`` under ``checkpoint``."""
    from . import create_model
    from .checkpoint import load_official

    name = model_name or guess_model_name(checkpoint)
    with torch.device('meta'):
        model = create_model(name)
    load_official(model, checkpoint)
    model = model.to(device).eval()
    x = preprocess(image, size).to(device)
    with torch.no_grad():
        probs = model(x).float().softmax(-1)[0]
    classes = imagenet_classes()
    scores, idx = probs.topk(top)
    return [(classes[i] if i < len(classes) else f'class {i}', float(s))
            for s, i in zip(scores.tolist(), idx.tolist(), strict=True)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point ``classify``."""
    parser = argparse.ArgumentParser(prog='classify', description=__doc__.split('\n')[0])
    parser.add_argument('checkpoint', help='official .pth file (VMamba or Vim, ImageNet-1k)')
    parser.add_argument('image', help='image file (anything Pillow reads)')
    parser.add_argument('--model', help='model name (default: guessed from the checkpoint)')
    parser.add_argument('--top', type=int, default=5, help='how many classes to print')
    parser.add_argument('--size', type=int, default=224, help='crop size (default 224)')
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (default cpu)")
    args = parser.parse_args(argv)
    try:
        results = classify(args.checkpoint, args.image, args.model, args.top, args.size,
                           args.device)
    except (MambaPerceptionError, KeyError) as exc:
        print(f'classify: error: {exc}', file=sys.stderr)
        return 2
    for rank, (label, score) in enumerate(results, 1):
        print(f'{rank}. {label:<40s} {score:.4f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
