"""The figures of the scripts' --vis: images sampled across the classes, laid out in a grid enlarged to a readable
width."""
import math
from pathlib import Path

import torch

from common import IMAGENET_MEAN, IMAGENET_STD


def denormalize(imgs):
    """ImageNet-normalised images [..., 3, H, W] -> pixel values in [0, 1], on the CPU, for figures."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (imgs.detach().float().cpu() * std + mean).clamp(0, 1)


FIGURE_MIN_WIDTH = 512  # the --vis figures are enlarged until a row of panels is at least this many pixels wide


def sample_across_classes(dataset, n, seed):
    """Indices of n images of `dataset` for a figure, spread over its classes (a class-sorted folder's first images
    are all of one class): all images in an order shuffled by a generator seeded by `seed`, taken round-robin over
    the classes (the first image of each class in that order, then the second of each, ...), so n different classes
    when there are n. Labels come from `samples` (ImageFolder: no image is read), else from `load` (SyntheticShapes),
    read in that order only until the choice is settled."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    samples, classes = getattr(dataset, "samples", None), len(getattr(dataset, "classes", ())) or 1
    n, seen, ranked = min(n, len(dataset)), {}, []  # seen: images of each label so far; ranked: (round, place, index)
    for place, i in enumerate(order):
        label = samples[i][1] if samples is not None else dataset.load(i)[1]
        ranked.append((seen.get(label, 0), place, i))
        seen[label] = seen.get(label, 0) + 1
        fewest = min(seen.values()) if len(seen) == classes else 0  # every later image is in this round or a later one
        if sum(min(count, fewest + 1) for count in seen.values()) >= n:  # n chosen in rounds <= fewest: settled
            break
    return [i for _, _, i in sorted(ranked)[:n]]


def save_figure(tiles, path, columns, padding, pad_value=1.0):
    """Save images [N, 3, h, w] (or a list of [3, h, w]) in [0, 1] as a PNG grid of `columns` per row, each enlarged
    by the smallest integer factor that makes a row at least FIGURE_MIN_WIDTH px wide, by repeating pixels (nearest
    neighbour: patches stay crisp squares). Returns the PNG's (width, height)."""
    from torchvision.utils import make_grid, save_image
    tiles = torch.stack(list(tiles)) if isinstance(tiles, (list, tuple)) else tiles
    k = max(1, math.ceil((FIGURE_MIN_WIDTH - (columns + 1) * padding) / (columns * tiles.shape[-1])))
    grid = make_grid(tiles.repeat_interleave(k, -2).repeat_interleave(k, -1), nrow=columns, padding=padding,
                     pad_value=pad_value)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return grid.shape[2], grid.shape[1]
