"""SemMAE: Semantic-Guided Masking for Learning Masked Autoencoders (Li et al., NeurIPS 2022, arXiv 2206.10207).

Two stages, two sub-commands:
  A. `semmae.py parts --data DIR --teacher CKPT --out parts.pt`: semantic part learning on a frozen ViT teacher
     (never released by the authors; this is our reconstruction of the paper's Fig. 2 (A)), then one part id per
     patch of every training image, written to one file.
  B. `semmae.py pretrain --data DIR --parts parts.pt`: MAE whose mask follows the parts: early in training a portion
     of every part is masked (intra-part patterns), late in training whole parts (inter-part relations).
Official stage-B code: github.com/ucasligang/SemMAE (models_mae_setting3.py, engine_pretrain_setting3.py).
"""
import math, sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import (ArgumentParser, UserError, add_bench_args, add_common_args, add_decoder_args, check_common_args,
                 run_main)
from common import (IMAGENET_MEAN, IMAGENET_STD, VIT_PRESETS, MAEDecoder, SeededDataset, StepRandom, build_adamw,
                    build_dataset, build_vit, gather_tokens, image_transform, make_loader, patchify, preset_patch_size,
                    pretrain_transform, random_masking, set_lr, standardize_tokens)
from eval_utils import load_vit
from figures import denormalize, figure_line, sample_across_classes, save_figure
from train_utils import TrainRun, autocast, gather_rows, load_checkpoint, pick_device, save_checkpoint


# ====================================== stage A: semantic part learning (paper: Semantic Part Learning, Fig. 2 (A))
def reconstruction_loss(imgs, recon):
    """L_rec(I, I^) = 1/HW sum_{i,j} (I(i,j) - I^(i,j))^2   (also averaged over channels and images)."""
    return F.mse_loss(recon.float(), imgs.float())


def diversity_loss(maps):
    """L_div(M) = 1/N^2 ( sum_{i!=j} (0 - m_i m_j^T / (|m_i|_2 |m_j|_2))^2
                        + sum_{i=j} (1 - m_i m_j^T / (|m_i|_2 |m_j|_2))^2 )
    maps [B, N, HW] -> L_div of each image, averaged over the batch."""
    n = maps.shape[1]
    m = F.normalize(maps.float(), dim=-1, eps=1e-12)  # m_i / |m_i|_2  [B, N, HW]
    cos = m @ m.transpose(1, 2)  # [B, N, N]
    target = torch.eye(n, device=maps.device)  # 1 where i = j, 0 where i != j
    return ((target - cos) ** 2).sum((1, 2)).mean() / n ** 2


def part_objective(l_rec, l_div, div_weight):
    """L = L_rec(I, I^) + lambda L_div(M)"""
    return l_rec + div_weight * l_div


class AdaIN(nn.Module):
    """StyleGAN's AdaIN(x, w) = (1 + gamma(w)) (x - mu(x)) / sigma(x) + beta(w) per channel; w: style from the cls."""
    def __init__(self, channels, style_dim):
        super().__init__()
        self.affine = nn.Linear(style_dim, 2 * channels)

    def forward(self, x, w):  # x [B, C, H, W], w [B, S]
        gamma, beta = self.affine(w)[:, :, None, None].chunk(2, dim=1)
        return (1 + gamma) * F.instance_norm(x, eps=1e-5) + beta


class StyledConv(nn.Module):
    """(x2 bilinear upsample) -> conv 3x3 -> AdaIN -> LeakyReLU(0.2): one StyleGAN synthesis layer."""
    def __init__(self, c_in, c_out, style_dim, up):
        super().__init__()
        self.up, self.conv, self.adain = up, nn.Conv2d(c_in, c_out, 3, padding=1), AdaIN(c_out, style_dim)

    def forward(self, x, w):
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return F.leaky_relu(self.adain(self.conv(x), w), 0.2)


