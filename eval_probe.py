"""Frozen-encoder evaluation of any checkpoint: MAE's linear probe (paper appendix A.2, main_linprobe.py), a fast
cached variant, and DINO's weighted k-NN (eval_knn.py).

The encoder is read with common.load_vit: the method-independent format that semmae.py, latent_mim.py and pcae.py
write (`encoder` + `encoder_args`), or a public ViT checkpoint with the common key names (MAE, DINO, iBOT, timm),
found under the usual top-level keys with wrapper prefixes (module., encoder., backbone., _orig_mod.) stripped.

    python eval_probe.py --ckpt out/checkpoint.pth --data synthetic --mode knn
    torchrun --nproc_per_node 8 eval_probe.py --ckpt mae_pretrain_vit_base.pth --data /imagenet --accum 4

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
import argparse, contextlib, json, math, sys, time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, Subset
from tqdm import tqdm

from torchvision.transforms import v2

from common import (IMAGENET_MEAN, IMAGENET_STD, Dist, SeededDataset, UserError, autocast, build_dataset,
                    eval_transform, gather_rows, image_transform, load_vit, make_loader, mix_seed, run_main, set_lr,
                    warmup_cosine)


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
    kmax = min(max(ks), len(train) - int(exclude_self))
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
    neighbour voted for, get a fixed order, so a result does not depend on the device or the sort kernel."""
    s_y = scores.gather(1, labels[:, None])  # [N, 1]
    cls = torch.arange(scores.shape[1], device=scores.device)
    return (scores > s_y).sum(1) + ((scores == s_y) & (cls < labels[:, None])).sum(1)


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
    for imgs, y, bad in tqdm(loader, desc=desc, disable=not dist.is_main, dynamic_ncols=True, mininterval=1.0):
        report_bad(bad, dataset)
        feats.append(extract(vit, imgs.to(dist.device, non_blocking=True), args.pool))
        labels.append(y.to(dist.device, non_blocking=True))
    return gather_rows(dist, torch.cat(feats), len(data)), gather_rows(dist, torch.cat(labels), len(data))


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
    bar = tqdm(total=epochs * steps, desc="linear probe", disable=not dist.is_main, dynamic_ncols=True,
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
                if bar.n % log_every == 0 and dist.is_main:
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
    dist.print(f"encoder: ViT width {cfg['embed_dim']}, depth {cfg['depth']}, {cfg['num_heads']} heads, "
               f"{cfg['img_size']} px, {grid}x{grid} patches of {cfg['patch_size']} px, pool {args.pool}")
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
    if min(args.nb_knn) < 1 or args.temperature <= 0:
        raise UserError("--nb-knn values must be at least 1 and --temperature positive")
    if args.num_workers < 0 or args.eval_every < 0 or args.synthetic_size < 1:
        raise UserError("--num-workers and --eval-every must be non-negative, --synthetic-size positive")
    if args.loo and args.mode != "knn":
        raise UserError("--loo is a k-NN option (--mode knn)")
    if args.cached and args.mode != "linear":
        raise UserError("--cached is a linear-probe option (--mode linear)")


def main(args):
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
    row = {"ckpt": str(args.ckpt), "data": str(args.data), "mode": args.mode, "pool": args.pool,
           "input_size": args.input_size, "num_classes": num_classes}
    if args.mode == "knn":
        train = val if args.loo else extract_dataset(vit, train_set, args, dist, "train features")
        ks = sorted({1, *args.nb_knn})
        votes = knn_votes(*train, val[0], ks, args.temperature, num_classes, exclude_self=args.loo)
        knn = {str(k): dict(zip(("top1", "top5"), accuracy(votes[k], val[1], max_rank=k))) for k in ks}
        for k in ks:
            dist.print(f"{k}-NN: top-1 {knn[str(k)]['top1']:.2f}  top-5 {knn[str(k)]['top5']:.2f}")
        best_k = 1 if args.loo else 20 if 20 in ks else ks[-1]  # Latent MIM reports leave-one-out 1-NN, DINO k = 20
        row.update(top1=knn[str(best_k)]["top1"], top5=knn[str(best_k)]["top5"], k=best_k, knn=knn,
                   loo=args.loo, temperature=args.temperature)
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
    p = argparse.ArgumentParser(description="Linear probe (MAE protocol) or k-NN (DINO) of a frozen ViT encoder")
    a = p.add_argument
    a("--ckpt", required=True, help="checkpoint of semmae.py / latent_mim.py / pcae.py, or a public MAE/DINO/iBOT/"
                                    "timm ViT checkpoint")
    a("--data", required=True, help="folder with train/<class>/* and val/<class>/*, or 'synthetic'")
    a("--mode", default="linear", choices=["linear", "knn"])
    a("--cached", action="store_true", help="linear: train on features extracted once without augmentation")
    a("--pool", default="cls", choices=POOLS,
      help="cls: cls token after the final norm; mean: mean of the patch tokens each after the encoder's final norm "
           "(its trained affine); mae-mean: MAE's --global_pool, LayerNorm without affine (MAE's fc_norm at its "
           "default init) of the pre-norm patch mean; prenorm-mean: the pre-norm patch mean")
    a("--input-size", type=int, default=None, help="image size (default: the encoder's; must match it)")
    a("--num-heads", type=int, default=None, help="override the head count inferred for public checkpoints")
    a("--epochs", type=int, default=90)
    a("--warmup-epochs", type=float, default=10)
    a("--batch-size", type=int, default=512, help="per process (MAE: 512 x 32 GPUs = 16384)")
    a("--accum", type=int, default=1, help="gradient accumulation; effective batch = batch x procs x accum")
    a("--blr", type=float, default=0.1, help="base lr: lr = blr * effective batch / 256")
    a("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    a("--weight-decay", type=float, default=0.0)
    a("--eval-every", type=int, default=1, help="evaluate every N epochs (0: only at the end)")
    a("--nb-knn", type=int, nargs="+", default=[10, 20, 100, 200], help="k values (1-NN is always added)")
    a("--temperature", type=float, default=0.07, help="k-NN vote temperature T: weights exp(cos / T)")
    a("--loo", action="store_true", help="k-NN leave-one-out within the val set (Latent MIM's NN metric)")
    a("--num-workers", type=int, default=8)
    a("--seed", type=int, default=0)
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--synthetic-size", type=int, default=2048, help="train images of --data synthetic (val: a quarter)")
    a("--output", default=None, help="JSON-lines results file (default: probe.jsonl next to the checkpoint)")
    a("--log-every", type=int, default=20, help="progress bar refresh interval in steps")
    return p


if __name__ == "__main__":
    run_main(main, build_parser())
