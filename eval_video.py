"""DAVIS-2017 semi-supervised video object segmentation with a frozen encoder: the first frame's masks are carried
to every later frame by label propagation between patch features, the protocol of DINO's
eval_video_segmentation.py, and scored with the DAVIS-2017 toolkit's J (region IoU) and F (boundary F-measure).

    python eval_video.py --ckpt runs/latent_mim/checkpoint.pth --data /data/DAVIS        # DAVIS-2017 val, 480p
    python eval_video.py --make-synthetic /tmp/davis-synthetic                              # a small DAVIS-format set
    python eval_video.py --ckpt CKPT --data /tmp/davis-synthetic --short-side 64

Propagation (DINO): frames resized so the short side is 480 px and the long side DINO's multiple of 64; patch tokens
after the encoder's final norm (cls dropped), L2-normalised. For each frame t, the context is frame 0 (its
ground-truth masks) and the n last frames (their soft propagated masks, a queue); every target patch keeps the top-k
most similar context patches (jointly over the context frames) within a (2r+1) x (2r+1) patch window, weighted by
softmax(cos / T); the masks are upsampled bilinearly by the patch size, each label channel min-max normalised,
argmax, and resized (nearest) to the annotation's size. Scoring (toolkit, semi-supervised): every object of the first
annotation, every frame except the first and the last; J_m and F_m = means over all objects of all videos of each
object's mean over its frames; J&F_m = (J_m + F_m) / 2. A copy-first baseline (frame 0's masks on every frame) is
scored alongside. Results: one JSON line per video and a summary line in probe.jsonl next to the checkpoint.
"""
import math, time
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cli import ArgumentParser, UserError, check_device, run_main
from common import read_image
from eval_utils import append_rows, load_vit, output_path
from train_utils import pick_device

# DINO's colour normalisation for this protocol (eval_video_segmentation.py): ImageNet's mean and std, except that
# its red std is 0.228 (ImageNet's is 0.229); kept as DINO has it, since the papers' numbers come from that script.
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)
SIZE_MULTIPLE = 64  # DINO rounds the long side down to a multiple of 64 px (a multiple of patch 8 and 16)
VOID_LABEL = 255  # the toolkit's void label; the semi-supervised evaluation counts it as background


# ----------------------------------------------------------------------------------------------------- scoring
def region_j(pred, gt, void=None):
    """Toolkit db_eval_iou: J = |pred & gt & ~void| / |(pred | gt) & ~void| per mask; J = 1 when that union is empty
    (both masks empty). pred, gt, void [..., H, W] bool -> [...] float64."""
    keep = torch.ones_like(gt) if void is None else ~void
    inter = (pred & gt & keep).sum((-2, -1)).double()
    union = ((pred | gt) & keep).sum((-2, -1)).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def seg2bmap(seg):
    """Toolkit _seg2bmap: 1-pixel-wide boundaries, half a pixel towards the origin: pixel (y, x) is on the boundary
    when it differs from its east, south or south-east neighbour (zero outside the image); on the last row only the
    east neighbour counts, on the last column only the south one, and the bottom-right pixel is never a boundary.
    seg [..., H, W] bool -> [..., H, W] bool."""
    east, south, south_east = torch.zeros_like(seg), torch.zeros_like(seg), torch.zeros_like(seg)
    east[..., :, :-1], south[..., :-1, :] = seg[..., :, 1:], seg[..., 1:, :]
    south_east[..., :-1, :-1] = seg[..., 1:, 1:]
    b = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    b[..., -1, :] = seg[..., -1, :] ^ east[..., -1, :]
    b[..., :, -1] = seg[..., :, -1] ^ south[..., :, -1]
    b[..., -1, -1] = False
    return b


def disk(radius):
    """The disk structuring element of the toolkit (skimage.morphology.disk): [2r+1, 2r+1], (dy, dx) with
    dy^2 + dx^2 <= r^2."""
    d = torch.arange(-radius, radius + 1)
    return d[:, None] ** 2 + d[None, :] ** 2 <= radius ** 2