class PartLearner(nn.Module):
    """Frozen ViT teacher -> N part tokens from its cls token -> N attention maps over the patches, blurred ->
    StyleGAN-like decoder styled by the cls token reconstructs the image from the maps alone, so the maps must carry
    the image's layout and diversity spreads it over N distinct parts."""
    def __init__(self, teacher, num_parts=6, channels=256, div_weight=1.0):
        super().__init__()
        if not 2 <= num_parts <= 255 or channels < 1 or not div_weight >= 0:
            raise ValueError(f"--num-parts must be in 2..255 (part ids are stored as uint8), --dec-channels at least 1 "
                             f"and --div-weight non-negative, got {num_parts}, {channels}, {div_weight}")
        self.teacher = teacher.requires_grad_(False).eval()  # frozen: no gradient, no DDP sync
        dim, self.num_parts, self.div_weight = teacher.embed_dim, num_parts, div_weight
        self.grid, self.img_size = teacher.grid_size, teacher.config["img_size"]
        self.part_tokens = nn.Linear(dim, num_parts * dim)  # cls [D] -> N part tokens [N, D]
        self.mapping = nn.Sequential(nn.Linear(dim, channels), nn.LeakyReLU(0.2), nn.Linear(channels, channels))
        n_up = max(math.ceil(math.log2(self.img_size / self.grid)), 0)  # x2 per block up to the image size
        ch = [max(channels >> i, 32) for i in range(n_up + 1)]
        self.synthesis = nn.ModuleList([StyledConv(num_parts, ch[0], channels, up=False)] +
                                       [StyledConv(ch[i], ch[i + 1], channels, up=True) for i in range(n_up)])
        self.to_rgb = nn.Conv2d(ch[-1], 3, 1)
        self.register_buffer("blur", (torch.tensor([1.0, 2.0, 1.0]).outer(torch.tensor([1.0, 2.0, 1.0])) / 16)
                             .expand(num_parts, 1, 3, 3).clone(), persistent=False)  # fixed 3x3 Gaussian, sigma ~0.85

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # the teacher stays in inference mode
        return self

    def maps(self, imgs):
        """imgs [B, 3, H, W] -> (cls [B, D], blurred part maps [B, N, h, w], always float32)."""
        with torch.no_grad():
            tokens = self.teacher(imgs)  # [B, 1+L, D] after the final norm (bf16 under autocast: the costly part)
        # The head (part tokens, dot products, softmax, blur) runs in fp32 even under autocast: the part ids are the
        # argmax of these maps, and bf16 (8-bit mantissa) turns near ties into exact ties, which argmax resolves to
        # the lowest part index. The head is a tiny fraction of the teacher's FLOPs.
        with torch.autocast(imgs.device.type, enabled=False):
            tokens = tokens.float()
            cls, patches = tokens[:, 0], tokens[:, 1:]
            b, _, d = tokens.shape
            parts = self.part_tokens(cls).view(b, self.num_parts, d)  # [B, N, D]
            attn = (parts @ patches.transpose(1, 2) / math.sqrt(d)).softmax(dim=1)  # softmax over the N parts [B, N, L]
            attn = attn.view(b, self.num_parts, self.grid, self.grid)
            # replicate padding: every patch is a weighted mean of its neighbours, the parts still sum to 1 everywhere
            attn = F.pad(attn, (1, 1, 1, 1), mode="replicate")
            return cls, F.conv2d(attn, self.blur, groups=self.num_parts)

    def decode(self, maps, cls):
        """N-channel maps [B, N, h, w] + style from cls -> image [B, 3, H, W] (normalised space)."""
        w, x = self.mapping(cls), maps
        for layer in self.synthesis:
            x = layer(x, w)
        x = self.to_rgb(x)
        if x.shape[-1] != self.img_size:  # patch sizes that are not powers of 2 (ViT-H/14)
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return x

    def forward(self, imgs, rng=None):  # no model-side randomness in stage A
        cls, maps = self.maps(imgs)
        recon = self.decode(maps, cls)
        l_rec, l_div = reconstruction_loss(imgs, recon), diversity_loss(maps.flatten(2))
        return part_objective(l_rec, l_div, self.div_weight), {"l_rec": l_rec.detach(), "l_div": l_div.detach()}


# =============================== stage B: semantic-guided masking (paper: Semantic-Guided Masking, Fig. 2 (B))
def alpha_schedule(epoch, total_epochs, gamma=2.0):
    """alpha = (t / T)^gamma with t = epoch + 1 (epoch counted from 0) and T the run's total epochs."""
    return min(max((epoch + 1) / total_epochs, 0.0), 1.0) ** gamma


def setting2_budget(num_patches, mask_ratio):
    """floor(r L), the patches setting 2 masks, computed as the official code does (models_mae_setting3.py,
    random_masking_setting3): the Python double L * r enters a float32 tensor expression (torch's default dtype) with
    the integer part sizes and is truncated by .to(torch.long). So the double is rounded to float32 first:
    L = 196, r = 0.9 -> 176 (176.4); L = 100, r = 0.29 -> 29, where floor of the double 28.999999999999996 gives 28.
    num_patches: int -> int, or an integer tensor -> long tensor."""
    budget = (torch.as_tensor(num_patches).double() * mask_ratio).float().floor().long()
    return budget if torch.is_tensor(num_patches) else int(budget)


