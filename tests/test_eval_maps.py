"""eval_maps.py: spherical k-means on hand-made points (exact clusters, determinism, fewer distinct points than
clusters), the colouring of a known assignment pixel for pixel, the figure's size and content, one-line errors."""
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from common import build_vit
from train_utils import encoder_export, save_checkpoint
import eval_maps
from eval_maps import PALETTE, colour_map, kmeans_pp_init, renumber_by_first_appearance, spherical_kmeans

# Kelly's first two colours of maximum contrast (after white and black): vivid yellow #F3C300, strong purple #875692
YELLOW, PURPLE = (0xF3, 0xC3, 0x00), (0x87, 0x56, 0x92)


def three_bundles():
    """12 points in R^3 in three bundles around the axes e1, e2, e3, each point scaled by a different length (0.01 to
    100: spherical k-means must ignore the length) and tilted by less than 0.1 rad towards another axis. Their order
    interleaves the bundles; the true labels, numbered by first appearance, are EXPECTED."""
    axis = [0, 0, 1, 2, 1, 0, 2, 2, 1, 0, 1, 2]
    tilt = [0.05, -0.08, 0.02, 0.09, -0.03, 0.07, -0.06, 0.01, 0.08, -0.02, -0.09, 0.04]
    length = [1.0, 100.0, 0.01, 3.0, 50.0, 0.2, 7.0, 0.5, 20.0, 2.0, 0.03, 9.0]
    x = torch.zeros(12, 3)
    for i, (a, t, s) in enumerate(zip(axis, tilt, length)):
        x[i, a], x[i, (a + 1) % 3] = s, s * t
    return x, torch.tensor(axis)


EXPECTED = torch.tensor([0, 0, 1, 2, 1, 0, 2, 2, 1, 0, 1, 2])  # axis e1 first, then e2, then e3


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_recovers_well_separated_bundles_exactly(seed):
    x, axis = three_bundles()
    labels, centres, iterations = spherical_kmeans(x, 3, seed=seed)
    assert torch.equal(renumber_by_first_appearance(labels), EXPECTED)
    # centre j (k-means' own numbering) is the normalised sum of its members' unit vectors: within 0.1 rad of their axis
    for j in range(3):
        a = int(axis[labels == j][0])
        assert torch.allclose(centres[j].norm(), torch.tensor(1.0), atol=1e-6)
        assert centres[j][a] > 0.99
    assert 1 <= iterations <= 100


def test_kmeans_is_deterministic_for_a_seed():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))  # no clear clusters: init decides
    a, b = spherical_kmeans(x, 5, seed=3), spherical_kmeans(x, 5, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_kmeans_stops_when_nothing_changes():
    """Two exact points, each repeated: k-means++ must pick one of each (the second draw has probability 0 on copies
    of the first), the first assignment is final, so the first update already changes nothing."""
    x = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 2.0]] * 2)
    labels, centres, iterations = spherical_kmeans(x, 2, seed=0)
    assert torch.equal(renumber_by_first_appearance(labels), torch.tensor([0, 0, 0, 1, 1]))
    assert iterations == 1
    assert sorted(map(tuple, centres.tolist())) == [(0.0, 1.0), (1.0, 0.0)]


def test_more_clusters_than_distinct_points_is_an_error():
    x = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)  # 8 points, 2 distinct
    with pytest.raises(ValueError, match="3 clusters but only 2 distinct points"):
        spherical_kmeans(x, 3)
    with pytest.raises(ValueError, match="3 clusters but only 1 distinct points"):
        kmeans_pp_init(torch.tensor([[0.6, 0.8]] * 5), 3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="9 clusters for 8 points"):
        spherical_kmeans(x, 9)


def test_renumber_by_first_appearance():
    assert renumber_by_first_appearance(torch.tensor([2, 2, 0, 1, 0])).tolist() == [0, 0, 1, 2, 1]
    assert renumber_by_first_appearance(torch.tensor([[3, 1], [3, 0]])).tolist() == [[0, 1], [0, 2]]


def test_palette_image_of_a_known_assignment():
    """Labels [[0, 1], [1, 0]] with 8 px patches: a 16 x 16 checkerboard of 8 x 8 squares, yellow top-left."""
    img = colour_map(torch.tensor([[0, 1], [1, 0]]), 8)
    assert img.shape == (3, 16, 16)
    rgb = (img * 255).round().to(torch.uint8)
    yellow, purple = torch.tensor(YELLOW, dtype=torch.uint8), torch.tensor(PURPLE, dtype=torch.uint8)
    for r in range(16):
        for c in range(16):
            want = yellow if (r < 8) == (c < 8) else purple
            assert torch.equal(rgb[:, r, c], want), (r, c)
    assert len(PALETTE) == 20 and len(set(map(tuple, PALETTE.tolist()))) == 20  # 20 different colours


