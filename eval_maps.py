"""Unsupervised part maps of a frozen encoder: each image's patch features are clustered into K groups and the patch
grid is coloured by group, next to the image. The Latent MIM paper shows segmentation maps obtained by clustering
patch features; this is that read-out, for any checkpoint that eval_utils.load_vit reads.

    python eval_maps.py --ckpt runs/latent_mim/checkpoint.pth --data synthetic --clusters 3 --out maps.png
    python eval_maps.py --ckpt mae_pretrain_vit_base.pth --data /imagenet --clusters 5 --images 8 --out maps.png

Features. x_l[i] is token i after block l (0 = cls, 1..N = patches) and LN_g,b the encoder's final LayerNorm with its
trained affine (g, b). A patch's feature is LN_g,b(x_l[i]), l = --layer (default: the last block), i.e. for the last
block exactly the encoder's output token (ViT.forward), which eval_probe's `mean` pool averages. Why after the norm:
LayerNorm removes each token's mean and scale, which drift with depth and are dominated by a few large residual
channels, so that what is clustered is the token's direction, which is also what the cosine of spherical k-means
compares. For an intermediate --layer the same final norm is applied (its per-token centring and
scaling matter here; its affine was trained for the last block's tokens). The cls token is not clustered.

Clustering (`spherical_kmeans`): k-means on the L2-normalised features, with k-means++ seeding (seeded by --seed) and
Lloyd iterations until no assignment changes or --iters. Each image's patches are clustered on their own, or, with
--per-dataset, all images' patches jointly, so that a colour means the same cluster in every row. Cluster numbers are
then renumbered by first appearance in raster order (the top-left patch is always the first colour), so that the
colours do not depend on the arbitrary numbering of k-means. Agglomerative clustering is not offered: k-means is the
read-out of such figures, and a second method would need its own tests for little gain.

Figure: one row per image (spread over the classes, common.sample_across_classes; eval transform), columns = the image,
its map (patch grid in the PALETTE colours), the map over the image (half and half); enlarged as the other figures.
"""
import torch
import torch.nn.functional as F

from cli import ArgumentParser, UserError, check_device, run_main
from common import build_dataset, eval_transform
from figures import denormalize, sample_across_classes, save_figure
from eval_utils import load_vit
from train_utils import pick_device

# Kelly's 22 colours of maximum contrast (Kelly 1965, as sRGB in the common tables) without white and black, in his
# order: the first colours are the most distinct from each other. --clusters is limited to their number.
PALETTE = torch.tensor([
    [0xF3, 0xC3, 0x00], [0x87, 0x56, 0x92], [0xF3, 0x84, 0x00], [0xA1, 0xCA, 0xF1], [0xBE, 0x00, 0x32],
    [0xC2, 0xB2, 0x80], [0x84, 0x84, 0x82], [0x00, 0x88, 0x56], [0xE6, 0x8F, 0xAC], [0x00, 0x67, 0xA5],
    [0xF9, 0x93, 0x79], [0x60, 0x4E, 0x97], [0xF6, 0xA6, 0x00], [0xB3, 0x44, 0x6C], [0xDC, 0xD3, 0x00],
    [0x88, 0x2D, 0x17], [0x8D, 0xB6, 0x00], [0x65, 0x45, 0x22], [0xE2, 0x58, 0x22], [0x2B, 0x3D, 0x26],
], dtype=torch.float32) / 255.0
OVERLAY_ALPHA = 0.5  # weight of the map in the overlay column


# ---------------------------------------------------------------------------------------------------- clustering
def kmeans_pp_init(x, k, generator):
    """k-means++ seeding (Arthur & Vassilvitskii 2007) of unit vectors x [N, D]: the first centre is a uniformly drawn
    point; each next one is point i drawn with probability

        P(i) = D(x_i)^2 / sum_j D(x_j)^2,   D(x) = min over the chosen centres c of ||x - c||_2

    -> centres [k, D]. When every point coincides with a chosen centre (sum D^2 = 0), there are fewer distinct points
    than k: ValueError, as a k-way clustering of them does not exist."""
    first = int(torch.randint(len(x), (), generator=generator))
    centres = [x[first]]
    d2 = (x - x[first]).pow(2).sum(1)  # [N]; exact zeros for copies of the centre (no matmul rounding)
    for _ in range(1, k):
        if not d2.sum() > 0:
            raise ValueError(f"k-means: {k} clusters but only {len(centres)} distinct points")
        nxt = int(torch.multinomial(d2, 1, generator=generator))
        centres.append(x[nxt])
        d2 = torch.minimum(d2, (x - x[nxt]).pow(2).sum(1))
    return torch.stack(centres)