def part_mask_counts(part_sizes, mask_ratio, alpha, rng, budget=None):
    """Masked patches per part; part_sizes a [B, K] -> n [B, K] (long). With r the mask ratio and L = sum_k a_k:
      setting 1 (a portion of every part):  n1_k = round(r a_k)
      setting 2 (whole parts, visited in random order):  n2_k = min(a_k, max(0, floor(r L) - sum_{j before k} a_j))
      blend:  n_k = round((1 - alpha) n1_k + alpha n2_k)
    floor(r L) is setting2_budget(L, r); `budget` (an int) passes it precomputed when every image has the same L.
    rng: the step's StepRandom (the visiting order). sum_k n_k need not equal the int(L (1 - r)) visible count:
    semantic_guided_masking tops up or trims afterwards."""
    a = part_sizes.long()
    if budget is None:
        budget = setting2_budget(a.sum(1, keepdim=True), mask_ratio)  # [B, 1]
    order = rng.rand(a.shape[1]).argsort(dim=1)  # random visiting order of the parts [B, K]
    a_ord = a.gather(1, order)
    before = a_ord.cumsum(1) - a_ord  # patches of the parts visited earlier
    n2 = torch.zeros_like(a).scatter(1, order, (budget - before).clamp(min=0).minimum(a_ord))  # back to part order
    n1 = torch.round(mask_ratio * a)  # torch.round: half to even, as the official code
    return torch.round((1 - alpha) * n1 + alpha * n2).long()


def semantic_guided_masking(part_ids, mask_ratio, alpha, rng, num_parts=None, budget=None):
    """Official algorithm, batched with fixed shapes (no host sync when num_parts is given):
    1. random permutation of the patches; 2.-4. n_k per part (part_mask_counts, setting 2 with the official budget
    floor(r L)); 5. mask the first n_k shuffled patches of each part, then keep exactly V = int(L (1 - r)) visible, as
    the official len_keep: the unmasked ones first, each group in the shuffled order (so a surplus is trimmed from the
    end, a shortfall topped up from the start of the masked ones). floor(r L) + V is L - 1, not L, whenever r L is
    not an integer (r = 0.9, L = 196: 176 + 19), so then even alpha = 1 masks one patch more than setting 2 counts.
    rng: the step's StepRandom (permutation, then visiting order). budget: setting2_budget(L, r) precomputed (SemMAE
    does, so that a compiled forward builds no host tensor).
    part_ids [B, L] integer -> (vis_ids [B, V], mask_ids [B, L - V])."""
    b, n_patches = part_ids.shape
    k = num_parts if num_parts is not None else int(part_ids.max()) + 1
    visible = int(n_patches * (1 - mask_ratio))
    perm = rng.rand(n_patches).argsort(dim=1)  # 1. [B, L]
    ids = part_ids.long().gather(1, perm)  # part of each shuffled patch [B, L]
    # one-hot by scatter: F.one_hot would check the id range (a host sync on some devices)
    onehot = torch.zeros(b, n_patches, k, dtype=torch.int32, device=ids.device).scatter_(2, ids[..., None], 1)
    budget = setting2_budget(n_patches, mask_ratio) if budget is None else budget  # floor(r L), a Python int
    n = part_mask_counts(onehot.sum(1), mask_ratio, alpha, rng, budget=budget)  # [B, K]
    rank = onehot.cumsum(1).gather(2, ids[..., None])[..., 0]  # 1-based rank inside its part, shuffled order [B, L]
    masked = rank <= n.gather(1, ids)  # 5. the first n_k shuffled patches of part k
    key = masked.long() * n_patches + torch.arange(n_patches, device=part_ids.device)  # unique keys
    order = perm.gather(1, key.argsort(dim=1))  # [B, L] original patch ids: visible first
    return order[:, :visible], order[:, visible:]


