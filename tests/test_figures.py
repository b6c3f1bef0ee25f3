"""The --vis figures of the three methods (latent_mim --vis, pcae --vis, semmae pretrain --vis, the stage-A parts
preview): images drawn across the classes of the dataset (not its first, same-class images), a row of panels at
least FIGURE_MIN_WIDTH px wide by nearest-neighbour enlargement, and the same PNG for the same seed."""
import importlib

import pytest
import torch
from PIL import Image

from common import SyntheticShapes, build_dataset
from figures import FIGURE_MIN_WIDTH, LABEL_HEIGHT, sample_across_classes, save_figure
from train_utils import save_checkpoint
from conftest import argv, write_parts_file

# A class-sorted folder: class c, image j is the solid colour (30 + 90c, 30 + 60j, 220 - 90c); every pair of the 12
# colours is at least 60 apart in some channel, so a panel's colour names its image even after resizing.
CLASSES, PER_CLASS = 3, 4
COLOUR = {(c, j): (30 + 90 * c, 30 + 60 * j, 220 - 90 * c) for c in range(CLASSES) for j in range(PER_CLASS)}


@pytest.fixture
def folder(tmp_path):
    for (c, j), rgb in COLOUR.items():
        (tmp_path / "data" / "train" / f"class{c}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), rgb).save(tmp_path / "data" / "train" / f"class{c}" / f"{j}.png")
    return tmp_path / "data"


def folder_parts_file(path, data):
    """A SemMAE parts file for the 12 images of `folder` (4 x 4 patch grid, 3 parts)."""
    base = build_dataset(str(data), "train")
    ids = torch.randint(3, (len(base), 4, 4), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    save_checkpoint(path, {"method": "semmae-parts", "part_ids": ids, "grid": [4, 4], "num_parts": 3,
                           "paths": [base.path(i) for i in range(len(base))], "image_size": 32})
    return path


def write_figure(name, tmp_path, data, *extra):
    """Run the tiny run of script `name` (conftest.argv) with --vis on the folder `data` (None: synthetic data) in
    tmp_path; returns the PNG as an RGB tensor [3, H, W]."""
    from torchvision.transforms.v2.functional import pil_to_tensor
    module = importlib.import_module(name.split("-")[0])
    tmp_path.mkdir(exist_ok=True)
    parts = folder_parts_file(tmp_path / "parts.pt", data) if data else write_parts_file(tmp_path / "parts.pt")
    png = tmp_path / f"{name}.png"
    args = argv(name, tmp_path / name, parts, "--vis", str(png), *extra, data=str(data) if data else "synthetic")
    module.main(module.build_parser().parse_args(args))
    with Image.open(png) as img:
        return pil_to_tensor(img.convert("RGB"))


def first_column(img, rows, padding):
    """The colour [3] at the centre of the first panel of each row (square panels, under the label strip)."""
    pitch = (img.shape[1] - LABEL_HEIGHT - padding) // rows
    return [img[:, LABEL_HEIGHT + padding + r * pitch + pitch // 2, padding + pitch // 2].int() for r in range(rows)]


def named(colour):
    """(class, image in class) of the folder image whose colour is nearest."""
    return min(COLOUR, key=lambda key: sum(abs(a - int(b)) for a, b in zip(COLOUR[key], colour)))


# (script, rows, padding, PNG (width, height)): 8 px patches of 32 px images (40 px crops for Latent MIM, gap 2),
# under a strip of column labels LABEL_HEIGHT (16) px high
FIGURES = [("latent_mim", 4, 4, (4 + 3 * (5 * 40 + 4), 16 + 4 + 4 * (5 * 40 + 4))),  # 3 panels x5
           ("pcae", 6, 2, (2 + 6 * (3 * 32 + 2), 16 + 2 + 6 * (3 * 32 + 2))),  # --vis-images 6, 6 panels x3
           ("semmae", 4, 1, (1 + 5 * (4 * 32 + 1), 16 + 1 + 4 * (4 * 32 + 1))),  # image, parts, 3 masks x4
           ("semmae-parts", 8, 1, (1 + 4 * (4 * 32 + 1), 16 + 1 + 8 * (4 * 32 + 1)))]  # image, rec., parts, overlay x4


@pytest.mark.parametrize("name, rows, padding, size", FIGURES, ids=[f[0] for f in FIGURES])
def test_figure_is_wide_and_shows_the_sampled_classes(tmp_path, folder, name, rows, padding, size):
    """On a class-sorted folder (whose first 4 images are all of class 0): the rows show exactly the images that
    sample_across_classes picks, in its order, so all three classes; every row is at least 512 px wide."""
    img = write_figure(name, tmp_path, folder)
    assert (img.shape[2], img.shape[1]) == size and size[0] >= FIGURE_MIN_WIDTH
    base = build_dataset(str(folder), "train")
    picks = sample_across_classes(base, rows, seed=0)
    expected = [(base.samples[i][1], int(base.path(i)[-5])) for i in picks]  # (class, j) from .../class<c>/<j>.png
    shown = [named(colour) for colour in first_column(img, rows, padding)]
    assert shown == expected
    assert {c for c, _ in shown} == set(range(CLASSES))


@pytest.mark.parametrize("name, rows, padding, size", FIGURES, ids=[f[0] for f in FIGURES])
def test_figure_on_synthetic_data_is_wide_varied_and_deterministic(tmp_path, name, rows, padding, size):
    """The tiny synthetic run: the same size, images of `rows` different classes whose first panels differ, and the
    same PNG when written again with the same seed."""
    img = write_figure(name, tmp_path, None)
    assert (img.shape[2], img.shape[1]) == size
    labels = [SyntheticShapes(32, 48, 0).load(i)[1] for i in sample_across_classes(SyntheticShapes(32, 48, 0), rows, 0)]
    assert len(set(labels)) == rows  # 10 classes: one image of each of `rows` classes
    colours = [tuple(c.tolist()) for c in first_column(img, rows, padding)]
    assert len(set(colours)) == rows
    assert torch.equal(write_figure(name, tmp_path / "again", None), img)


def test_pcae_vis_greys_exactly_the_hidden_patches(tmp_path):
    """pcae --vis: per row, image | visible | teacher input | kept after blocks 0, 1, 2, each panel 32 px x3 (96 px,
    8 px patches -> 24 px squares) with 2 px padding, under the 16 px label strip; hidden patches are exactly grey
    (128)."""
    img = write_figure("pcae", tmp_path, None, "--vis-images", "2")
    assert img.shape == (3, 16 + 2 + 2 * 98, 2 + 6 * 98)
    shown = [4, 12, 6, 3, 1]  # visible, teacher input, kept after blocks 0, 1, 2 (of 16 patches)
    for row in range(2):
        for col, count in enumerate(shown, start=1):
            tile = img[:, 18 + row * 98:18 + row * 98 + 96, 2 + col * 98:2 + col * 98 + 96]
            patches = tile.unfold(1, 24, 24).unfold(2, 24, 24).reshape(3, 16, 24 * 24)
            grey = (patches == 128).all(dim=2).all(dim=0).sum().item()
            assert grey == 16 - count


# ------------------------------------------------------------------------------------------------- the helpers
def round_robin(labels, n, seed):
    """Reference: the shuffled order's first image of each class, then its second of each, ... (whole dataset)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    rank = {i: [labels[k] for k in order[:place]].count(labels[i]) for place, i in enumerate(order)}
    return [i for r in range(len(labels)) for i in order if rank[i] == r][:n]


def test_sample_across_classes_reads_no_image_of_a_folder(folder, monkeypatch):
    base = build_dataset(str(folder), "train")
    monkeypatch.setattr(base, "load", lambda i: pytest.fail("an image was read"))
    labels = [label for _, label in base.samples]  # [0] * 4 + [1] * 4 + [2] * 4
    for n in (1, 2, 3, 5, 6, 12, 20):
        picks = sample_across_classes(base, n, seed=3)
        assert picks == round_robin(labels, n, 3) and len(set(picks)) == min(n, 12)
        assert len({labels[i] for i in picks[:3]}) == min(n, 3)  # the first three rows: three classes
    assert sample_across_classes(base, 4, seed=3) == sample_across_classes(base, 4, seed=3)
    assert len({tuple(sample_across_classes(base, 4, seed)) for seed in range(5)}) > 1


def test_sample_across_classes_on_synthetic_data_stops_reading_early():
    """SyntheticShapes labels come from `load`: the same picks as the whole-dataset reference, reading only until
    they are settled (and all images when a class is missing)."""
    data = SyntheticShapes(size=8, length=200, seed=0)
    labels = [data.load(i)[1] for i in range(len(data))]
    reads = []
    data.load = lambda i, load=data.load: reads.append(i) or load(i)
    for n in (0, 1, 4, 10, 11, 25, 200):
        reads.clear()
        assert sample_across_classes(data, n, seed=1) == round_robin(labels, n, 1)
        assert len(reads) < len(data) or n == 200
    assert len(reads) == len(data)
    few = SyntheticShapes(size=8, length=5, seed=0)  # fewer images than classes
    assert sorted(sample_across_classes(few, 8, seed=0)) == list(range(5))


def test_save_figure_enlarges_by_repeating_pixels(tmp_path):
    tiles = torch.rand(6, 3, 10, 10)
    size = save_figure(tiles, tmp_path / "a" / "f.png", columns=3, padding=2)
    k = 17  # the least factor with 3 * (10k + 2) + 2 >= 512
    assert size == (2 + 3 * (10 * k + 2), 2 + 2 * (10 * k + 2)) and size[0] >= 512 > 2 + 3 * (10 * (k - 1) + 2)
    from torchvision.transforms.v2.functional import pil_to_tensor
    img = pil_to_tensor(Image.open(tmp_path / "a" / "f.png"))
    first = img[:, 2:2 + 10 * k, 2:2 + 10 * k]
    assert torch.equal(first, first[:, ::k, ::k].repeat_interleave(k, 1).repeat_interleave(k, 2))  # crisp blocks
    assert torch.equal(first[:, ::k, ::k], tiles[0].mul(255).add(0.5).clamp(0, 255).to(torch.uint8))
    assert save_figure(list(torch.rand(2, 3, 600, 600)), tmp_path / "g.png", columns=1, padding=2) == (604, 1206)


# ------------------------------------------------------------------------------------------- labels and outlines
COLUMNS = {"latent_mim": 3, "pcae": 6, "semmae": 5, "semmae-parts": 4}


@pytest.mark.parametrize("name, rows, padding, size", FIGURES, ids=[f[0] for f in FIGURES])
def test_figure_columns_are_labelled_in_the_png_and_in_the_printed_line(tmp_path, capsys, name, rows, padding, size):
    """Above every column the label strip has text (pixels unlike the background), between the columns none (a label
    is cut to its column); the printed line names as many columns as the figure has."""
    img = write_figure(name, tmp_path, None)
    columns, background = COLUMNS[name], img[:, 0, 0]
    assert (img[:, :LABEL_HEIGHT] == background[:, None, None]).all(0).sum() > 0.8 * LABEL_HEIGHT * size[0]
    pitch = (size[0] - padding) // columns
    for c in range(columns):
        strip = img[:, :LABEL_HEIGHT, padding + c * pitch:(c + 1) * pitch]  # over column c
        assert (strip != background[:, None, None]).any(0).sum() >= 20, (name, c)  # a word's worth of ink
        gap = img[:, :LABEL_HEIGHT, c * pitch:c * pitch + padding]  # over the padding left of column c
        assert (gap == background[:, None, None]).all()
    assert (img[:, LABEL_HEIGHT:LABEL_HEIGHT + padding] == background[:, None, None]).all()  # the grid's own padding
    lines = [line for line in capsys.readouterr().out.splitlines() if " columns: " in line]
    assert len(lines) == 1 and lines[0].startswith(f"wrote {tmp_path / f'{name}.png'} ({size[0]}x{size[1]} px), "
                                                   f"{rows} images; columns: ")
    assert len(lines[0].split(" columns: ", 1)[1].split(" | ")) == columns


def test_latent_mim_targets_keep_their_pixels_and_get_a_red_outline_outside_them(tmp_path):
    """The third panel (roles) shows every patch with its own pixels, as the jittered grid does: the targets are
    outlined in red in the gap around them (the whole 1-px ring, clipped to the crop), not tinted. The patch positions
    and roles are drawn again here as the model's `mask` draws them (offsets, then the visible set)."""
    from common import StepRandom, random_masking
    img = write_figure("latent_mim", tmp_path, None).int()
    k, pitch, cell = 5, 5 * 40 + 4, 8 + 2  # x5 enlargement of 40 px crops (4 x 4 cells of 8 + gap 2), 4 px padding
    rng = StepRandom(0, 0, torch.device("cpu"), slice(0, 4), 4)
    offsets = rng.randint(2, 16, 2)  # [4, 16, 2]
    visible = random_masking(rng.rand(16), 2)[0]  # [4, 2]
    red = torch.tensor([255, 26, 26])[:, None, None]  # (1.0, 0.1, 0.1) as the PNG stores it
    for row in range(4):
        top = LABEL_HEIGHT + 4 + row * pitch
        grid = img[:, top:top + 5 * 40:k, 4 + pitch:4 + pitch + 5 * 40:k]  # [3, 40, 40] at the crop's resolution
        roles = img[:, top:top + 5 * 40:k, 4 + 2 * pitch:4 + 2 * pitch + 5 * 40:k]
        outlined, patch = (roles == red).all(0), torch.zeros(40, 40, dtype=torch.bool)
        for j in range(16):
            y, x = (j // 4) * cell + int(offsets[row, j, 0]), (j % 4) * cell + int(offsets[row, j, 1])
            patch[y:y + 8, x:x + 8] = True
            if j not in visible[row].tolist():
                ring = torch.zeros(42, 42, dtype=torch.bool)  # one pixel of margin on each side of the crop
                ring[y:y + 10, x:x + 10] = True
                ring[y + 1:y + 9, x + 1:x + 9] = False
                assert outlined[ring[1:-1, 1:-1]].all(), (row, j)
        assert torch.equal(roles[:, patch], grid[:, patch])  # every patch as it is, targets too
        assert not (outlined & patch).any() and (roles[:, ~patch & ~outlined] == 0).all()  # the rest black


def test_outline_is_a_one_pixel_frame_clipped_to_the_panel():
    import latent_mim
    panel = torch.zeros(3, 5, 6)
    latent_mim.outline(panel, 1, 2, 3, torch.tensor([1.0, 0.0, 0.0]).view(3, 1))  # rows 1..3, columns 2..4
    expected = torch.zeros(5, 6)
    expected[1, 2:5] = expected[3, 2:5] = expected[1:4, 2] = expected[1:4, 4] = 1
    assert torch.equal(panel[0], expected) and not panel[1:].any()
    panel = torch.zeros(3, 5, 6)
    latent_mim.outline(panel, -1, -1, 3, torch.ones(3, 1))  # rows / columns -1..1: only row 1 and column 1 are in
    expected = torch.zeros(5, 6)
    expected[1, 0:2] = expected[0:2, 1] = 1
    assert torch.equal(panel[0], expected)
