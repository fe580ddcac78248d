"""How far is ImageReward's torch preprocessing (reward_forcing/rewards/imagereward.py) from the released PIL
transform (THUDM/ImageReward ImageReward.py: Resize(224, BICUBIC) + CenterCrop(224) on a PIL image)?

    python scripts/compare_imagereward_preprocessing.py photo1.jpg photo2.png ...

Prints, per image, the max / mean / 99.9th-percentile absolute difference of the 224 x 224 crops in uint8 levels
(before the CLIP normalisation). The PIL side rounds to uint8 after each 1-D pass; the torch side stays float.
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from reward_forcing.rewards.imagereward import center_crop, read_image, resize_short_side


def pil_crop(path, size: int) -> np.ndarray:
    """torchvision's Resize(size) (short side, long side truncated) and CenterCrop(size), with PIL calls."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        long = int(size * max(h, w) / min(h, w))
        resized = np.asarray(image.resize((long, size) if h <= w else (size, long), Image.BICUBIC), dtype=np.float64)
    top, left = round((resized.shape[0] - size) / 2), round((resized.shape[1] - size) / 2)
    return resized[top:top + size, left:left + size]


def torch_crop(path, size: int) -> np.ndarray:
    pixels = read_image(Path(path)).double()
    crop = center_crop(resize_short_side(pixels, size), size).clamp(0, 255)
    return crop[0].permute(1, 2, 0).numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    for path in args.images:
        diff = np.abs(torch_crop(path, args.size) - pil_crop(path, args.size))
        print(f"{path}: max {diff.max():.3f}, mean {diff.mean():.3f}, p99.9 {np.percentile(diff, 99.9):.3f} "
              "uint8 levels")
    return 0

