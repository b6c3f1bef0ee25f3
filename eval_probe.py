"""Frozen-encoder evaluation of any checkpoint: MAE's linear probe (paper appendix A.2, main_linprobe.py), a fast
cached variant, and DINO's weighted k-NN (eval_knn.py); and MAE's end-to-end fine-tuning (--mode finetune: the
paper's appendix, "End-to-end fine-tuning", and main_finetune.py; see its section below).

The encoder is read with common.load_vit: the method-independent format that semmae.py, latent_mim.py and pcae.py
write (`encoder` + `encoder_args`), or a public ViT checkpoint with the common key names (MAE, DINO, iBOT, timm),
found under the usual top-level keys with wrapper prefixes (module., encoder., backbone., _orig_mod.) stripped.

    python eval_probe.py --ckpt out/checkpoint.pth --data synthetic --mode knn
    torchrun --nproc_per_node 8 eval_probe.py --ckpt mae_pretrain_vit_base.pth --data /imagenet --accum 4
    torchrun --nproc_per_node 8 eval_probe.py --ckpt mae_pretrain_vit_base.pth --data /imagenet --mode finetune \
        --batch-size 128

Features (no gradient, bf16 autocast on CUDA, backbone in eval mode so drop path is off). x_L[i] is token i after
the last block (0 = cls, 1..L = patches), LN_g,b the encoder's final LayerNorm with its trained affine (g, b), and
LN_1,0 a LayerNorm(eps 1e-6) without affine (g = 1, b = 0):
    cls:          LN_g,b(x_L[0])                     MAE linprobe default (--cls_token) / DINO k-NN default
    mean:         mean_i LN_g,b(x_L[i])              mean of the patch tokens, each after the encoder's own final norm
    mae-mean:     LN_1,0(mean_i x_L[i])              MAE's --global_pool probe exactly (models_vit.py)
    prenorm-mean: mean_i x_L[i]                      Latent MIM's NN feature (with --mode knn --loo)
MAE's --global_pool deletes the encoder's final norm and feeds the pre-norm mean of the patch tokens to a new fc_norm,
a LayerNorm(eps 1e-6) that the checkpoint does not contain and the probe freezes: it stays at its default init g = 1,
b = 0 (not a random one), so it is LN_1,0. `mean` and `mae-mean` differ in the order of mean and LayerNorm: LayerNorm
centres and scales each vector by its own statistics, so the mean of normed tokens is not the norm of the mean
token. The affine does not matter for the linear probe: the head's BatchNorm1d(affine=False) removes any per-feature
scale g != 0 and shift (up to a sign the linear layer absorbs, and up to its eps), so there `mean` equals the mean of
LN_1,0-normed tokens. It does matter for k-NN (cosine similarity), where `mean` keeps the trained g, b.
Results: top-1 / top-5 printed and appended as one JSON line to probe.jsonl next to the checkpoint (or --output).
"""
import contextlib, json, math, sys, time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, Subset
from tqdm import tqdm

from torchvision.transforms import v2

from common import (IMAGENET_MEAN, IMAGENET_STD, ArgumentParser, Dist, SeededDataset, TrainRun, UserError, autocast,
                    build_dataset, check_lr_and_device, encoder_export, eval_transform, gather_rows, image_transform,
                    load_checkpoint, load_vit, make_loader, mix_seed, run_main, save_checkpoint, set_lr, warmup_cosine)