def dilate(masks, radius):
    """Binary dilation by disk(radius), as the toolkit's cv2.dilate (centred anchor, pixels outside the image do not
    count): a pixel is set when any set pixel lies within the disk around it. masks [N, H, W] bool -> bool.
    A convolution of the 0/1 map with the disk counts those pixels (float32 sums of at most (2r+1)^2 ones: exact)."""
    kernel = disk(radius).float()[None, None].to(masks.device)
    return F.conv2d(masks[:, None].float(), kernel, padding=radius)[:, 0] > 0.5


def boundary_radius(shape, bound_th=0.008):
    """Toolkit f_measure's tolerance: bound_th pixels when bound_th >= 1, else ceil(bound_th * image diagonal)
    (ceil(0.008 * |(480, 854)|) = ceil(7.84) = 8 px for DAVIS 480p)."""
    return int(bound_th) if bound_th >= 1 else math.ceil(bound_th * math.hypot(*shape))


def boundary_f(pred, gt, void=None, bound_th=0.008):
    """Toolkit f_measure per mask. With B(m) = seg2bmap(m & ~void) and D the dilation by disk(boundary_radius):
        precision P = |B(pred) & D(B(gt))| / |B(pred)|,  recall R = |B(gt) & D(B(pred))| / |B(gt)|,
        F = 2 P R / (P + R)  (F = 0 when P + R = 0);
    empty boundaries: none in pred only -> P = 1, R = 0 (F = 0); none in gt only -> P = 0, R = 1 (F = 0); neither ->
    P = R = 1 (F = 1). pred, gt, void [N, H, W] bool -> [N] float64."""
    keep = torch.ones_like(gt) if void is None else ~void
    radius = boundary_radius(gt.shape[-2:], bound_th)
    fg, gb = seg2bmap(pred & keep), seg2bmap(gt & keep)
    n_fg, n_gt = fg.sum((-2, -1)).double(), gb.sum((-2, -1)).double()
    fg_match = (fg & dilate(gb, radius)).sum((-2, -1)).double()
    gt_match = (gb & dilate(fg, radius)).sum((-2, -1)).double()
    # an empty boundary scores 1 on its own side; the other side's ratio is then 0 / n by itself (nothing to match)
    precision = torch.where(n_fg > 0, fg_match / n_fg.clamp(min=1), torch.ones_like(n_fg))
    recall = torch.where(n_gt > 0, gt_match / n_gt.clamp(min=1), torch.ones_like(n_gt))
    total = precision + recall
    return torch.where(total > 0, 2 * precision * recall / total.clamp(min=1e-300), torch.zeros_like(total))


def score_video(pred, gt, num_objects):
    """Toolkit semi-supervised scores of one video: objects 1..num_objects (the first annotation's largest label), on
    frames 1..T-2 (the first, given, and the last frame are not scored); void pixels count as background (the
    toolkit passes no void mask in this task). pred, gt [T, H, W] labels -> J, F [num_objects, T-2] float64."""
    objects = torch.arange(1, num_objects + 1, device=gt.device)[:, None, None]
    js, fs = [], []
    for t in range(1, gt.shape[0] - 1):
        p, g = pred[t][None] == objects, gt[t][None] == objects  # [O, H, W]
        js.append(region_j(p, g))
        fs.append(boundary_f(p, g))
    return torch.stack(js, 1).cpu(), torch.stack(fs, 1).cpu()