def spherical_kmeans(x, k, seed=0, iters=100):
    """Spherical k-means of the rows of x [N, D] into k clusters -> (labels [N] long, centres [k, D] unit, iterations).
    With u_i = x_i / ||x_i||_2, minimises sum_i (1 - <u_i, c_a(i)>) over unit centres c by Lloyd's iterations:

        assign:  a(i) = argmax_j <u_i, c_j>          (ties: the lowest j)
        update:  c_j = sum_{a(i)=j} u_i / || sum_{a(i)=j} u_i ||_2

    from k-means++ centres (kmeans_pp_init, generator seeded by `seed`), until no assignment changes or `iters` updates.
    A cluster that loses all its points keeps its previous centre. Deterministic for a seed (CPU, fp32)."""
    if not 1 <= k <= len(x):
        raise ValueError(f"k-means: {k} clusters for {len(x)} points")
    u = F.normalize(x.detach().float().cpu(), dim=1)  # [N, D]
    centres = kmeans_pp_init(u, k, torch.Generator().manual_seed(seed))  # [k, D]
    labels, it = (u @ centres.T).argmax(1), 0  # [N]
    for it in range(1, iters + 1):
        sums = torch.zeros_like(centres).index_add_(0, labels, u)  # [k, D]
        counts = torch.bincount(labels, minlength=k)  # [k]
        centres = torch.where(counts[:, None] > 0, F.normalize(sums, dim=1), centres)
        new = (u @ centres.T).argmax(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels, centres, it


def renumber_by_first_appearance(labels):
    """Cluster numbers [...] -> the same partition numbered 0, 1, ... in the order the clusters first appear in the
    flattened (raster) order, e.g. [2, 2, 0, 1, 0] -> [0, 0, 1, 2, 1]."""
    flat = labels.reshape(-1)
    order = []
    for v in flat.tolist():
        if v not in order:
            order.append(v)
    lookup = torch.full((int(flat.max()) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(order)] = torch.arange(len(order))
    return lookup[flat].reshape(labels.shape)


# ------------------------------------------------------------------------------------------------------ features
@torch.no_grad()
def patch_features(vit, imgs, layer=None):
    """[B, 3, H, W] -> [B, N, D] fp32: LN_g,b(x_layer[i]) for the N patch tokens (see the module docstring; layer None:
    the last block). fp32 without autocast: a figure's few images cost little, and the maps then agree across
    devices up to float rounding."""
    x = vit.embed(imgs)  # [B, 1+N, D]
    for blk in vit.blocks[:layer]:
        x = blk(x)
    return vit.norm(x)[:, 1:].float()


def cluster_maps(feats, k, seed, iters, per_dataset=False):
    """feats [B, N, D] -> labels [B, N]: per image (each image's N patches) or, per_dataset, all B*N patches at once;
    renumbered by first appearance within each image, or over the images in order when per_dataset."""
    if per_dataset:
        labels = spherical_kmeans(feats.flatten(0, 1), k, seed, iters)[0].view(feats.shape[:2])
        return renumber_by_first_appearance(labels)
    return torch.stack([renumber_by_first_appearance(spherical_kmeans(f, k, seed, iters)[0]) for f in feats])


def colour_map(labels, patch_size):
    """Patch labels [h, w] -> RGB [3, h p, w p] in [0, 1]: every pixel of patch (r, c) in PALETTE[labels[r, c]]."""
    rgb = PALETTE[labels.long().cpu()].permute(2, 0, 1)  # [3, h, w]
    return rgb.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)


def figure_tiles(imgs, labels, grid, patch_size):
    """Images [B, 3, H, W] in [0, 1] and labels [B, N] -> [3B, 3, H, W]: per image the image, its map, the overlay."""
    tiles = []
    for img, lab in zip(imgs, labels):
        m = colour_map(lab.view(grid, grid), patch_size)
        tiles += [img, m, (1 - OVERLAY_ALPHA) * img + OVERLAY_ALPHA * m]
    return torch.stack(tiles)


# ----------------------------------------------------------------------------------------------------------- CLI
def check_args(args, vit):
    """One-line errors for flags that do not fit the encoder (run after it is loaded: the grid comes from it)."""
    patches = vit.num_patches * (args.images if args.per_dataset else 1)
    if args.clusters < 2:
        raise UserError(f"--clusters must be at least 2, got {args.clusters}")
    if args.clusters > len(PALETTE):
        raise UserError(f"--clusters must be at most {len(PALETTE)} (the colours of the palette), got {args.clusters}")
    if args.clusters > patches:
        raise UserError(f"--clusters {args.clusters} exceeds the {patches} patch features to cluster "
                        f"({vit.grid_size}x{vit.grid_size} per image{' x --images' if args.per_dataset else ''})")
    if args.images < 1 or args.iters < 1 or args.synthetic_size < 1:
        raise UserError("--images, --iters and --synthetic-size must be at least 1")
    depth = len(vit.blocks)
    if args.layer is not None and not 1 <= args.layer <= depth:
        raise UserError(f"--layer must be between 1 and the encoder's depth {depth}, got {args.layer}")
    check_device(args)


def main(args):
    vit = load_vit(args.ckpt, num_heads=args.num_heads)
    if vit.config["in_chans"] != 3:
        raise UserError(f"{args.ckpt}: the encoder takes {vit.config['in_chans']} input channels, images have 3")
    check_args(args, vit)
    device = pick_device(args.device)
    vit = vit.requires_grad_(False).eval().to(device)
    size, patch, grid = vit.config["img_size"], vit.patch_size, vit.grid_size
    base = build_dataset(args.data, args.split, size=size, length=args.synthetic_size, seed=args.seed)
    tf = eval_transform(size)
    try:
        imgs = torch.stack([tf(base.load(i)[0]) for i in sample_across_classes(base, args.images, args.seed)])
    except OSError as e:
        raise UserError(str(e)) from None
    feats = patch_features(vit, imgs.to(device), args.layer)  # [B, N, D]
    try:
        labels = cluster_maps(feats, args.clusters, args.seed, args.iters, args.per_dataset)  # [B, N]
    except ValueError as e:  # fewer distinct features than clusters (e.g. an image of one flat colour)
        raise UserError(f"{e}; use fewer --clusters{'' if args.per_dataset else ' or --per-dataset'}") from None
    width, height = save_figure(figure_tiles(denormalize(imgs), labels, grid, patch), args.out, columns=3, padding=2)
    layer = args.layer or len(vit.blocks)
    print(f"wrote {args.out} ({width}x{height} px), one row per image: image | its {grid}x{grid} patches in "
          f"{args.clusters} clusters of their features after block {layer} and the final norm "
          f"({'jointly over the images' if args.per_dataset else 'per image'}; colours by first appearance) | the map "
          f"over the image ({OVERLAY_ALPHA:.0%})", flush=True)
    return labels


def build_parser():
    p = ArgumentParser(prog="eval_maps.py", description="Unsupervised part maps: spherical k-means of a frozen "
                                                        "encoder's patch features, coloured next to the images")
    a = p.add_argument
    a("--ckpt", required=True, help="checkpoint of semmae.py / latent_mim.py / pcae.py, or a public ViT checkpoint")
    a("--data", required=True, help="folder with <split>/<class>/*, or 'synthetic'")
    a("--split", default="val", help="the split folder whose images are shown")
    a("--clusters", type=int, default=4, help=f"K, clusters per image (2..{len(PALETTE)})")
    a("--out", default="maps.png", help="the PNG to write")
    a("--images", type=int, default=6, help="rows: images spread over the classes")
    a("--seed", type=int, default=0, help="seed of the images' choice (and of --data synthetic) and of k-means++")
    a("--layer", type=int, default=None, help="cluster the tokens after this block (1..depth; default: the last)")
    a("--iters", type=int, default=100, help="at most this many k-means updates (it stops once nothing changes)")
    a("--per-dataset", action="store_true", help="cluster all images' patches jointly: a colour is one cluster in "
                                                 "every row")
    a("--num-heads", type=int, default=None, help="override the head count inferred for public checkpoints")
    a("--synthetic-size", type=int, default=2048, help="train images of --data synthetic (val: a quarter)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when there is a GPU")
    return p


if __name__ == "__main__":
    run_main(main, build_parser())