@pytest.fixture
def micro_ckpt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "random.pth"
    save_checkpoint(path, encoder_export(build_vit("micro", img_size=32), "random-init"))
    return path


def run(ckpt, out, *flags):
    args = eval_maps.build_parser().parse_args(["--ckpt", str(ckpt), "--data", "synthetic", "--synthetic-size", "64",
                                                "--out", str(out), "--device", "cpu", *flags])
    return eval_maps.main(args)


@pytest.mark.parametrize("per_dataset", [False, True])
def test_figure_size_and_map_column(tmp_path, micro_ckpt, per_dataset):
    """4 images of 32 px (4 x 4 patches of 8 px), 3 columns, 2 px padding: panels enlarged x6 (the smallest factor
    for a 512 px row: 3 x 32 x 6 + 4 x 2 = 584), so 2 + 3 (192 + 2) = 584 wide and 2 + 4 (192 + 2) = 778 high.
    The map column holds only the first K palette colours, in 48 x 48 squares, those of the returned labels; the
    overlay is the mean of image and map; the top-left patch of each row is the first colour (per image), or of the
    first row (per dataset)."""
    out = tmp_path / "maps.png"
    labels = run(micro_ckpt, out, "--clusters", "3", "--images", "4", *(["--per-dataset"] if per_dataset else []))
    with Image.open(out) as png:
        assert png.size == (584, 778)
        img = pil_to_tensor(png.convert("RGB")).permute(1, 2, 0)  # [H, W, 3] uint8
    allowed = {tuple((PALETTE[j] * 255).round().int().tolist()) for j in range(3)}
    for row in range(4):
        top, left = 2 + row * 194, 2 + 194  # the map panel of this row
        for pr in range(4):
            for pc in range(4):
                square = img[top + 48 * pr: top + 48 * (pr + 1), left + 48 * pc: left + 48 * (pc + 1)]
                colour = tuple(square[0, 0].tolist())
                assert colour in allowed and (square == square[0, 0]).all()
                assert colour == tuple((PALETTE[int(labels[row, 4 * pr + pc])] * 255).round().int().tolist())
                # the overlay panel (next column) is half image (first column) and half map, to 8-bit rounding
                y, x = top + 48 * pr + 5, left + 48 * pc + 7
                half = (img[y, x - 194].float() + img[y, x].float()) / 2
                assert (img[y, x + 194].float() - half).abs().max() <= 1.0
        if not per_dataset or row == 0:
            assert int(labels[row, 0]) == 0
    assert labels.shape == (4, 16) and set(labels.unique().tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("flags, message", [
    (["--clusters", "1"], "--clusters must be at least 2, got 1"),
    (["--clusters", "-3"], "--clusters must be at least 2, got -3"),
    (["--clusters", "21"], "--clusters must be at most 20 (the colours of the palette), got 21"),
    (["--clusters", "17"], "--clusters 17 exceeds the 16 patch features to cluster (4x4 per image)"),
    (["--layer", "5"], "--layer must be between 1 and the encoder's depth 4, got 5"),
    (["--images", "0"], "--images, --iters and --synthetic-size must be at least 1"),
])
def test_bad_flags_are_one_line_errors(tmp_path, micro_ckpt, flags, message):
    with pytest.raises(ValueError) as err:
        run(micro_ckpt, tmp_path / "maps.png", *flags)
    assert str(err.value) == message and "\n" not in str(err.value)
    assert not (tmp_path / "maps.png").exists()



def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path, micro_ckpt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine that has one
    with pytest.raises(ValueError) as err:
        run(micro_ckpt, tmp_path / "maps.png", "--device", "cuda")
    assert str(err.value) == "--device cuda but torch sees no CUDA GPU (use --device cpu or auto)"
    assert not (tmp_path / "maps.png").exists()


def test_per_dataset_allows_more_clusters_than_one_image_has_patches(tmp_path, micro_ckpt):
    labels = run(micro_ckpt, tmp_path / "maps.png", "--clusters", "17", "--images", "2", "--per-dataset")
    assert labels.shape == (2, 16) and int(labels[0, 0]) == 0 and int(labels.max()) <= 16
