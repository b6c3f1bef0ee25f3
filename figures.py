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


LABEL_HEIGHT = 16  # px of the strip of column labels above a figure (PIL's built-in font is about 11 px high)


def save_figure(tiles, path, columns, padding, pad_value=1.0, labels=None):
    """Save images [N, 3, h, w] (or a list of [3, h, w]) in [0, 1] as a PNG grid of `columns` per row, each enlarged
    by the smallest integer factor that makes a row at least FIGURE_MIN_WIDTH px wide, by repeating pixels (nearest
    neighbour: patches stay crisp squares). labels: one short text per column, drawn centred above it in a strip of
    LABEL_HEIGHT px (PIL's built-in font; a text wider than its column is cut). Returns the PNG's (width, height)."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid
    tiles = torch.stack(list(tiles)) if isinstance(tiles, (list, tuple)) else tiles
    k = max(1, math.ceil((FIGURE_MIN_WIDTH - (columns + 1) * padding) / (columns * tiles.shape[-1])))
    grid = make_grid(tiles.repeat_interleave(k, -2).repeat_interleave(k, -1), nrow=columns, padding=padding,
                     pad_value=pad_value)
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()  # as save_image
    figure = Image.fromarray(pixels)
    if labels:
        width, background = figure.width, round(255 * pad_value)
        figure = Image.new("RGB", (width, figure.height + LABEL_HEIGHT), (background,) * 3)
        figure.paste(Image.fromarray(pixels), (0, LABEL_HEIGHT))
        draw, font, ink = ImageDraw.Draw(figure), ImageFont.load_default(), (0,) * 3 if pad_value > 0.5 else (255,) * 3
        column = k * tiles.shape[-1]
        for c, text in enumerate(labels):
            while len(text) > 1 and draw.textlength(text, font=font) > column:
                text = text[:-2] + "."
            left = padding + c * (column + padding) + (column - draw.textlength(text, font=font)) / 2
            top, bottom = draw.textbbox((0, 0), text, font=font)[1::2]
            draw.text((left, (LABEL_HEIGHT - top - bottom) / 2), text, fill=ink, font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.save(path)
    return figure.size


def figure_line(path, size, rows, columns):
    """The line a script prints for its figure: where, how large, and what each column shows."""
    return f"wrote {path} ({size[0]}x{size[1]} px), {rows} images; columns: {' | '.join(columns)}"