# ---------------------------------------------------------------------------------------- frames and features
def dino_frame_size(height, width, short_side=480, patch_size=16):
    """DINO's read_frame: the short side becomes short_side, the long side short_side x aspect rounded down to a
    multiple of 64 (854 x 480 -> 832 x 480). Both are then rounded down to a multiple of the patch size (no change
    for patches 8 and 16 at 480 px; ViT-H/14 gets 476 x 826). -> (th, tw)."""
    short, long = min(height, width), max(height, width)
    new_long = int(short_side * long / short // SIZE_MULTIPLE * SIZE_MULTIPLE)
    th, tw = (short_side, new_long) if height <= width else (new_long, short_side)
    th, tw = th // patch_size * patch_size, tw // patch_size * patch_size
    if th < patch_size or tw < patch_size:
        raise UserError(f"--short-side {short_side} makes a {height}x{width} frame smaller than one {patch_size} px "
                        f"patch (the long side is rounded down to a multiple of {SIZE_MULTIPLE}); use a larger one")
    return th, tw


def resize_labels(labels, size):
    """Nearest-neighbour resize of a label map [H, W] -> size, pixel centres mapped (source index floor((i + 0.5) x
    in / out)), the rule of PIL's NEAREST that DINO uses (ties on exact half-pixels may fall the other way)."""
    return F.interpolate(labels[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()


def frame_tensor(img, size):
    """PIL RGB frame -> [3, th, tw], bilinear resize (as DINO's cv2.resize, no antialiasing), DINO's normalisation.
    (DINO resizes the 8-bit image and rounds; we resize the values in float.)"""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=False)[0]
    return (x - torch.tensor(DINO_MEAN).view(3, 1, 1)) / torch.tensor(DINO_STD).view(3, 1, 1)


def interpolate_pos_embed(pos_embed, grid):
    """DINO's interpolate_pos_encoding: the position table [1, 1+g*g, D] of the checkpoint, its patch part resized
    bicubically (align_corners False) to grid (h, w) with scale factors (h + 0.1) / g and (w + 0.1) / g (DINO's
    +0.1 guards the output size against rounding; the factors also set the sampling positions), the cls row kept.
    This works for every checkpoint, fixed sin-cos (MAE, this project) or learned (DINO, iBOT), and is what the
    papers' numbers were measured with; a sin-cos table regenerated on the new grid would place the patches at
    positions 0..w-1 that the encoder never saw in training. -> [1, 1+h*w, D]."""
    g = math.isqrt(pos_embed.shape[1] - 1)
    if g * g != pos_embed.shape[1] - 1:
        raise UserError(f"the encoder's position table has {pos_embed.shape[1] - 1} patch rows, not a square grid")
    if tuple(grid) == (g, g):
        return pos_embed
    table = pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # [1, D, g, g]
    table = F.interpolate(table, scale_factor=((grid[0] + 0.1) / g, (grid[1] + 0.1) / g), mode="bicubic",
                          align_corners=False)
    assert tuple(table.shape[-2:]) == tuple(grid), (table.shape, grid)
    return torch.cat([pos_embed[:, :1], table.flatten(2).transpose(1, 2)], dim=1)


@torch.no_grad()
def patch_features(vit, frame):
    """DINO's extract_feature: frame [3, th, tw] -> [h*w, D] patch tokens after the last block and the final norm
    (get_intermediate_layers(n=1)), cls dropped, at the frame's own grid (position table interpolated)."""
    p = vit.patch_size
    grid = (frame.shape[-2] // p, frame.shape[-1] // p)
    pos = interpolate_pos_embed(vit.pos_embed, grid)  # [1, 1+h*w, D]
    x = vit.patch_tokens(frame[None]) + pos[:, 1:].to(frame.dtype)  # [1, h*w, D]
    x = vit.prepend_cls(x)  # + cls token and its position row, which interpolation leaves as it is
    return vit.norm(vit.forward_blocks(x))[0, 1:]


# ------------------------------------------------------------------------------------------- label propagation
def neighbourhood_mask(h, w, radius):
    """DINO's restrict_neighborhood: target patch (i, j) may take labels from source patch (i', j') when
    |i - i'| <= radius and |j - j'| <= radius. -> [h*w (target), h*w (source)] bool, row-major patches."""
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    return ((rows[:, None] - rows[None]).abs() <= radius) & ((cols[:, None] - cols[None]).abs() <= radius)


def propagate_labels(target, sources, source_segs, topk=5, temperature=0.1, allowed=None, chunk=2048):
    """DINO's label_propagation. target [L, D] and sources [n, L, D] L2-normalised features, source_segs [n, C, L]
    label distributions, allowed [L, L] (neighbourhood_mask) or None. For target patch i, over all n x L context
    patches j (jointly, not per frame):
        a_ij = exp(<f_i, f_j> / T) if j is in i's neighbourhood else 0;  keep a_ij >= the k-th largest a_i.;
        seg_i = sum_j a_ij seg_j / sum_j a_ij                                             -> [C, L]
    (ties with the k-th value are all kept, as DINO's `aff < min(topk)` zeroing). exp is taken after subtracting each
    target's largest similarity, which cancels in the normalisation and cannot overflow for small T."""
    n, L, _ = sources.shape
    src, segs = sources.reshape(n * L, -1), source_segs.permute(1, 0, 2).reshape(source_segs.shape[1], n * L)
    out = []
    for start in range(0, L, chunk):  # [b, n*L] blocks bound the memory of the affinity
        sim = target[start:start + chunk] @ src.T  # cosine similarities [b, n*L]
        ok = torch.ones_like(sim, dtype=torch.bool) if allowed is None else allowed[start:start + chunk].repeat(1, n)
        sim = sim.masked_fill(~ok, -math.inf)
        kth = sim.topk(min(topk, n * L), dim=1).values[:, -1:]  # [b, 1]
        keep = ok & (sim >= kth)  # with fewer than k allowed patches, kth is -inf: all allowed ones
        weight = torch.where(keep, ((sim - sim.amax(1, keepdim=True)) / temperature).exp(), torch.zeros_like(sim))
        out.append((weight / weight.sum(1, keepdim=True)) @ segs.T)  # [b, C]
    return torch.cat(out).T


def labels_from_scores(seg, patch_size, size):
    """DINO's last step: seg [C, h, w] -> bilinear upsampling by the patch size (align_corners False), each channel
    min-max normalised to [0, 1] when its maximum is positive (norm_mask), argmax over the channels, then the
    nearest resize to the annotation's size [H, W]. (A constant positive channel, which DINO divides by 0, stays 0.)"""
    up = F.interpolate(seg[None], scale_factor=patch_size, mode="bilinear", align_corners=False)[0]
    lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
    span = hi - lo
    up = torch.where(hi > 0, (up - lo) / torch.where(span > 0, span, torch.ones_like(span)), up)
    return resize_labels(up.argmax(0), size).to(torch.uint8)  # labels 0..255, as the PNGs


@torch.no_grad()
def segment_video(vit, frames, first_labels, num_objects, args, device):
    """Masks of every frame of a video from the first one (DINO's eval_video_tracking_davis). frames: the PIL RGB
    frames (an iterable, read one at a time), first_labels [H, W] long -> predicted labels [T, H, W] (frame 0 = the
    given annotation). The first annotation is resized (nearest) straight to the patch grid, one-hot; the queue keeps
    the features and soft masks of the n last frames (--n-last-frames 0: frame 0 only)."""
    height, width = first_labels.shape
    p, C = vit.patch_size, num_objects + 1
    th, tw = dino_frame_size(height, width, args.short_side, p)
    h, w = th // p, tw // p
    first_seg = F.one_hot(resize_labels(first_labels, (h, w)).flatten(), C).T.float().to(device)  # [C, h*w]
    allowed = neighbourhood_mask(h, w, args.size_mask_neighborhood).to(device) if args.size_mask_neighborhood > 0 \
        else None  # DINO: a radius of 0 means no restriction
    queue, first_feat, preds = deque(maxlen=args.n_last_frames), None, [first_labels.to(device, torch.uint8)]
    for t, img in enumerate(frames):
        feat = F.normalize(patch_features(vit, frame_tensor(img, (th, tw)).to(device)).float(), dim=1)  # [h*w, D]
        if t == 0:
            first_feat = feat
            continue
        ctx_feats = torch.stack([first_feat] + [f for f, _ in queue])  # [n, h*w, D]
        ctx_segs = torch.stack([first_seg] + [s for _, s in queue])  # [n, C, h*w]
        seg = propagate_labels(feat, ctx_feats, ctx_segs, args.topk, args.temperature, allowed)  # [C, h*w]
        queue.append((feat, seg))  # soft masks, not their argmax, as DINO
        preds.append(labels_from_scores(seg.view(C, h, w), p, (height, width)))
    return torch.stack(preds)


# ----------------------------------------------------------------------------------------------- DAVIS folder
def read_annotation(path):
    """Palette PNG -> (labels [H, W] long, palette list or None)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise UserError(f"{path} is not an indexed (palette) PNG mask (mode {img.mode})")
            return torch.from_numpy(np.array(img, dtype=np.int64)), img.getpalette()
    except OSError as e:
        raise UserError(f"unreadable annotation {path}: {' '.join(str(e).split())}") from None


def davis_videos(root, names=None):
    """The videos of a DAVIS-2017 folder: [(name, frame paths, annotation paths)], frames sorted by name (as the
    toolkit), each with the annotation of the same stem. names: a subset (default: ImageSets/2017/val.txt)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"DAVIS folder not found: {root}")
    for sub in ("JPEGImages/480p", "Annotations/480p"):
        if not (root / sub).is_dir():
            raise UserError(f"{root} has no {sub} folder (expected the DAVIS-2017 layout: JPEGImages/480p/<video>/"
                            f"*.jpg, Annotations/480p/<video>/*.png, ImageSets/2017/val.txt)")
    if not names:
        listing = root / "ImageSets/2017/val.txt"
        if not listing.is_file():
            raise UserError(f"{root} has no ImageSets/2017/val.txt (the list of val videos); pass --videos to choose")
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    videos = []
    for name in names:
        frames = sorted((root / "JPEGImages/480p" / name).glob("*.jpg"))
        if not frames:
            raise UserError(f"video {name}: no frames (*.jpg) in {root / 'JPEGImages/480p' / name}")
        if len(frames) < 3:
            raise UserError(f"video {name} has {len(frames)} frame(s); the first and last are not scored, so at least "
                            f"3 are needed")
        annotations = [root / "Annotations/480p" / name / f"{f.stem}.png" for f in frames]
        if not annotations[0].is_file():
            raise UserError(f"video {name}: no first-frame annotation ({annotations[0]})")
        missing = [a.name for a in annotations if not a.is_file()]
        if missing:
            raise UserError(f"video {name}: {len(missing)} frame(s) without an annotation to score against (first: "
                            f"{missing[0]})")
        videos.append((name, frames, annotations))
    return videos


def davis_palette():
    """The DAVIS / PASCAL VOC palette: bits 0, 3, 6 of index i give red's bits 7, 6, 5 (bits 1, 4, 7: green's; 2, 5:
    blue's), so 1 = dark red (128, 0, 0), 2 = dark green, 3 = olive. -> [r0, g0, b0, r1, ...]."""
    bits = lambda i, c: sum(((i >> (3 * s + c)) & 1) << (7 - s) for s in range(8))  # noqa: E731
    return [bits(i, c) for i in range(256) for c in range(3)]


def save_mask(labels, path, palette):
    img = Image.fromarray(labels.to(torch.uint8).cpu().numpy())
    img.putpalette(palette or davis_palette())  # an 8-bit image with a palette is saved as an indexed PNG
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def write_synthetic_davis(root, videos=2, objects=2, frames=10, size=(64, 128), seed=0):
    """A DAVIS-2017-format folder of synthetic videos, a pure function of the arguments: `objects` textured shapes
    (disks and squares, 12-19 % of the frame height in radius, a random colour and stripe texture each), side by side
    in frame 0, cross a textured background (smooth colour noise under low-contrast stripes) in straight lines at 4-6 %
    of the frame width per frame, bouncing off the borders, later objects in front. JPEG frames, palette PNG
    annotations (DAVIS palette, object k = index k), ImageSets/2017/val.txt. Each object moves by more than its own
    size within a few frames, so copying the first frame's masks loses it. Returns the video names."""
    root, (H, W) = Path(root), size
    gen = torch.Generator().manual_seed(seed)
    u = lambda lo, hi, n=(): lo + (hi - lo) * torch.rand(n, generator=gen)  # noqa: E731
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    def stripes(dy, dx, angle, period):
        return torch.sin(2 * math.pi * (dx * angle.cos() + dy * angle.sin()) / period)
    names = [f"synthetic-{v:02d}" for v in range(videos)]
    for name in names:
        noise = torch.rand(1, 3, H // 16 + 2, W // 16 + 2, generator=gen)
        noise = F.interpolate(noise, size=(H, W), mode="bicubic", align_corners=False)[0].clamp(0, 1)
        background = 0.15 + 0.7 * noise + 0.08 * stripes(ys, xs, u(0, math.pi), u(4, 9))
        things = []
        for k in range(objects):
            r, direction = float(u(0.12, 0.19)) * H, u(0, 2 * math.pi)
            things.append(dict(r=r, pos=torch.stack([u(r, H - r), torch.tensor((k + 0.5) * W / objects)]),
                               vel=float(u(0.04, 0.06)) * W * torch.stack([direction.sin(), direction.cos()]),
                               colour=u(0, 1, 3), angle=u(0, math.pi), period=u(3, 6), square=k % 2 == 1))
        for t in range(frames):
            img, labels = background.clone(), torch.zeros(H, W, dtype=torch.uint8)
            for k, o in enumerate(things, start=1):
                dy, dx = ys - o["pos"][0], xs - o["pos"][1]
                inside = (dy.abs().maximum(dx.abs()) if o["square"] else (dy ** 2 + dx ** 2).sqrt()) <= o["r"]
                texture = 0.75 + 0.25 * torch.sign(stripes(dy, dx, o["angle"], o["period"]))
                img, labels[inside] = torch.where(inside, o["colour"][:, None, None] * texture, img), k
                o["pos"] = o["pos"] + o["vel"]
                for axis, limit in ((0, H), (1, W)):  # bounce off the borders
                    if not o["r"] <= float(o["pos"][axis]) <= limit - o["r"]:
                        o["vel"][axis] = -o["vel"][axis]
                        o["pos"][axis] = o["pos"][axis].clamp(o["r"], limit - o["r"])
            img = ((img + 0.03 * torch.randn(3, H, W, generator=gen)).clamp(0, 1) * 255).round().to(torch.uint8)
            (root / "JPEGImages/480p" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / f"JPEGImages/480p/{name}/{t:05d}.jpg", quality=95)
            save_mask(labels, root / f"Annotations/480p/{name}/{t:05d}.png", davis_palette())
    (root / "ImageSets/2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/2017/val.txt").write_text("".join(n + "\n" for n in names))
    return names


# -------------------------------------------------------------------------------------------------------- main
def summary(js, fs):
    """Toolkit means, in percent: J_m, F_m over all objects (each object's mean over its frames), J&F_m their mean."""
    j_m, f_m = 100 * float(torch.cat(js).mean()), 100 * float(torch.cat(fs).mean())
    return {"J&F_m": (j_m + f_m) / 2, "J_m": j_m, "F_m": f_m}


def line(scores):  # the papers' format: percent, one decimal
    return "  ".join(f"{k} {scores[k]:.1f}" for k in ("J&F_m", "J_m", "F_m"))


def check_args(args):
    if args.n_last_frames < 0 or args.topk < 1 or args.size_mask_neighborhood < 0 or args.short_side < 1:
        raise UserError("--n-last-frames and --size-mask-neighborhood must be >= 0, --topk and --short-side >= 1")
    if not args.temperature > 0:  # also refuses nan
        raise UserError(f"--temperature must be positive, got {args.temperature}")
    check_device(args)


def evaluate_video(vit, name, frame_paths, ann_paths, args, device):
    """Propagation and the copy-first baseline on one video -> {kind: (J [objects], F [objects])}, each object's
    mean over the scored frames; the predicted masks go to --save-masks. Void labels count as background."""
    first, palette = read_annotation(ann_paths[0])
    first[first == VOID_LABEL] = 0
    num_objects = int(first.max())
    if num_objects == 0:
        raise UserError(f"video {name}: the first-frame annotation {ann_paths[0]} has no object")
    gt = [read_annotation(a)[0] for a in ann_paths]
    if any(g.shape != first.shape for g in gt):
        raise UserError(f"video {name}: the annotations do not all have the size of the first one")
    gt = torch.stack(gt).to(torch.uint8).to(device)  # [T, H, W]
    gt[gt == VOID_LABEL] = 0
    try:
        pred = segment_video(vit, (read_image(p) for p in frame_paths), first, num_objects, args, device)
    except OSError as e:  # read_image names the file
        raise UserError(str(e)) from None
    for labels, path in zip(pred, frame_paths) if args.save_masks else ():
        save_mask(labels, Path(args.save_masks) / name / f"{path.stem}.png", palette)
    scores = {kind: score_video(p, gt, num_objects) for kind, p in (("propagation", pred),
                                                                      ("copy_first", gt[:1].expand_as(gt)))}
    return {kind: (j.mean(1), f.mean(1)) for kind, (j, f) in scores.items()}


def main(args):
    if args.make_synthetic:
        names = write_synthetic_davis(args.make_synthetic, videos=args.synthetic_videos, seed=args.seed)
        print(f"wrote {len(names)} synthetic videos to {args.make_synthetic}", flush=True)
        return None
    if not args.ckpt or not args.data:
        raise UserError("--ckpt and --data are required (or --make-synthetic DIR)")
    check_args(args)
    videos = davis_videos(args.data, args.videos)
    device = pick_device(args.device)
    vit = load_vit(args.ckpt, num_heads=args.num_heads).requires_grad_(False).eval().to(device)
    out, t0 = output_path(args), time.perf_counter()
    base = {"eval": "davis2017", "ckpt": str(args.ckpt)}
    results = {"propagation": ([], []), "copy_first": ([], [])}  # per video: J [objects], F [objects]
    for name, frame_paths, ann_paths in videos:
        scores = evaluate_video(vit, name, frame_paths, ann_paths, args, device)
        row = {**base, "row": "video", "video": name, "frames": len(frame_paths),
               "objects": len(scores["propagation"][0])}
        for kind, (j, fm) in scores.items():
            results[kind][0].append(j)
            results[kind][1].append(fm)
            row[kind] = {"J": (100 * j).tolist(), "F": (100 * fm).tolist(), **summary([j], [fm])}
        append_rows(out, row)  # video by video: a stopped evaluation keeps the videos done
        print(f"{name}: {row['objects']} objects, {len(frame_paths)} frames: {line(row['propagation'])}  "
              f"(copy-first {row['copy_first']['J&F_m']:.1f})", flush=True)
    ours, copy = summary(*results["propagation"]), summary(*results["copy_first"])
    flags = {k: getattr(args, k) for k in ("n_last_frames", "topk", "size_mask_neighborhood", "temperature",
                                           "short_side")}
    position = getattr(vit, "checkpoint_position", {})
    row = {**base, "row": "summary", "ckpt_step": position.get("step"), "ckpt_epoch": position.get("epoch"),
           "data": str(args.data), "videos": len(videos), "objects": len(torch.cat(results["propagation"][0])),
           **ours, "copy_first": copy, **flags, "device": str(device), "time_s": time.perf_counter() - t0}
    append_rows(out, row)
    print(f"copy-first baseline: {line(copy)}", flush=True)
    print(f"davis {Path(args.ckpt).name} ({len(videos)} videos, {row['objects']} objects): {line(ours)}  -> {out}",
          flush=True)
    return row


def build_parser():
    p = ArgumentParser(prog="eval_video.py", description="DAVIS-2017 video object segmentation by label propagation "
                                                         "with a frozen ViT (DINO's protocol, the DAVIS toolkit's J&F)")
    a = p.add_argument
    a("--ckpt", default="", help="checkpoint of semmae.py / latent_mim.py / pcae.py, or a public MAE/DINO/iBOT/timm "
                                 "ViT")
    a("--data", default="", help="DAVIS-2017 folder (JPEGImages/480p, Annotations/480p, ImageSets/2017/val.txt)")
    a("--videos", nargs="+", default=None, help="evaluate these videos only (default: those of ImageSets/2017/val.txt)")
    a("--n-last-frames", type=int, default=7, help="context: frame 0 and the n last frames' soft masks (0: frame 0 "
                                                    "only)")
    a("--topk", type=int, default=5, help="context patches kept per target patch")
    a("--size-mask-neighborhood", type=int, default=12, help="radius r of the (2r+1)^2 patch window (0: no window)")
    a("--temperature", type=float, default=0.1, help="T of the weights exp(cos / T) (DINO fixes 0.1 in its code)")
    a("--short-side", type=int, default=480, help="frames resized to this short side (DINO: 480)")
    a("--num-heads", type=int, default=None, help="override the head count inferred for public checkpoints")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when there is a GPU")
    a("--output", default=None, help="JSON-lines results file (default: probe.jsonl next to the checkpoint)")
    a("--save-masks", default="", help="also write the predicted masks as palette PNGs to DIR/<video>/<frame>.png "
                                        "(default: not written)")
    a("--make-synthetic", default="", help="write a synthetic DAVIS-format folder to this path and exit")
    a("--synthetic-videos", type=int, default=2, help="videos of --make-synthetic")
    a("--seed", type=int, default=0, help="seed of --make-synthetic")
    return p


if __name__ == "__main__":
    run_main(main, build_parser())