class SemMAE(nn.Module):
    """MAE (encoder on the visible patches + cls, 8 x 512 decoder, norm_pix_loss on the masked patches) whose mask
    comes from semantic_guided_masking, or from random_masking without part ids (`--masking random`: plain MAE)."""
    def __init__(self, encoder, num_parts=6, mask_ratio=0.75, decoder_dim=512, decoder_depth=8, decoder_heads=16,
                 norm_pix_loss=True):
        super().__init__()
        if not 0 < mask_ratio < 1:
            raise ValueError(f"--mask-ratio must be in (0, 1), got {mask_ratio}")
        self.encoder, self.num_parts, self.mask_ratio, self.patch = encoder, num_parts, mask_ratio, encoder.patch_size
        self.budget = setting2_budget(encoder.num_patches, mask_ratio)  # floor(r L) of setting 2, an int
        self.norm_pix_loss = norm_pix_loss
        self.decoder = MAEDecoder(encoder.embed_dim, encoder.grid_size, self.patch ** 2 * 3, decoder_dim,
                                  decoder_depth, decoder_heads)
        # alpha of the current epoch, set with alpha.fill_(): a buffer, so that it needs no recompile and no sync
        self.register_buffer("alpha", torch.tensor(0.0), persistent=False)

    def mask(self, rng, part_ids=None):
        """-> (vis_ids [B, V], mask_ids [B, L - V]), V = int(L (1 - r)): semantic_guided_masking of part_ids [B, L]
        at the epoch's alpha, or random_masking when there are no part ids."""
        n = self.encoder.num_patches
        if part_ids is None:
            return random_masking(rng.rand(n), int(n * (1 - self.mask_ratio)))
        return semantic_guided_masking(part_ids, self.mask_ratio, self.alpha, rng, self.num_parts, self.budget)

    def forward(self, imgs, rng, part_ids=None):
        """imgs [B, 3, H, W], rng: the step's StepRandom, part_ids [B, L] (None: random masking) -> (loss, {})."""
        vis_ids, mask_ids = self.mask(rng, part_ids)
        patches = patchify(imgs, self.patch)  # [B, L, p*p*3]
        latent = self.encoder.forward_pixels(gather_tokens(patches, vis_ids), vis_ids, rng)  # [B, 1+V, D]
        pred = self.decoder(latent, vis_ids, mask_ids, rng)  # [B, L-V, p*p*3]: the masked patches only
        return self.loss(gather_tokens(patches, mask_ids), pred), {}

    def loss(self, target, pred):
        """MSE on the masked patches, target [B, L-V, p*p*3] standardised per patch with norm_pix_loss. Every image
        has L - V masked patches, so the plain mean equals MAE's (loss * mask).sum() / mask.sum()."""
        target = standardize_tokens(target) if self.norm_pix_loss else target.float()
        return ((pred.float() - target) ** 2).mean()


def build_model(args, num_parts):
    """Stage B's model from the flags; num_parts from the parts file (1 for --masking random)."""
    encoder = build_vit(args.model, patch_size=args.patch_size, img_size=args.input_size)
    return SemMAE(encoder, num_parts, args.mask_ratio, args.decoder_dim, args.decoder_depth, args.decoder_heads,
                  args.norm_pix_loss)


def alpha_for_epoch(args, epoch):
    """--alpha-schedule: power (paper, alpha = (t / T)^gamma), reverse (Table 3 'reversed', alpha = 1 - (t / T)^gamma),
    const0 / const1 (alpha fixed), cosine (alpha = (1 - cos(pi t / T)) / 2).
    The official engine_pretrain_setting3.py passes mask_lambda = 1 - alpha (the weight of setting 1), with T = 800.
    At its head (commit e9564d6) the active line is 1 - (t / T)^2, i.e. `power` with gamma 2; the cosine line was
    active only in its first upload (7b4e361). Its commented-out 'reverse' line, mask_lambda = t / T, is linear:
    `reverse` with --gamma 1."""
    t = alpha_schedule(epoch, args.epochs, args.gamma)
    return {"power": t, "reverse": 1.0 - t, "const0": 0.0, "const1": 1.0,
            "cosine": 0.5 * (1 - math.cos(math.pi * min((epoch + 1) / args.epochs, 1.0)))}[args.alpha_schedule]