# ------------------------------------------------------------------------------------------------------------ LARS
class LARS(torch.optim.Optimizer):
    """LARS as in MAE's util/lars.py (from MoCo v3): for parameters with more than one dimension

        d = g + wd * w,   d <- d * eta * ||w|| / ||d||   (eta = trust_coefficient; factor 1 if ||w|| or ||d|| is 0)

    and for 1-D parameters (biases, norms) d = g, with no weight decay and no trust ratio; then SGD momentum

        mu <- momentum * mu + d,   w <- w - lr * mu."""
    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    one = torch.ones_like(w_norm)
                    q = torch.where(w_norm > 0, torch.where(d_norm > 0, g["trust_coefficient"] * w_norm / d_norm,
                                                            one), one)  # on device: no host sync
                    d = d.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(g["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-g["lr"])
        return loss


# ------------------------------------------------------------------------------------------------------------ k-NN
def knn_votes(train_features, train_labels, test_features, ks, temperature=0.07, num_classes=None, exclude_self=False):
    """DINO's weighted k-NN vote. With f = x / ||x||_2 (cosine similarity = dot product) and N_k(x) the k training
    features most similar to test feature x:

        score_c(x) = sum_{i in N_k(x)} exp(<f(x), f(z_i)> / T) * [y_i = c]

    Returns {k: scores [N_test, C]} for every k in ks (one top-k search for the largest k). exclude_self: the test
    set IS the training set and each sample may not vote for itself (leave-one-out, Latent MIM's NN metric)."""
    train = F.normalize(train_features.float(), dim=1)  # [N, D]
    test = F.normalize(test_features.float(), dim=1)  # [M, D]
    num_classes = num_classes or int(train_labels.max()) + 1
    kmax, voters = max(ks), len(train) - int(exclude_self)
    if kmax > voters:  # topk would silently return fewer neighbours: main clamps k with a warning instead
        raise ValueError(f"k = {kmax} but only {voters} training features can vote")
    chunk = max(1, 2 ** 27 // max(len(train), 1))  # a [chunk, N] similarity block stays under 512 MB
    out = {k: [] for k in ks}
    for start in range(0, len(test), chunk):
        sim = test[start:start + chunk] @ train.T  # [b, N]
        if exclude_self:
            rows = torch.arange(len(sim), device=sim.device)
            sim[rows, rows + start] = -math.inf
        sim, idx = sim.topk(kmax, dim=1)  # [b, kmax], most similar first
        weight = (sim / temperature).exp()  # exp(cos / T)
        neighbours = train_labels[idx]  # [b, kmax]
        for k in ks:
            votes = torch.zeros(len(sim), num_classes, device=sim.device)
            out[k].append(votes.scatter_add_(1, neighbours[:, :k], weight[:, :k]))  # [b, C]
    return {k: torch.cat(v) if v else torch.zeros(0, num_classes) for k, v in out.items()}


def knn_classify(train_features, train_labels, test_features, k=20, temperature=0.07, num_classes=None):
    """Predicted labels [N_test] of the weighted k-NN vote above (k=1: the nearest neighbour's label)."""
    return knn_votes(train_features, train_labels, test_features, [k], temperature, num_classes)[k].argmax(1)


def label_rank(scores, labels):
    """Position of each row's label in the row's classes sorted by decreasing score, ties in increasing class order
    (a stable sort), 0 = first:

        rank(y) = #{c : s_c > s_y} + #{c < y : s_c = s_y}                                    -> [N] long

    Deviation from DINO (which sorts with torch's unstable sort): classes with equal scores, e.g. the classes no
    neighbour voted for, get a fixed order, so a result does not depend on the device or the sort kernel.
    A row with a NaN score gets the largest rank a long holds: wrong at every k, also k above the number of
    classes. (Every comparison with NaN is False, so the formula alone would give such a row rank 0, a hit.)"""
    s_y = scores.gather(1, labels[:, None])  # [N, 1]
    cls = torch.arange(scores.shape[1], device=scores.device)
    rank = (scores > s_y).sum(1) + ((scores == s_y) & (cls < labels[:, None])).sum(1)
    return rank.masked_fill(scores.isnan().any(1), torch.iinfo(rank.dtype).max)


def topk_correct(scores, labels, ks=(1, 5), max_rank=None):
    """For each k in ks, the number of rows whose label is among the first min(k, max_rank) sorted predictions:
    #{n : rank_n < min(k, max_rank)} (see label_rank; k beyond the number of classes counts every row).

    max_rank = k of a k-NN vote, as DINO's eval_knn.py (`correct.narrow(1, 0, min(5, k))`): at most k classes get a
    vote, so its top-5 looks at the first min(5, k) predictions only, and top-5 = top-1 at k = 1. Without it the
    classes that got no vote would fill the top-5 in arbitrary order. With k >= 5 but fewer than 5 voted classes,
    zero-vote classes still fill the remaining places, as in DINO (here in class order, see label_rank)."""
    rank = label_rank(scores, labels)
    return [int((rank < min(k, max_rank or k)).sum()) for k in ks]


def accuracy(scores, labels, max_rank=None):
    """(top-1, top-5) in percent; max_rank = k for a k-NN vote (see topk_correct)."""
    n = max(len(labels), 1)
    return tuple(100.0 * c / n for c in topk_correct(scores, labels, max_rank=max_rank))


# -------------------------------------------------------------------------------------------------------- features
POOLS = ("cls", "mean", "mae-mean", "prenorm-mean")
# The default --pool of the linear probe and k-NN by the checkpoint's method, as each method's own evaluation reads
# the encoder: Latent MIM's official NN evaluation averages the patch tokens before the final norm (its loss never
# targets the cls token); a fine-tuned encoder was trained through MAE's fc_norm on that mean; MAE, and so SemMAE and
# PCAE (whose code is MAE's), probe the cls token, which is also DINO's k-NN feature and the default for public
# checkpoints.
METHOD_POOLS = {"latent_mim": "prenorm-mean", "finetune": "mae-mean"}


@torch.no_grad()
def extract(vit, imgs, pool):
    """[B, 3, H, W] -> [B, D] fp32 features of the frozen encoder:

        cls: LN_g,b(x_L[0]),   mean: mean_i LN_g,b(x_L[i]),   mae-mean: LN_1,0(mean_i x_L[i]),
        prenorm-mean: mean_i x_L[i]

    with i over the patch tokens (see the module docstring)."""
    with autocast(imgs.device):
        x = vit.forward_blocks(vit.embed(imgs))  # [B, 1+L, D] before the final norm
        if pool in ("prenorm-mean", "mae-mean"):
            feats = x[:, 1:].mean(1)  # [B, D]
            if pool == "mae-mean":  # MAE's fresh fc_norm: LayerNorm(eps 1e-6) at its default init, i.e. no affine
                feats = F.layer_norm(feats.float(), feats.shape[-1:], eps=1e-6)
        else:
            feats = vit.norm(x)  # [B, 1+L, D]
            feats = feats[:, 0] if pool == "cls" else feats[:, 1:].mean(1)
    return feats.float()


def report_bad(bad, dataset):
    for i in bad[bad >= 0].tolist():
        print(f"warning: skipped unreadable image {dataset.path(i)}", file=sys.stderr, flush=True)


def extract_dataset(vit, dataset, args, dist, desc):
    """Features and labels of a whole split without augmentation (Resize + CenterCrop), computed in shards by the
    processes and gathered on every one. -> ([N, D] fp32, [N]) on the device."""
    data = SeededDataset(dataset, image_transform(eval_transform(args.input_size)))
    loader = make_loader(Subset(data, range(dist.rank, len(data), dist.world)), args.batch_size, args.num_workers)
    feats, labels = [torch.zeros(0, vit.embed_dim, device=dist.device)], [torch.zeros(0, dtype=torch.long,
                                                                                      device=dist.device)]
    for imgs, y, bad in tqdm(loader, desc=desc, disable=None if dist.is_main else True, dynamic_ncols=True,
                             mininterval=1.0):  # a bar only on a terminal
        report_bad(bad, dataset)
        feats.append(extract(vit, imgs.to(dist.device, non_blocking=True), args.pool))
        labels.append(y.to(dist.device, non_blocking=True))
    feats, labels = gather_rows(dist, torch.cat(feats), len(data)), gather_rows(dist, torch.cat(labels), len(data))
    bad = int((~torch.isfinite(feats).all(1)).sum())  # one host read per split
    if bad:  # NaN features would make every k-NN vote and logit NaN: stop (exit 3) instead of scoring them
        raise FloatingPointError(f"the encoder of {args.ckpt} gives non-finite features for {bad} of {len(feats)} "
                                 f"{desc.split()[0]} images: its weights hold NaN or inf; evaluate another checkpoint")
    return feats, labels


# ----------------------------------------------------------------------------------------------------- linear head
def build_head(dim, num_classes):
    """MAE's probe head: BatchNorm1d(D, affine=False, eps=1e-6) then Linear(D, C), weight trunc_normal(std 0.01),
    bias 0 (MoCo v3's init, as main_linprobe.py)."""
    fc = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), fc)


def tf_crop_params(height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """The box of MAE's TF-style RandomResizedCrop (util/crop.py, after BYOL's TF code): one draw, clamped to the
    image, no retry loop and no centre-crop fallback. With u ~ U(scale) and log r ~ U(log ratio), drawn in this
    order from torch's default generator (as MAE does), then the top-left corner:

        w = min(round(sqrt(u H W r)), W),   h = min(round(sqrt(u H W / r)), H)
        top ~ U{0, ..., H - h},   left ~ U{0, ..., W - w}                                     -> (top, left, h, w)

    torchvision's RandomResizedCrop instead redraws (up to 10 times) until the box fits and then falls back to a
    centre crop: a different distribution of boxes (a draw that does not fit is replaced, never clamped)."""
    area = height * width * torch.empty(1).uniform_(scale[0], scale[1]).item()
    r = math.exp(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1])).item())
    # max(1, .): an empty box is only possible on images a few pixels wide, where MAE's resize would fail
    w = max(1, min(round(math.sqrt(area * r)), width))
    h = max(1, min(round(math.sqrt(area / r)), height))
    top = torch.randint(0, height - h + 1, (1,)).item()
    left = torch.randint(0, width - w + 1, (1,)).item()
    return top, left, h, w