# ============================================================================================ data and part files
def part_transform(size, train):
    """Stage A input: the whole image resized to a square (no crop, so the part map covers all of it) (+ flip)."""
    from torchvision.transforms import v2
    resize = v2.Resize((size, size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return v2.Compose([v2.ToImage(), resize, *[v2.RandomHorizontalFlip()] * train,
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def joint_transform(size, patch, num_parts, train=True):
    """(image, part map [h, w], label) -> (image [3, S, S], part id per patch [L], label). The stored map (for the
    whole image resized to a square) is resized to the image (nearest), then RandomResizedCrop + flip act on both at
    once (tv_tensors.Mask is resampled nearest), then each patch takes the majority part of its pixels.
    (decision, spec) The authors dropped RandomResizedCrop and only flipped; we keep MAE's augmentation."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    geo = (v2.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
           v2.RandomHorizontalFlip()) if train else (v2.Resize((size, size), interpolation=v2.InterpolationMode.BICUBIC,
                                                                antialias=True),)
    geo, norm = v2.Compose(list(geo)), v2.Compose([v2.ToDtype(torch.float32, scale=True),
                                                   v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def apply(img, part_map, label):
        img = v2.functional.to_image(img)  # [3, H, W] uint8
        full = F.interpolate(part_map[None, None].float(), size=img.shape[-2:], mode="nearest-exact")[0, 0]
        img, mask = geo(img, tv_tensors.Mask(full.to(torch.uint8)))
        votes = F.one_hot(mask.as_subclass(torch.Tensor).long(), num_parts).permute(2, 0, 1).float()  # [K, S, S]
        return norm(img), F.avg_pool2d(votes, patch).argmax(0).flatten(), label  # majority part per patch [L]
    # what --decode device reads: the image's own transform (the same draws) and the part maps' geometry
    apply.image, apply.patch, apply.num_parts = pretrain_transform(size) if train else None, patch, num_parts
    return apply


class WithParts:
    """A dataset with `load(i)` plus its part maps: load(i) -> (image, part map [h, w] uint8, label)."""
    def __init__(self, base, part_ids):
        self.base, self.part_ids, self.path = base, part_ids, base.path
        if hasattr(base, "class_range"):  # an ImageFolder: unreadable images are replaced within their class
            self.class_range = base.class_range

    def __len__(self):
        return len(self.base)

    def load(self, i):
        img, label = self.base.load(i)
        return img, self.part_ids[i], label


def load_parts(path, dataset):
    """Read a stage-A parts file and check that it belongs to `dataset` (same images in the same order)."""
    parts = load_checkpoint(path)
    if parts.get("method") != "semmae-parts" or not torch.is_tensor(parts.get("part_ids")):
        raise UserError(f"{path} is not a SemMAE parts file (make one with `semmae.py parts`)")
    ids, paths, n = parts["part_ids"], parts["paths"], len(dataset)
    if ids.ndim != 3 or tuple(ids.shape[1:]) != tuple(parts["grid"]) or len(paths) != ids.shape[0]:
        raise UserError(f"{path} is inconsistent: part ids {tuple(ids.shape)}, grid {parts['grid']}, "
                        f"{len(paths)} paths")
    if len(paths) != n:
        raise UserError(f"{path} has parts for {len(paths)} images but the dataset has {n}; rerun `semmae.py parts` "
                        f"on this dataset (for --data synthetic: the same --synthetic-size and --seed)")
    key = lambda p: "/".join(Path(p).parts[-2:])  # class/file: the data may have moved between the stages
    bad = next((i for i in range(n) if key(paths[i]) != key(dataset.path(i))), None)
    if bad is not None:
        raise UserError(f"{path} does not match the dataset: image {bad} is {dataset.path(bad)} in the dataset but "
                        f"{paths[bad]} in the parts file")
    if int(ids.max()) >= parts["num_parts"]:
        raise UserError(f"{path}: part ids exceed num_parts={parts['num_parts']}")
    return parts


PALETTE = torch.tensor([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                        [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
                        [170, 110, 40]]) / 255.0


def colorize(ids, size):
    """part ids [h, w] -> RGB [3, size, size] (nearest upsampling)."""
    pal = torch.cat([PALETTE, torch.rand(256, 3, generator=torch.Generator().manual_seed(0))])
    rgb = pal[ids.long().cpu()].permute(2, 0, 1)
    return F.interpolate(rgb[None], size=(size, size), mode="nearest")[0]


# ============================================================================================ the training loop
def train(args, run, model, ddp_model, optimizer, schedule_alpha=False):
    """The training loop of both stages (TrainRun only acts when called). schedule_alpha (stage B with semantic
    masking): each epoch's alpha is set before its first step and logged."""
    for epoch in range(run.epoch, args.epochs):
        extra = {}
        if schedule_alpha:  # a buffer: no recompile, no host sync
            extra["alpha"] = alpha_for_epoch(args, epoch)
            model.alpha.fill_(extra["alpha"])
        for step in run.steps():
            set_lr(optimizer, run.lr(step))
            step_loss = 0.0
            for micro in range(args.accum):
                imgs, *part_ids, _ = run.next_batch()  # [imgs, part_ids, labels] in stage B with parts
                with run.no_sync(ddp_model, micro), autocast(run.device):
                    loss, metrics = ddp_model(imgs, run.step_random(step, micro), *part_ids)
                (loss / args.accum).backward()
                step_loss += loss.detach() / args.accum
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.step_done(step, step_loss, {**metrics, **extra})
        if run.end_epoch():  # saves; True once --max-steps is reached
            break
    run.finish()


# ==================================================================================================== stage A CLI
@torch.no_grad()
def preview_parts(model, base, path, device, seed, count=8):
    """PNG, one row per image (of different classes, sample_across_classes): the image, its reconstruction, its
    parts and the parts over the image, in labelled columns."""
    data, size = SeededDataset(base, image_transform(part_transform(model.img_size, train=False))), model.img_size
    picks = sample_across_classes(base, count, seed)
    imgs = torch.stack([data[i][0] for i in picks]).to(device)  # an unreadable image: the next one of its class
    model.eval()
    cls, maps = model.maps(imgs)
    tiles = []
    for img, rec, pid in zip(denormalize(imgs), denormalize(model.decode(maps, cls)), maps.argmax(1)):
        col = colorize(pid, size)
        tiles += [img, rec, col, 0.5 * img + 0.5 * col]
    size = save_figure(tiles, path, columns=4, padding=1, pad_value=0.0,
                       labels=["image", "reconstruction", "parts", "parts over image"])
    columns = ["image", "its reconstruction from the part maps alone", f"its {model.num_parts} parts (argmax per "
               f"patch)", "the parts over the image"]
    print(figure_line(path, size, len(picks), columns), flush=True)


@torch.no_grad()
def extract_parts(model, base, args, run):
    """Argmax part id per patch for every training image (whole image, no augmentation); each process takes every
    world-th image, then the ids are gathered and rank 0 writes one file atomically."""
    from tqdm import tqdm
    d, model = run.dist, model.eval()
    data = SeededDataset(base, image_transform(part_transform(model.img_size, train=False)))
    loader = make_loader(torch.utils.data.Subset(data, range(d.rank, len(base), d.world)), args.batch_size,
                         args.num_workers)
    out = [torch.empty(0, model.grid, model.grid, dtype=torch.uint8, device=run.device)]
    for imgs, _, _ in tqdm(loader, desc="part ids", disable=None if d.is_main else True, dynamic_ncols=True):
        with autocast(run.device):
            out.append(model.maps(imgs.to(run.device, non_blocking=True))[1].argmax(1).to(torch.uint8))
    ids = gather_rows(d, torch.cat(out), len(base)).cpu()  # [images, h, w] in dataset order
    if d.is_main:
        save_checkpoint(args.out, {"method": "semmae-parts", "part_ids": ids, "paths": [base.path(i) for i in
                        range(len(base))], "grid": [model.grid, model.grid], "num_parts": model.num_parts,
                        "image_size": model.img_size, "teacher": str(args.teacher), "data": str(args.data)})
        preview = args.preview or str(Path(args.out).with_suffix("")) + "_preview.png"
        preview_parts(model, base, preview, run.device, args.seed)
        counts = torch.bincount(ids.flatten().long(), minlength=model.num_parts) / ids.numel()
        d.print(f"wrote {args.out}: {len(base)} images x {model.grid}x{model.grid} part ids, part shares "
                f"{' '.join(f'{c:.2f}' for c in counts.tolist())}; preview {preview}")
    d.barrier()


def no_weight_decay(name, param):
    """The official optimizer groups (main_pretrain_setting3.py, as MAE: timm 0.3.2 add_weight_decay with no skip
    list): no weight decay on biases and 1-D (norm) weights; everything else, the cls and mask tokens included, is
    decayed. Their frozen position embeddings (requires_grad=False) are buffers here. Stage A uses the same rule."""
    return param.ndim <= 1 or name.endswith(".bias")


_loaded_teachers = {}  # --teacher path -> the ViT that teacher_architecture loaded, taken (once) by main_parts


def teacher_architecture(args):
    """`parts`' fill_in (run_main, before it echoes the configuration): with a teacher checkpoint the architecture is
    the teacher's, so --model and --patch-size are set to its preset (the preset of its width, depth and heads, else
    'custom') and patch size, not left at defaults that are not built."""
    if args.teacher == "random":
        return
    teacher = _loaded_teachers[args.teacher] = load_vit(args.teacher)
    c = teacher.config
    args.model = next((name for name, (d, n, h, _) in VIT_PRESETS.items()
                       if (d, n, h) == (c["embed_dim"], c["depth"], c["num_heads"])), "custom")
    args.patch_size = c["patch_size"]


def main_parts(args):
    args.out = args.out or str(Path(args.output_dir) / "parts.pt")
    if args.teacher == "random":
        torch.manual_seed(args.seed)
        teacher = build_vit(args.model, patch_size=args.patch_size, img_size=args.input_size)
    else:
        teacher = _loaded_teachers.pop(args.teacher, None) or load_vit(args.teacher)
    if teacher.config["img_size"] != args.input_size:
        raise UserError(f"the teacher {args.teacher} works at {teacher.config['img_size']} px; pass --input-size "
                        f"{teacher.config['img_size']}")
    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = PartLearner(teacher, args.num_parts, args.dec_channels, args.div_weight)  # checks its flags
    if args.teacher == "random":
        print("warning: --teacher random: a randomly initialised teacher, for smoke runs only; its parts are "
              "meaningless", file=sys.stderr)
    base = build_dataset(args.data, "train", size=args.input_size, length=args.synthetic_size, seed=args.seed)
    run = TrainRun(args, "semmae-parts", SeededDataset(base, image_transform(part_transform(args.input_size, True))))
    model.to(run.device)
    optimizer = build_adamw(model, args.weight_decay, run.peak_lr, no_weight_decay)
    run.resume(model, optimizer, model.teacher)  # stage A trains no encoder: it exports the frozen teacher
    if args.vis:  # a preview of the current model instead of training
        return preview_parts(model, base, args.vis, run.device, args.seed) if run.dist.is_main else None
    ddp_model = run.wrap(model)
    run.measure_flops(model, torch.zeros(2, 3, args.input_size, args.input_size, device=run.device))
    train(args, run, model, ddp_model, optimizer)
    extract_parts(model, base, args, run)


# ==================================================================================================== stage B CLI
def vis_masks(args, base, parts, path, count=4):
    """PNG, one row per image (of different classes, sample_across_classes): the image, its part map and the masks
    at alpha 0, 0.5 and 1 (masked patches greyed), in labelled columns."""
    k, p, s = parts["num_parts"], preset_patch_size(args.model, args.patch_size), args.input_size
    grid, data = s // p, SeededDataset(WithParts(base, parts["part_ids"]), joint_transform(s, p, k, train=False))
    tiles, picks = [], sample_across_classes(base, count, args.seed)
    for i in picks:
        img, ids, _, _ = data[i]  # an unreadable image: the next readable one of its class, as in training
        img = denormalize(img)
        tiles += [img, colorize(ids.view(grid, grid), s)]
        for alpha in (0.0, 0.5, 1.0):  # the same draws (permutation, visiting order) for every alpha: only alpha varies
            rng = StepRandom(args.seed, i, torch.device("cpu"), slice(0, 1), 1)
            _, mask_ids = semantic_guided_masking(ids[None], args.mask_ratio, alpha, rng, num_parts=k)
            keep = torch.ones(grid * grid).index_fill(0, mask_ids[0], 0.0).view(1, 1, grid, grid)
            keep = F.interpolate(keep, size=(s, s), mode="nearest")[0]
            tiles.append(img * keep + 0.5 * (1 - keep))
    alphas = ("0 (inside every part)", "0.5", "1 (whole parts)")
    size = save_figure(tiles, path, columns=5, padding=1, pad_value=0.0,
                       labels=["image", "parts", "mask, alpha 0", "mask, alpha 0.5", "mask, alpha 1"])
    print(figure_line(path, size, len(picks), ["image", f"its {k} parts", *(f"the mask at alpha {a}, masked patches "
                                                                             f"grey" for a in alphas)]))


def bench(args, model, num_parts=6):
    """--bench: the real training step (masking, forward, backward, AdamW) on random tensors already on the device."""
    from tools.bench import benchmark
    device = pick_device(args.device)
    model = model.to(device).train()
    model.alpha.fill_(0.5)
    b, s = args.batch_size, args.input_size
    inputs = [torch.randn(b, 3, s, s, device=device)]
    if args.masking == "semantic":
        inputs.append(torch.randint(num_parts, (b, model.encoder.num_patches), device=device))  # random part maps
    labels = {"masking": (model, "mask"), "encoder": (model.encoder, "forward_pixels"),
              "decoder": (model.decoder, "forward"), "loss": (model, "loss")}
    name = f"semmae-{args.masking}"
    case = (model, inputs, build_adamw(model, args.weight_decay, 1e-4, no_weight_decay), None, labels)
    return benchmark({name: case}, device, args.bench_steps, args.compile, args.profile, args.seed)[name]


def main_pretrain(args):
    if args.gamma <= 0:
        raise UserError("--gamma must be positive")
    semantic = args.masking == "semantic"
    if semantic and not args.parts and not args.bench:
        raise UserError("--masking semantic needs --parts FILE from `semmae.py parts` (or use --masking random)")
    if args.bench:
        torch.manual_seed(args.seed)
        return bench(args, build_model(args, 6))
    base = build_dataset(args.data, "train", size=args.input_size, length=args.synthetic_size, seed=args.seed)
    parts = load_parts(args.parts, base) if args.parts else None
    if args.vis:
        if parts is None:
            raise UserError("--vis needs --parts")
        return vis_masks(args, base, parts, args.vis)
    num_parts, patch = parts["num_parts"] if semantic else 1, preset_patch_size(args.model, args.patch_size)
    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = build_model(args, num_parts)  # checks its flags, before TrainRun makes the output folder
    dataset = (SeededDataset(WithParts(base, parts["part_ids"]), joint_transform(args.input_size, patch, num_parts))
               if semantic else SeededDataset(base, image_transform(pretrain_transform(args.input_size))))
    run = TrainRun(args, "semmae", dataset)
    model.to(run.device)
    optimizer = build_adamw(model, args.weight_decay, run.peak_lr, no_weight_decay)
    run.resume(model, optimizer, model.encoder)  # the ViT being pretrained, exported in every checkpoint
    ddp_model = run.wrap(model)
    fake = [torch.zeros(2, 3, args.input_size, args.input_size, device=run.device),
            torch.zeros(2, model.encoder.num_patches, dtype=torch.long, device=run.device)]
    run.measure_flops(model, *fake[:1 + semantic])  # images (and part ids)
    train(args, run, model, ddp_model, optimizer, schedule_alpha=semantic)


# ============================================================================================================= CLI
DEMO = "--input-size 64 --synthetic-size 2048 --num-workers 1 --epochs 10 --warmup-epochs 1 --batch-size 128"
PARTS_RECIPES = {  # --recipe NAME of `parts`: these flags, then the command line's (which win)
    "imagenet": "",  # the defaults below
    "demo": DEMO + " --blr 4e-3 --num-parts 4 --dec-channels 64",  # the README's synthetic pipeline, step A
}
PRETRAIN_RECIPES = {  # --recipe NAME of `pretrain`
    "imagenet": "",  # the paper's (MAE's) recipe: the defaults below
    # the README's synthetic pipeline: step B (micro ViT, 64 px, 10 epochs), and step 0, its plain MAE teacher
    "demo": DEMO + " --model micro --decoder-dim 128 --decoder-depth 2 --decoder-heads 4 --blr 1.5e-3",
    "demo-teacher": DEMO + " --model micro --decoder-dim 128 --decoder-depth 2 --decoder-heads 4 --blr 1.5e-3 "
                           "--masking random",
}


def build_parser():
    parser = ArgumentParser(prog="semmae.py", description="SemMAE: stage A learns semantic parts, stage B pretrains "
                                                          "an MAE with semantic-guided masking",
                            example="python semmae.py pretrain --recipe demo-teacher --data synthetic (the synthetic "
                                    "pipeline: docs/semmae.md)")
    sub = parser.add_subparsers(dest="command", required=True)
    pa = add_common_args(sub.add_parser("parts", help="stage A: semantic part learning -> parts file",
                                        recipes=PARTS_RECIPES, fill_in=teacher_architecture), "semmae-parts")
    pa.add_argument("--teacher", required=True, help="frozen ViT checkpoint (ours, MAE, DINO, iBOT); 'random' for "
                                                    "smoke runs")
    pa.add_argument("--out", default=None, help="parts file to write (part ids for every training image; default: "
                                                "parts.pt in --output-dir)")
    pa.add_argument("--num-parts", type=int, default=6, help="N attention maps / parts")
    pa.add_argument("--div-weight", type=float, default=1.0, help="lambda of L_div")
    pa.add_argument("--dec-channels", type=int, default=256, help="width of the StyleGAN-like decoder (halved per x2)")
    pa.add_argument("--preview", default=None, help="PNG of the parts (default: next to --out)")
    pa.add_argument("--vis", default=None, help="write a preview PNG of the current model and exit")
    # --model / --patch-size: a teacher checkpoint sets them (teacher_architecture; the teacher's path is compared)
    pa.free_on_resume("out", "preview", "vis", "model", "patch_size")
    for action in pa._actions:
        if action.dest in ("model", "patch_size"):
            action.help += "; of --teacher random (a teacher checkpoint has its own)"
    # (decision) the paper gives no stage-A recipe; a short run is enough for a small head and decoder
    pa.set_defaults(epochs=20, warmup_epochs=2, blr=1e-3, weight_decay=0.05)

    pb = add_common_args(sub.add_parser("pretrain", help="stage B: MAE with semantic-guided masking",
                                        recipes=PRETRAIN_RECIPES), "semmae")
    pb.add_argument("--parts", default=None, help="parts file from `semmae.py parts` (needed by --masking semantic)")
    pb.add_argument("--masking", default="semantic", choices=["semantic", "random"], help="random: plain MAE")
    pb.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of the patches masked")
    pb.add_argument("--alpha-schedule", default="power", choices=["power", "reverse", "const0", "const1", "cosine"],
                    help="power: alpha = (t / T)^gamma (paper, official code's head); reverse: 1 - (t / T)^gamma "
                         "(the official commented-out line is linear: add --gamma 1); const0 / const1: alpha fixed; "
                         "cosine: (1 - cos(pi t / T)) / 2 (the official engine's first upload only)")
    pb.add_argument("--gamma", type=float, default=2.0, help="alpha = (t / T)^gamma (power and reverse)")
    add_decoder_args(pb, depth=8)
    pb.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false",
                    help="pixel targets as they are, not standardised per patch (MAE's --norm_pix_loss off)")
    pb.add_argument("--vis", default=None, help="write a PNG of parts and masks at alpha 0, 0.5, 1 and exit")
    pb.free_on_resume("vis")
    add_bench_args(pb)
    # paper / MAE recipe: ViT-B/16, 800 epochs, 40 warmup, blr 1.5e-4, wd 0.05 (batch 4096 = 64 x 8 GPUs x --accum 8)
    pb.set_defaults(model="base", epochs=800, warmup_epochs=40, blr=1.5e-4, weight_decay=0.05)
    return parser


def main(args):
    check_common_args(args)
    return (main_parts if args.command == "parts" else main_pretrain)(args)


if __name__ == "__main__":
    run_main(main, build_parser())