class TFRandomResizedCrop:
    """The tf_crop_params box resized to size x size, bicubic; a transform for a torchvision.transforms.v2 Compose.
    MAE resizes the PIL image (PIL's bicubic); here the uint8 tensor is resized with antialias=True, torchvision's
    PIL-like bicubic, as common.pretrain_transform does. Its draws come from torch's default generator, which
    SeededDataset seeds per sample, so the crops are reproducible."""
    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, img):
        height, width = v2.functional.get_size(img)
        top, left, h, w = tf_crop_params(height, width, self.scale, self.ratio)
        return v2.functional.resized_crop(img, top, left, h, w, [self.size, self.size],
                                          interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


def probe_train_transform(size):
    """MAE main_linprobe.py's training augmentation: TF-style RandomResizedCrop(size, scale 0.08-1, ratio 3/4-4/3,
    bicubic) + horizontal flip + ImageNet normalisation."""
    return v2.Compose([v2.ToImage(), TFRandomResizedCrop(size), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class SeededSampler(DistributedSampler):
    """MAE's DistributedSampler (shuffle, set_epoch) that also gives each index an augmentation seed of
    (seed, epoch, index), so that crops do not depend on the number of workers."""
    def __iter__(self):
        return ((i, mix_seed(self.seed, self.epoch, i)) for i in super().__iter__())


def image_batches(vit, dataset, args, dist):
    """Full protocol: every epoch, new views (probe_train_transform: MAE's TF-style crop + flip) through the frozen
    encoder. Returns (batches(epoch) -> iterator of (features [B, D], labels [B]), batches per epoch)."""
    data = SeededDataset(dataset, image_transform(probe_train_transform(args.input_size)))
    sampler = SeededSampler(data, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=args.seed)
    loader = make_loader(data, args.batch_size, args.num_workers, sampler, drop_last=True)

    def batches(epoch):
        sampler.set_epoch(epoch)
        for imgs, y, bad in loader:
            report_bad(bad, dataset)
            yield extract(vit, imgs.to(dist.device, non_blocking=True), args.pool), y.to(dist.device, non_blocking=True)
    return batches, len(loader)


def cached_batches(feats, labels, batch_size, dist, seed=0):
    """--cached: the same sampling (DistributedSampler, set_epoch, last partial batch dropped) over features
    extracted once without augmentation. Deviation from MAE's protocol: no crop / flip augmentation."""
    sampler = DistributedSampler(range(len(feats)), num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=seed)

    def batches(epoch):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=feats.device)
        for b in range(len(order) // batch_size):
            idx = order[b * batch_size:(b + 1) * batch_size]
            yield feats[idx], labels[idx]
    return batches, len(sampler) // batch_size


@torch.no_grad()
def evaluate_head(head, feats, labels, batch_size=1024):
    """(top-1, top-5) of the head on val features; BatchNorm uses its running statistics (eval mode)."""
    head.eval()
    scores = torch.cat([head(x) for x in feats.split(batch_size)]) if len(feats) else feats.new_zeros(0, 1)
    head.train()
    return accuracy(scores, labels)


def fit_linear_head(head, batches, batches_per_epoch, val, dist, epochs=90, warmup_epochs=10, lr=0.1,
                    weight_decay=0.0, accum=1, eval_every=1, log_every=20):
    """MAE main_linprobe.py's loop: cross-entropy, LARS, lr set per optimizer step from the fractional epoch
    (linear warmup, then half-cosine to 0), DDP on the head only, evaluation every `eval_every` epochs and at the end.
    Returns {top1, top5 (last epoch), max_top1, history}."""
    model = head
    if dist.world > 1:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(head, device_ids=ids)
    optimizer = LARS(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = batches_per_epoch // accum
    if steps == 0:
        raise UserError(f"{batches_per_epoch} batch(es) per epoch is fewer than --accum {accum}")
    # a bar on rank 0 when the output is a terminal (disable=None); epoch lines are printed either way
    bar = tqdm(total=epochs * steps, desc="linear probe", disable=None if dist.is_main else True, dynamic_ncols=True,
               mininterval=1.0)
    history, head_device = [], next(head.parameters()).device
    for epoch in range(epochs):
        head.train()
        loss_sum = torch.zeros((), device=head_device)  # summed on the device, read every log_every steps
        for i, (x, y) in zip(range(steps * accum), batches(epoch)):
            micro = i % accum
            if micro == 0:
                set_lr(optimizer, warmup_cosine(epoch + i / (steps * accum), epochs, warmup_epochs, lr))
            sync = model.no_sync() if dist.world > 1 and micro < accum - 1 else contextlib.nullcontext()
            with sync:
                loss = F.cross_entropy(model(x), y)
                (loss / accum).backward()
            loss_sum += loss.detach()
            if micro == accum - 1:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)
                done = epoch * steps + i // accum + 1  # optimizer steps so far (bar.n stays 0 when it is off)
                if done % log_every == 0 and not bar.disable:
                    lr_now = optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{loss_sum.item() / (i + 1):.4g}", lr=f"{lr_now:.3g}")  # a sync per N steps
        if (eval_every and (epoch + 1) % eval_every == 0) or epoch == epochs - 1:
            top1, top5 = evaluate_head(head, *val)
            row = {"epoch": epoch, "loss": float(dist.all_reduce_mean(loss_sum / (steps * accum))), "top1": top1,
                   "top5": top5}
            history.append(row)
            if dist.is_main:
                bar.write(f"epoch {epoch}: loss {row['loss']:.4f}  val top-1 {top1:.2f}  top-5 {top5:.2f}")
    bar.close()
    return {"top1": history[-1]["top1"], "top5": history[-1]["top5"], "max_top1": max(r["top1"] for r in history),
            "history": history}


# ------------------------------------------------------------------------------------------ end-to-end fine-tuning
# MAE's fine-tuning protocol (paper appendix, "End-to-end fine-tuning"; FINETUNE.md, main_finetune.py,
# util/lr_decay.py, util/lr_sched.py, models_vit.py), which SemMAE and PCAE reuse (Latent MIM reports fine-tuning
# without code): the whole encoder is trained with a new linear head, layer-wise lr decay, RandAugment, random erasing,
# mixup / cutmix and label smoothing.
FINETUNE_RECIPES = {  # encoder width -> FINETUNE.md's ViT-B / L / H flags (other widths get ViT-B's)
    768: dict(epochs=100, blr=5e-4, layer_decay=0.65, drop_path=0.1),
    1024: dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.2),
    1280: dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.3),
}
FINETUNE_POOLS = ("mae-mean", "cls")


def vit_layer_id(name, depth):
    """The layer of an encoder parameter for layer-wise lr decay (MAE util/lr_decay.py, get_layer_id_for_vit, after
    BEiT): 0 for the embeddings (patch_embed.*, cls_token, pos_embed), i + 1 for blocks.i.*, and depth + 1 for what
    follows the blocks (the encoder's final norm, fc_norm, head)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_lr_scales(vit_depth, decay):
    """lr multipliers of the layer ids 0 .. depth + 1 (MAE util/lr_decay.py, param_groups_lrd, whose num_layers is
    depth + 1):

        scale(layer_id) = decay ** (depth + 1 - layer_id)

    the embeddings get decay^(depth + 1), block i decay^(depth - i), the head and fc_norm 1. ViT-B (depth 12) with
    decay 0.65: 0.65^13 = 0.0037 for the embeddings, 0.65^12 = 0.0057 for block 0, 0.65 for block 11."""
    return [decay ** (vit_depth + 1 - i) for i in range(vit_depth + 2)]


def finetune_param_groups(model, weight_decay, layer_decay):
    """AdamW groups per (layer id, decayed or not), each with its `lr_scale` (MAE param_groups_lrd). No weight decay
    on 1-D parameters (biases, norms) and on cls_token and pos_embed (timm's VisionTransformer.no_weight_decay, which
    main_finetune.py passes); the other weights, the head's included, decay by weight_decay."""
    depth = len(model.vit.blocks)
    scales, groups = layer_lr_scales(depth, layer_decay), {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.removeprefix("vit.")
        decay = not (p.ndim == 1 or name in ("cls_token", "pos_embed"))
        layer = vit_layer_id(name, depth)
        group = groups.setdefault((layer, decay), {"params": [], "lr_scale": scales[layer],
                                                   "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(p)
    return list(groups.values())


def set_layer_lr(optimizer, lr):
    """Every group's lr = lr x its layer's scale (MAE util/lr_sched.py)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def soft_target_cross_entropy(logits, targets):
    """timm's SoftTargetCrossEntropy, in fp32: mean over the batch of  -sum_c t_c log softmax(z)_c.  [B, C] -> []"""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class FinetuneClassifier(nn.Module):
    """MAE's fine-tuning model (models_vit.py): the pretrained encoder, trained end to end with stochastic depth
    (rates linear from 0 to drop_path over the blocks, drawn from the step's StepRandom), and a linear head on

        mae-mean (MAE's default --global_pool):  fc_norm(mean_i x_L[i])   fc_norm a new LayerNorm(eps 1e-6) at g = 1,
                                                                          b = 0, trained; the final norm is unused
        cls (MAE's --cls_token):                 LN_g,b(x_L[0])           the encoder's final norm

    with x_L[i] token i after the last block (0 = cls). Head: Linear(D, classes), weight trunc_normal(std 2e-5)
    (main_finetune.py), bias 0 (timm's ViT init). The position table becomes a trained parameter starting from its
    sin-cos values (timm's ViT, which MAE fine-tunes, learns it). With mae-mean the unused final norm stays, frozen
    (MAE deletes it): the exported encoder keeps every key load_vit expects, and DDP sees no parameter without a
    gradient."""
    def __init__(self, vit, num_classes, pool="mae-mean", drop_path=0.1):
        super().__init__()
        vit.requires_grad_(True).train()
        for blk, rate in zip(vit.blocks, torch.linspace(0, drop_path, len(vit.blocks)).tolist()):
            blk.drop_path = rate  # as ViT(drop_path_rate=drop_path) sets them
        pos = vit.pos_embed.detach().clone()
        del vit.pos_embed  # a fixed buffer in pretraining
        vit.pos_embed = nn.Parameter(pos)
        self.vit, self.pool = vit, pool
        if pool == "mae-mean":
            self.fc_norm = nn.LayerNorm(vit.embed_dim, eps=1e-6)
            vit.norm.requires_grad_(False)
        self.head = nn.Linear(vit.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def logits(self, imgs, rng=None):
        """[B, 3, H, W] -> [B, classes]; rng: the step's StepRandom (stochastic depth, training only)."""
        x = self.vit.forward_blocks(self.vit.embed(imgs), rng)  # [B, 1+L, D] before the final norm
        feats = self.fc_norm(x[:, 1:].mean(1)) if self.pool == "mae-mean" else self.vit.norm(x[:, 0])  # [B, D]
        return self.head(feats)

    def forward(self, imgs, rng, targets):
        """(loss, metrics) as the method files' models: the soft-target cross-entropy against targets [B, C]."""
        return soft_target_cross_entropy(self.logits(imgs, rng), targets), {}


def finetune_train_transform(size, randaug_ops=2, randaug_magnitude=9, reprob=0.25):
    """MAE's fine-tuning augmentation (timm's create_transform as MAE util/datasets.py calls it) in torchvision v2:
    RandomResizedCrop(size, scale 0.08-1, ratio 3/4-4/3, bicubic) + horizontal flip + RandAugment
    (rand-m9-mstd0.5-inc1: 2 ops, magnitude 9 of 10, each op applied with probability 0.5, fill = the ImageNet mean
    colour) + ImageNet normalisation + RandomErasing (probability 0.25, area 0.02-1/3, aspect 0.3-1/0.3, per-pixel
    normal noise: timm's 'pixel' mode) after the normalisation. Where torchvision differs from timm 0.3.2:
    - RandAugment's magnitude is fixed at 9: torchvision has no magnitude noise (timm's mstd0.5 draws N(9, 0.5));
    - its ops: no Invert and SolarizeAdd, an Identity op instead (timm's inc1 ops otherwise: the enhance factors
      1 +- 0.81, rotate +-27 deg, shear +-0.27, translate 0.41 W (timm 0.405 W) and solarize at 10 % of the range
      agree once torchvision's 11 magnitude bins make 9 mean 9/10, as in timm), and Posterize keeps 4 bits (timm's
      PosterizeIncreasing keeps 1);
    - the geometric ops resample bilinearly: torchvision's tensor kernels have no bicubic (timm: PIL bicubic);
    - the crop and resize work on uint8 tensors (torchvision's antialiased bicubic), timm on PIL images."""
    fill = [round(255 * m) for m in IMAGENET_MEAN]  # timm's img_mean: (124, 116, 104)
    randaug = [v2.RandomApply([v2.RandAugment(1, randaug_magnitude, 11, v2.InterpolationMode.BILINEAR, fill)], p=0.5)
               for _ in range(randaug_ops)]
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True,
                                                          interpolation=v2.InterpolationMode.BICUBIC),
                       v2.RandomHorizontalFlip(), *randaug, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                       v2.RandomErasing(reprob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random")])


@contextlib.contextmanager
def seeded_cpu_rng(seed):
    """torch's default CPU generator seeded with `seed` inside the block, its previous state restored after."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


class BatchMix:
    """MAE's mixup / cutmix with label smoothing (timm's Mixup, mode 'batch', prob 1, as main_finetune.py sets it):
    a micro-batch is mixed with itself in another order, one lambda for the whole batch. When both are on, CutMix
    with probability switch_prob, else MixUp:

        MixUp:   lambda ~ Beta(mixup, mixup),    x <- lambda x + (1 - lambda) x'
        CutMix:  lambda ~ Beta(cutmix, cutmix),  a box of about (1 - lambda) of the image pasted from x', clipped to
                 the image; then lambda <- 1 - box area / image area (timm's correct_lam)
        targets: t = lambda y + (1 - lambda) y',  y = (1 - eps) onehot + eps / C  (eps = smoothing; rows sum to 1)

    torchvision's v2.MixUp / v2.CutMix draw from torch's default CPU generator: it is seeded for the call (and
    restored after) with a seed the loop derives from (seed, step, the micro-batch's place in the step's global
    batch), so a resume repeats the draws, and two processes equal one process with two accumulation steps.
    Where torchvision differs from timm: the partner x' is the previous image of the batch (roll by 1), not the
    mirrored one (flip); the CutMix box has half-sides int(0.5 sqrt(1 - lambda) W) (timm: int(sqrt(1 - lambda) W) // 2);
    the smoothing is applied after mixing, which gives the same targets (it is affine and the weights sum to 1)."""
    def __init__(self, num_classes, mixup=0.8, cutmix=1.0, switch_prob=0.5, smoothing=0.1):
        ops, probs = [], []  # torchvision refuses alpha 0: only the mixes that are on
        if mixup > 0:
            ops.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
            probs.append(1.0 - switch_prob if cutmix > 0 else 1.0)
        if cutmix > 0:
            ops.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
            probs.append(switch_prob if mixup > 0 else 1.0)
        self.mix = v2.RandomChoice(ops, probs) if ops else None
        self.num_classes, self.smoothing = num_classes, smoothing

    def __call__(self, imgs, labels, seed):
        """imgs [B, 3, H, W], labels [B] -> mixed imgs, targets [B, C]."""
        if self.mix is None:
            targets = F.one_hot(labels, self.num_classes).float()
        else:
            with seeded_cpu_rng(seed):
                imgs, targets = self.mix(imgs, labels)
        return imgs, targets * (1.0 - self.smoothing) + self.smoothing / self.num_classes


@torch.no_grad()
def evaluate_classifier(model, loader, dist, dataset=None):
    """(top-1, top-5 in percent, mean cross-entropy) of model.logits on the val images (Resize + CenterCrop, eval
    mode), as MAE's engine_finetune.evaluate. Each process takes its share of the images and the counts are summed
    over processes, so every image counts once. Ranks as label_rank (ties in class order)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=dist.device)  # top-1 hits, top-5 hits, cross-entropy
    images = 0  # this process's images, counted on the host
    for imgs, labels, bad in loader:
        if dataset is not None:
            report_bad(bad, dataset)
        imgs, labels = imgs.to(dist.device, non_blocking=True), labels.to(dist.device, non_blocking=True)
        with autocast(dist.device):
            logits = model.logits(imgs).float()  # [B, C]
        rank = label_rank(logits, labels)
        sums += torch.stack([(rank < 1).sum(), (rank < 5).sum(),
                             F.cross_entropy(logits, labels, reduction="sum")]).double()
        images += len(labels)
    model.train()
    sums = torch.cat([sums, sums.new_tensor([images])])  # one copy to the device, after the loop
    top1, top5, loss, n = (dist.all_reduce_mean(sums) * dist.world).tolist()
    n = max(round(n), 1)
    return 100.0 * round(top1) / n, 100.0 * round(top5) / n, loss / n


def check_finetune_args(args):
    if args.pool not in FINETUNE_POOLS:
        raise UserError(f"--mode finetune pools with {' or '.join(FINETUNE_POOLS)}, not {args.pool}")
    if not (0 < args.layer_decay <= 1 and 0 <= args.drop_path < 1 and 0 <= args.smoothing < 1 and args.min_lr >= 0):
        raise UserError("--layer-decay must be in (0, 1], --drop-path and --smoothing in [0, 1), --min-lr >= 0")
    if not (args.mixup >= 0 and args.cutmix >= 0 and 0 <= args.mixup_switch_prob <= 1 and 0 <= args.reprob <= 1):
        raise UserError("--mixup and --cutmix must be >= 0, --mixup-switch-prob and --reprob in [0, 1]")
    if args.randaug_ops < 0 or not 0 <= args.randaug_magnitude <= 10:
        raise UserError("--randaug-ops must be >= 0 and --randaug-magnitude in 0..10")
    if min(args.save_every, args.keep_every, args.max_steps) < 0:
        raise UserError("--save-every, --keep-every and --max-steps must be non-negative")


def finetune(args):
    """--mode finetune: MAE's end-to-end fine-tuning of the checkpoint's encoder, with the training loop of the method
    files (TrainRun: processes, bf16 autocast, exact resume from output-dir/checkpoint.pth, non-finite guard, log).
    Evaluated every --eval-every epochs; output-dir gets checkpoint.pth (the last), checkpoint-best.pth (best top-1)
    and log.jsonl (train loss, lr, val top-1 / top-5 / loss per epoch); the final numbers go to probe.jsonl."""
    check_lr_and_device(args)  # before a process picks its device
    vit = load_encoder(args, Dist(args.device))  # sets --input-size from the encoder
    for k, v in FINETUNE_RECIPES.get(vit.embed_dim, FINETUNE_RECIPES[768]).items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    args.output_dir = args.output_dir or str(Path(args.ckpt).parent / "finetune")
    check_args(args)
    check_finetune_args(args)
    data = dict(size=args.input_size, length=args.synthetic_size, seed=args.seed)  # size etc.: --data synthetic only
    train_set, val_set = build_dataset(args.data, "train", **data), build_dataset(args.data, "val", **data)
    if list(train_set.classes) != list(val_set.classes):
        raise UserError(f"{args.data}: the train and val splits have different class folders")
    num_classes = len(train_set.classes)
    train_tf = finetune_train_transform(args.input_size, args.randaug_ops, args.randaug_magnitude, args.reprob)
    run = TrainRun(args, "finetune", SeededDataset(train_set, image_transform(train_tf)))
    out = output_path(args) if run.dist.is_main else None
    val = SeededDataset(val_set, image_transform(eval_transform(args.input_size)))
    val_loader = make_loader(Subset(val, range(run.dist.rank, len(val), run.dist.world)), args.batch_size,
                             args.num_workers)
    mix = BatchMix(num_classes, args.mixup, args.cutmix, args.mixup_switch_prob, args.smoothing)
    torch.manual_seed(args.seed)  # the head's init, the same on every process
    model = FinetuneClassifier(vit, num_classes, args.pool, args.drop_path).to(run.device)
    optimizer = torch.optim.AdamW(finetune_param_groups(model, args.weight_decay, args.layer_decay), lr=run.peak_lr,
                                  betas=(0.9, 0.999), fused=True)  # MAE: AdamW's default betas
    encoder = model.vit  # exported in every checkpoint: the fine-tuned encoder, for load_vit
    run.resume(model, optimizer)
    best_path = run.out / "checkpoint-best.pth"
    best = load_checkpoint(best_path)["top1"] if run.step and best_path.is_file() else -1.0
    ddp_model = run.wrap(model)
    s = args.input_size
    run.measure_flops(model, torch.zeros(2, 3, s, s, device=run.device),
                      torch.full((2, num_classes), 1.0 / num_classes, device=run.device))
    end_frac = args.min_lr / run.peak_lr  # MAE's cosine ends at min_lr (1e-6), times each layer's scale
    row = {"ckpt": str(args.ckpt), "data": str(args.data), "mode": "finetune", "pool": args.pool,
           "input_size": args.input_size, "num_classes": num_classes, "epochs": args.epochs,
           "eff_batch": run.effective_batch, "lr": run.peak_lr, "layer_decay": args.layer_decay,
           "drop_path": args.drop_path, "output_dir": str(run.out), "top1": None, "top5": None}
    for epoch in range(run.epoch, args.epochs):
        batches = run.epoch_batches()
        for step in run.steps():
            set_layer_lr(optimizer, run.lr(step, 0.0, end_frac))
            step_loss = 0.0
            for micro in range(args.accum):
                imgs, labels = run.next_batch(batches)
                slot = micro * run.dist.world + run.dist.rank  # the micro-batch's place in the step's global batch
                imgs, targets = mix(imgs, labels, mix_seed(args.seed, step, slot))
                with run.no_sync(ddp_model, micro), autocast(run.device):
                    loss, metrics = ddp_model(imgs, run.step_random(step, micro), targets)
                (loss / args.accum).backward()
                step_loss += loss.detach() / args.accum
            optimizer.step()  # no gradient clipping (MAE: --clip_grad None)
            optimizer.zero_grad(set_to_none=True)
            run.step_done(step, step_loss, metrics)
            if run.preempted():  # SIGTERM / SIGUSR1 to any process: keep this step, exit 75 for a requeue
                run.save(model, optimizer, encoder)
                run.exit_for_requeue()
            if args.save_every and run.step % args.save_every == 0:
                run.save(model, optimizer, encoder)
        if run.stopped_in_epoch():  # --max-steps inside the epoch: save the exact position, stop
            run.save(model, optimizer, encoder)
            break
        evaluated = {}
        if (args.eval_every and (epoch + 1) % args.eval_every == 0) or epoch == args.epochs - 1:
            top1, top5, val_loss = evaluate_classifier(model, val_loader, run.dist, val_set)
            evaluated = dict(top1=top1, top5=top5, val_loss=val_loss)
            row.update(top1=top1, top5=top5, max_top1=max(top1, best))
        run.end_epoch(**evaluated)
        run.save(model, optimizer, encoder)
        if evaluated and evaluated["top1"] > best:
            best = evaluated["top1"]
            best_state = {"model": model.state_dict(), "epoch": epoch, **evaluated, "args": vars(args),
                          **encoder_export(encoder, "finetune")}
            # rank 0 writes; a failure there (a full disk) stops every process instead of leaving them waiting
            run.all_processes(lambda: save_checkpoint(best_path, best_state) if run.dist.is_main else None)
    run.finish()
    row["epochs_done"] = run.epoch  # fewer than --epochs after --max-steps: no line in probe.jsonl
    if run.dist.is_main and run.epoch == args.epochs and row["top1"] is not None:
        print(f"finetune {Path(args.ckpt).name}: top-1 {row['top1']:.2f}  top-5 {row['top5']:.2f}  (best top-1 "
              f"{row['max_top1']:.2f})  -> {out}", flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


# ------------------------------------------------------------------------------------------------------------ main
def load_encoder(args, dist):
    """The frozen encoder of --ckpt on the device; checks that its image size / patch grid fits --input-size."""
    vit = load_vit(args.ckpt, num_heads=args.num_heads)  # public checkpoints do not store the head count
    cfg = vit.config
    if cfg["in_chans"] != 3:
        raise UserError(f"{args.ckpt}: the encoder takes {cfg['in_chans']} input channels, the data has 3")
    grid = cfg["img_size"] // cfg["patch_size"]
    if args.input_size is None:
        args.input_size = cfg["img_size"]
    elif args.input_size != cfg["img_size"]:
        raise UserError(f"{args.ckpt}: the encoder was built for {cfg['img_size']} px images ({grid}x{grid} patches "
                        f"of {cfg['patch_size']} px) but --input-size is {args.input_size}; pass --input-size "
                        f"{cfg['img_size']}")
    method, why = vit.checkpoint_position["method"], "given"
    if args.pool is None:
        args.pool = METHOD_POOLS.get(method, "cls")
        why = (f"the read-out of {method} checkpoints" if method in METHOD_POOLS else
               f"the default for {method or 'public'} checkpoints") + "; --pool overrides it"
    dist.print(f"encoder: ViT width {cfg['embed_dim']}, depth {cfg['depth']}, {cfg['num_heads']} heads, "
               f"{cfg['img_size']} px, {grid}x{grid} patches of {cfg['patch_size']} px; pool {args.pool} ({why})")
    return vit.requires_grad_(False).eval().to(dist.device)


def output_path(args):
    path = Path(args.output) if args.output else Path(args.ckpt).parent / "probe.jsonl"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        open(path, "a").close()  # fail now, not after hours of probing
    except OSError as e:
        raise UserError(f"cannot write the results to {path} ({e.strerror or e}); pass --output") from None
    return path


def check_args(args):
    for name in ("epochs", "batch_size", "accum", "log_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise UserError("--warmup-epochs must be between 0 and --epochs")
    if min(args.nb_knn) < 1 or not args.temperature > 0:  # `not >`: also refuses nan
        raise UserError("--nb-knn values must be at least 1 and --temperature positive")
    if args.num_heads is not None and args.num_heads < 1:
        raise UserError("--num-heads must be at least 1")
    check_lr_and_device(args)
    if args.num_workers < 0 or args.eval_every < 0 or args.synthetic_size < 1:
        raise UserError("--num-workers and --eval-every must be non-negative, --synthetic-size positive")
    if args.loo and args.mode != "knn":
        raise UserError("--loo is a k-NN option (--mode knn)")
    if args.cached and args.mode != "linear":
        raise UserError("--cached is a linear-probe option (--mode linear)")


MODE_DEFAULTS = {  # the flags whose default depends on --mode (None in the parser); linear / knn pools: METHOD_POOLS
    "linear": dict(epochs=90, warmup_epochs=10, batch_size=512, blr=0.1, weight_decay=0.0),  # MAE linprobe
    "finetune": dict(warmup_epochs=5, batch_size=32, weight_decay=0.05, pool="mae-mean"),  # + FINETUNE_RECIPES
}


def fill_mode_defaults(args):
    """The defaults of the flags that depend on --mode (None in the parser); flags given on the command line stay."""
    for k, v in MODE_DEFAULTS["finetune" if args.mode == "finetune" else "linear"].items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    return args


def main(args):
    fill_mode_defaults(args)
    if args.mode == "finetune":
        return finetune(args)
    check_args(args)
    dist = Dist(args.device)
    torch.manual_seed(args.seed)  # the head's init; identical on every process
    vit = load_encoder(args, dist)
    data = dict(size=args.input_size, length=args.synthetic_size, seed=args.seed)  # size etc.: --data synthetic only
    train_set, val_set = build_dataset(args.data, "train", **data), build_dataset(args.data, "val", **data)
    if list(train_set.classes) != list(val_set.classes):
        raise UserError(f"{args.data}: the train and val splits have different class folders")
    num_classes = len(train_set.classes)
    out = output_path(args) if dist.is_main else None
    t0 = time.perf_counter()
    val = extract_dataset(vit, val_set, args, dist, "val features")  # no augmentation: the same every epoch
    row = {"ckpt": str(args.ckpt), "ckpt_step": vit.checkpoint_position["step"],  # null for public checkpoints
           "ckpt_epoch": vit.checkpoint_position["epoch"], "data": str(args.data), "mode": args.mode,
           "pool": args.pool, "input_size": args.input_size, "num_classes": num_classes}
    if args.mode == "knn":
        train = val if args.loo else extract_dataset(vit, train_set, args, dist, "train features")
        voters = len(train[0]) - int(args.loo)  # the neighbours a val image can have
        if voters < 1:
            raise UserError(f"k-NN needs at least {1 + int(args.loo)} images in the {'val' if args.loo else 'train'} "
                            f"split")
        ks = sorted({min(k, voters) for k in (1, *args.nb_knn)})  # k beyond the training set: clamped, with a warning
        if max(args.nb_knn) > voters and dist.is_main:
            print(f"warning: k-NN: only {voters} {'other val' if args.loo else 'training'} images can vote; k = "
                  f"{', '.join(str(k) for k in args.nb_knn if k > voters)} clamped to {voters} (recorded as k = "
                  f"{voters})", file=sys.stderr, flush=True)
        votes = knn_votes(*train, val[0], ks, args.temperature, num_classes, exclude_self=args.loo)
        knn = {str(k): dict(zip(("top1", "top5"), accuracy(votes[k], val[1], max_rank=k))) for k in ks}
        for k in ks:
            dist.print(f"{k}-NN: top-1 {knn[str(k)]['top1']:.2f}  top-5 {knn[str(k)]['top5']:.2f}")
        best_k = 1 if args.loo else 20 if 20 in ks else ks[-1]  # Latent MIM reports leave-one-out 1-NN, DINO k = 20
        row.update(top1=knn[str(best_k)]["top1"], top5=knn[str(best_k)]["top5"], k=best_k, knn=knn,
                   nb_knn=args.nb_knn, loo=args.loo, temperature=args.temperature)
    else:
        eff_batch = args.batch_size * dist.world * args.accum
        lr = args.lr if args.lr is not None else args.blr * eff_batch / 256  # linear scaling rule
        if args.cached:
            batches, n = cached_batches(*extract_dataset(vit, train_set, args, dist, "train features"),
                                        args.batch_size, dist, args.seed)
        else:
            batches, n = image_batches(vit, train_set, args, dist)
        dist.print(f"linear probe: {len(train_set)} train / {len(val_set)} val images, {num_classes} classes, "
                   f"effective batch {eff_batch}, lr {lr:.4g}, {args.epochs} epochs, {dist.world} process(es)")
        head = build_head(vit.embed_dim, num_classes).to(dist.device)
        res = fit_linear_head(head, batches, n, val, dist, args.epochs, args.warmup_epochs, lr, args.weight_decay,
                              args.accum, args.eval_every, args.log_every)
        row.update(cached=args.cached, epochs=args.epochs, eff_batch=eff_batch, lr=lr, **res)
    row["time_s"] = time.perf_counter() - t0
    if dist.is_main:
        print(f"{args.mode}{' (cached)' if args.cached else ''} {Path(args.ckpt).name}: top-1 {row['top1']:.2f}  "
              f"top-5 {row['top5']:.2f}  -> {out}", flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    dist.close()
    return row


def build_parser():
    p = ArgumentParser(prog="eval_probe.py", description="Linear probe (MAE protocol) or k-NN (DINO) of a frozen ViT "
                                                         "encoder, or MAE's end-to-end fine-tuning of it (--mode "
                                                         "finetune)")
    a = p.add_argument
    a("--ckpt", required=True, help="checkpoint of semmae.py / latent_mim.py / pcae.py, or a public MAE/DINO/iBOT/"
                                    "timm ViT checkpoint")
    a("--data", required=True, help="folder with train/<class>/* and val/<class>/*, or 'synthetic'")
    a("--mode", default="linear", choices=["linear", "knn", "finetune"],
      help="linear probe of the frozen encoder, k-NN on its features, or end-to-end fine-tuning")
    a("--cached", action="store_true", help="linear: train on features extracted once without augmentation")
    a("--pool", default=None, choices=POOLS,
      help="default: the checkpoint method's read-out (prenorm-mean for latent_mim, mae-mean for finetune, else "
           "cls); finetune: mae-mean (a trained fc_norm of the pre-norm patch mean) or cls. cls: cls token "
           "after the final norm; mean: mean of the patch tokens each after the encoder's final norm "
           "(its trained affine); mae-mean: MAE's --global_pool, LayerNorm without affine (MAE's fc_norm at its "
           "default init) of the pre-norm patch mean; prenorm-mean: the pre-norm patch mean")
    a("--input-size", type=int, default=None, help="image size (default: the encoder's; must match it)")
    a("--num-heads", type=int, default=None, help="override the head count inferred for public checkpoints")
    a("--epochs", type=int, default=None, help="default 90; finetune: 100 (ViT-B), 50 (ViT-L/H)")
    a("--warmup-epochs", type=float, default=None, help="default 10; finetune: 5")
    a("--batch-size", type=int, default=None, help="per process; default 512 (MAE: 512 x 32 GPUs = 16384); "
                                                    "finetune: 32 (MAE: 32 x 32 GPUs = 1024)")
    a("--accum", type=int, default=1, help="gradient accumulation; effective batch = batch x procs x accum")
    a("--blr", type=float, default=None, help="base lr: lr = blr * effective batch / 256; default 0.1; finetune: "
                                               "5e-4 (ViT-B), 1e-3 (ViT-L/H)")
    a("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    a("--weight-decay", type=float, default=None, help="default 0; finetune: 0.05")
    a("--eval-every", type=int, default=1, help="evaluate every N epochs (0: only at the end)")
    a("--nb-knn", type=int, nargs="+", default=[10, 20, 100, 200],
      help="k values (1-NN is always added; a k above the number of training images is clamped to it, with a warning, "
           "and recorded as the k used)")
    a("--temperature", type=float, default=0.07, help="k-NN vote temperature T: weights exp(cos / T)")
    a("--loo", action="store_true", help="k-NN leave-one-out within the val set (Latent MIM's NN metric)")
    a("--num-workers", type=int, default=8, help="data loading processes per process")
    a("--seed", type=int, default=0, help="seed of the head's initial weights, data order and augmentation")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when there is a GPU")
    a("--synthetic-size", type=int, default=2048, help="train images of --data synthetic (val: a quarter)")
    a("--output", default=None, help="JSON-lines results file (default: probe.jsonl next to the checkpoint)")
    a("--log-every", type=int, default=20, help="running loss every N optimizer steps: in the progress bar, or "
                                                "(--mode finetune off a terminal) one line each")
    f = p.add_argument_group("--mode finetune (MAE FINETUNE.md; defaults by width: ViT-B / ViT-L, ViT-H)").add_argument
    f("--layer-decay", type=float, default=None, help="layer-wise lr decay; default 0.65 / 0.75")
    f("--drop-path", type=float, default=None, help="stochastic depth of the last block; default 0.1 / 0.2, 0.3")
    f("--min-lr", type=float, default=1e-6, help="lr at the end of the cosine (times each layer's scale)")
    f("--smoothing", type=float, default=0.1, help="label smoothing")
    f("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    f("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    f("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both are on")
    f("--randaug-ops", type=int, default=2, help="RandAugment ops per image, each applied with probability 0.5")
    f("--randaug-magnitude", type=int, default=9, help="RandAugment magnitude, 0..10")
    f("--reprob", type=float, default=0.25, help="random erasing probability")
    f("--output-dir", default=None, help="checkpoints and log.jsonl (default: finetune/ next to the checkpoint); a "
                                         "run resumes from its checkpoint.pth")
    f("--resume", default="", help="checkpoint to resume from (default: output-dir/checkpoint.pth if it exists)")
    f("--max-steps", type=int, default=0, help="stop after this many optimizer steps in total (0: no limit)")
    f("--save-every", type=int, default=0, help="also checkpoint every N optimizer steps (0: at epoch ends only)")
    f("--keep-every", type=int, default=0, help="keep a copy of the checkpoint every N epochs (0: only the latest)")
    f("--compile", action="store_true", help="torch.compile the classifier")
    return p


if __name__ == "__main__":
    run_main(main, build_parser())
