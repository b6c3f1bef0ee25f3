"""Frozen-encoder evaluation of any checkpoint: MAE's linear probe (paper appendix A.2, main_linprobe.py), a fast
cached variant, and DINO's weighted k-NN (eval_knn.py). The encoder, its read-outs (--pool) and top-k accuracy are
in eval_utils.py; end-to-end fine-tuning is finetune.py.

    python eval_probe.py --ckpt runs/latent_mim/checkpoint.pth --data synthetic --mode knn
    torchrun --nproc_per_node 8 eval_probe.py --ckpt mae_pretrain_vit_base.pth --data /imagenet --accum 4

Results: top-1 / top-5 printed and appended as one JSON line to probe.jsonl next to the checkpoint (or --output).
--shots K --trials N: few-shot transfer, N trials of K training images per class each (k-NN, or multinomial logistic
regression in place of the LARS probe), scored on the whole val split; one JSON line per trial and a summary line.
"""
import contextlib, hashlib, math, os, statistics, sys, time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from torchvision.transforms import v2
from tqdm import tqdm

from cli import ArgumentParser, UserError, add_decode_arg, check_common_args, run_main
from common import (IMAGENET_MEAN, IMAGENET_STD, SeededDataset, build_dataset, image_transform, make_loader, mix_seed,
                    set_lr, warmup_cosine)
from eval_utils import (POOLS, accuracy, add_encoder_args, append_rows, extract, extract_dataset, load_encoder,
                        output_path, report_bad)
from train_utils import Dist


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


def clamp_ks(nb_knn, voters, what, dist):
    """The k values to vote with: 1 and every requested k, a k beyond the `voters` who can vote clamped to it (with a
    warning naming `what` they are; the result is recorded under the k used)."""
    ks = sorted({min(k, voters) for k in (1, *nb_knn)})
    if max(nb_knn) > voters and dist.is_main:
        print(f"warning: k-NN: only {voters} {what} can vote; k = {', '.join(str(k) for k in nb_knn if k > voters)} "
              f"clamped to {voters} (recorded as k = {voters})", file=sys.stderr, flush=True)
    return ks


def knn_accuracy(votes, labels):
    """{str(k): {top1, top5}} of knn_votes' scores, each k's top-5 over its first min(5, k) predictions."""
    return {str(k): dict(zip(("top1", "top5"), accuracy(scores, labels, max_rank=k))) for k, scores in votes.items()}


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

    def box(self, height, width):  # (top, left, h, w): also what --decode device draws in the loader workers
        return tf_crop_params(height, width, self.scale, self.ratio)

    def __call__(self, img):
        height, width = v2.functional.get_size(img)
        return v2.functional.resized_crop(img, *self.box(height, width), [self.size, self.size],
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
    decoder = None
    if args.decode == "device":  # the workers read the JPEG bytes and draw the crops, the device decodes
        from device_decode import DecodeDataset, DeviceDecoder
        data = DecodeDataset.of(data)
        decoder = DeviceDecoder(data, dist.device)
    sampler = SeededSampler(data, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=args.seed)
    loader = make_loader(data, args.batch_size, args.num_workers, sampler, drop_last=True)

    def batches(epoch):
        sampler.set_epoch(epoch)
        for imgs, y, bad in (loader if decoder is None else decoder.batches(iter(loader))):
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
    # a bar on rank 0 on a terminal (disable=None); about ten epoch lines either way, the last and the best
    evaluations = -(-epochs // eval_every) if eval_every else 1
    line_every = max(1, round(evaluations / 10))
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
            if dist.is_main and (len(history) % line_every == 0 or epoch == epochs - 1):
                bar.write(f"epoch {epoch}: loss {row['loss']:.4f}  val top-1 {top1:.2f}  top-5 {top5:.2f}")
    best = max(history, key=lambda r: r["top1"])
    if dist.is_main:
        bar.write(f"best: epoch {best['epoch']}, val top-1 {best['top1']:.2f}  top-5 {best['top5']:.2f}")
    bar.close()
    return {"top1": history[-1]["top1"], "top5": history[-1]["top5"], "max_top1": max(r["top1"] for r in history),
            "history": history}


# ------------------------------------------------------------------------------------------------------- few-shot
def fewshot_subset(labels, num_classes, shots, seed, trial):
    """The training images of few-shot trial t: a generator seeded with mix_seed(seed, t) permutes, class by class in
    label order, the class's training indices (increasing) and the first K of each permutation are kept:

        S_t = sorted( U_c perm_t,c(I_c)[:K] ),   I_c = {i : y_i = c}                                    -> [K C] long

    A function of the labels, K, seed and t only, drawn on the CPU from its own generator: every process draws the
    same subset, whatever their number, the device, the global RNG state or the trials drawn before."""
    g, labels = torch.Generator().manual_seed(mix_seed(seed, trial)), labels.cpu()
    per_class = [(labels == c).nonzero().flatten() for c in range(num_classes)]  # [n_c] each, increasing
    return torch.cat([idx[torch.randperm(len(idx), generator=g)[:shots]] for idx in per_class]).sort().values


def subset_digest(indices):
    """The first 16 hex digits of the SHA-1 of the sorted indices as little-endian int64: trials or runs that train
    on the same images share it."""
    return hashlib.sha1(indices.cpu().to(torch.int64).numpy().astype("<i8").tobytes()).hexdigest()[:16]


def check_shots(labels, classes, shots):
    """K-shot trials need K training images in every class: one line naming the first class that has fewer."""
    counts = torch.bincount(labels.cpu(), minlength=len(classes))  # [C]
    short = (counts < shots).nonzero().flatten().tolist()
    if short:
        n, more = int(counts[short[0]]), f" (and {len(short) - 1} more classes)" if len(short) > 1 else ""
        raise UserError(f"--shots {shots}: class '{classes[short[0]]}' has only {n} training image{'s' * (n != 1)}"
                        f"{more}")


def fit_logistic_regression(feats, labels, num_classes, lambd=0.1, max_iter=1000):
    """Multinomial logistic regression on L2-normalised frozen features, no bias, as the low-shot evaluations of DINO
    and MSN (cyanure's multiclass-logistic loss with an l2 penalty, fit_intercept=False, lambda passed as lambda / n).
    With f_i = x_i / ||x_i||_2 over the n training images:

        W* = argmin_W  sum_i -log softmax(W f_i)[y_i]  +  lambda / 2 ||W||_F^2                              W: [C, D]

    minimised as its 1/n multiple (cyanure's scale, the same W*) by full-batch L-BFGS (strong Wolfe line search,
    history 20) from W = 0 in fp64: strictly convex for lambda > 0, so one optimum, reached without any random draw.
    lambda = 0.1 is DINO's (1 % of ImageNet), MSN's script uses 0.00025 (1 to 5 images per class).
    Returns (W* [C, D] fp64, max |gradient| of the 1/n objective at W*: 1e-8 or less, the line search's fp64 limit)."""
    x = F.normalize(feats.double(), dim=1)  # [n, D]
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=1e-10,
                            tolerance_change=0.0, history_size=20, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T, labels) + lambd / (2 * len(x)) * w.pow(2).sum()  # mean CE: the 1/n scale
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(objective)
        objective()  # the gradient at the returned W
    return w.detach(), float(w.grad.abs().max())


def mean_std(values):
    """(mean, sample standard deviation (n - 1 in the denominator; None for a single value)) of per-trial results."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def run_fewshot(classes, train, val, row, args, dist):
    """--shots K --trials N on features extracted once (no augmentation): trial t keeps fewshot_subset(t) of the train
    features, as the k-NN memory bank or to fit_logistic_regression, and scores the whole val split.
    -> (summary row: mean and sample std over trials, [one row per trial])."""
    (train_f, train_l), (val_f, val_l) = train, val  # [N, D], [N]; [M, D], [M]
    check_shots(train_l, classes, args.shots)
    num_classes, base = len(classes), {**row, "shots": args.shots, "trials": args.trials, "seed": args.seed}
    if args.mode == "knn":  # every trial has K C voters: one clamp, one warning
        ks = clamp_ks(args.nb_knn, args.shots * num_classes, f"training images of a {args.shots}-shot subset", dist)
        best_k = 20 if 20 in ks else ks[-1]  # DINO's k = 20, as the full k-NN
        base.update(k=best_k, nb_knn=args.nb_knn, temperature=args.temperature)
    else:
        base.update(classifier="logistic", lambd=args.lambd)
        dist.print(f"few-shot linear: multinomial logistic regression (L-BFGS, lambda {args.lambd:g}) on L2-normalised "
                   f"features extracted once; the LARS probe's flags are unused")
    rows = []
    for t in range(args.trials):
        idx = fewshot_subset(train_l, num_classes, args.shots, args.seed, t).to(train_l.device)
        if args.mode == "knn":
            knn = knn_accuracy(knn_votes(train_f[idx], train_l[idx], val_f, ks, args.temperature, num_classes), val_l)
            res = dict(top1=knn[str(best_k)]["top1"], top5=knn[str(best_k)]["top5"], knn=knn)
        else:
            w, grad_max = fit_logistic_regression(train_f[idx], train_l[idx], num_classes, args.lambd)
            top1, top5 = accuracy(F.normalize(val_f.double(), dim=1) @ w.T, val_l)  # [M, C] scores
            res = dict(top1=top1, top5=top5, grad_max=grad_max)
        rows.append({**base, "fewshot": "trial", "trial": t, "trial_seed": mix_seed(args.seed, t),
                     "subset_size": len(idx), "subset_sha1": subset_digest(idx), **res})
        dist.print(f"trial {t}: {len(idx)} images (subset {rows[-1]['subset_sha1']}): top-1 {res['top1']:.2f}  "
                   f"top-5 {res['top5']:.2f}")
    summary = {**base, "fewshot": "summary", "std": "sample standard deviation over the trials (n - 1)"}
    for key in ("top1", "top5"):
        summary[key], summary[key + "_std"] = mean_std([r[key] for r in rows])
    if args.mode == "knn":
        summary["knn"] = {k: {f"{m}{s}": v for m in ("top1", "top5")
                              for s, v in zip(("", "_std"), mean_std([r["knn"][k][m] for r in rows]))} for k in knn}
    summary["trial_top1"] = [r["top1"] for r in rows]
    return summary, rows


def check_args(args):
    check_common_args(args)
    if args.shots is None and args.trials is not None:
        raise UserError("--trials is a few-shot option (--shots K)")
    if args.lambd is not None and not (math.isfinite(args.lambd) and args.lambd > 0):
        raise UserError(f"--lambd must be a finite positive number, got {args.lambd}")
    if args.shots is not None:
        args.trials = 5 if args.trials is None else args.trials
        args.lambd = 0.1 if args.lambd is None else args.lambd  # DINO's (see fit_logistic_regression)
        if args.shots < 1 or args.trials < 1:
            raise UserError(f"--shots and --trials must be at least 1, got --shots {args.shots} --trials "
                            f"{args.trials}")
        if args.loo:
            raise UserError("--loo does not combine with --shots (it votes within the val split)")
    if min(args.nb_knn) < 1 or not args.temperature > 0:  # `not >`: also refuses nan
        raise UserError("--nb-knn values must be at least 1 and --temperature positive")
    if args.loo and args.mode != "knn":
        raise UserError("--loo is a k-NN option (--mode knn)")
    if args.cached and args.mode != "linear":
        raise UserError("--cached is a linear-probe option (--mode linear)")
    if args.decode == "device" and (args.cached or args.mode != "linear"):
        raise UserError("--decode device decodes the augmented training images of the full linear probe; k-NN and "
                        "--cached read each image once (use --decode cpu)")
    if args.decode == "device":
        from device_decode import check_device_decode
        check_device_decode(args.data)


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
    if args.shots and hasattr(train_set, "samples"):  # an image folder: the class sizes are known before extraction
        check_shots(torch.tensor([y for _, y in train_set.samples]), train_set.classes, args.shots)
    out = output_path(args) if dist.is_main else None
    t0 = time.perf_counter()
    val = extract_dataset(vit, val_set, args, dist, "val features")  # no augmentation: the same every epoch
    row = {"ckpt": str(args.ckpt), "ckpt_step": vit.checkpoint_position["step"],  # null for public checkpoints
           "ckpt_epoch": vit.checkpoint_position["epoch"], "data": str(args.data), "mode": args.mode,
           "pool": args.pool, "input_size": args.input_size, "num_classes": num_classes}
    if args.shots:
        train = extract_dataset(vit, train_set, args, dist, "train features")
        summary, trials = run_fewshot(train_set.classes, train, val, row, args, dist)
        summary["time_s"] = time.perf_counter() - t0
        if dist.is_main:
            what = f"{args.mode} {args.shots}-shot, {args.trials} trials, {Path(args.ckpt).name}"
            def pm(r, m):  # "top-1 12.34 ± 1.23": mean ± sample std over the trials of metric m ("top1") in row r
                return f"top-{m[-1]} {r[m]:.2f} ± " + ("n/a" if r[m + "_std"] is None else f"{r[m + '_std']:.2f}")
            for k, r in summary.get("knn", {}).items():
                print(f"{what}: {k}-NN {pm(r, 'top1')}  {pm(r, 'top5')}")
            print(f"{what}: {pm(summary, 'top1')}  {pm(summary, 'top5')} (mean ± sample std over trials) -> {out}",
                  flush=True)
            append_rows(out, *trials, summary)
        dist.close()
        return summary
    if args.mode == "knn":
        train = val if args.loo else extract_dataset(vit, train_set, args, dist, "train features")
        voters = len(train[0]) - int(args.loo)  # the neighbours a val image can have
        if voters < 1:
            raise UserError(f"k-NN needs at least {1 + int(args.loo)} images in the {'val' if args.loo else 'train'} "
                            f"split")
        ks = clamp_ks(args.nb_knn, voters, f"{'other val' if args.loo else 'training'} images", dist)
        knn = knn_accuracy(knn_votes(*train, val[0], ks, args.temperature, num_classes, exclude_self=args.loo), val[1])
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
        append_rows(out, row)
    dist.close()
    return row


def build_parser():
    p = ArgumentParser(prog="eval_probe.py", description="Linear probe (MAE protocol) or k-NN (DINO) of a frozen ViT "
                                                         "encoder (fine-tuning: finetune.py)")
    add_encoder_args(p)
    a = p.add_argument
    a("--mode", default="linear", choices=["linear", "knn"], help="linear probe of the frozen encoder, or k-NN on its "
                                                                 "features")
    a("--cached", action="store_true", help="linear: train on features extracted once without augmentation")
    a("--pool", default=None, choices=POOLS,
      help="default: the checkpoint method's read-out (prenorm-mean for latent_mim, mae-mean for finetune, else "
           "cls). cls: cls token after the final norm; mean: mean of the patch tokens each after the encoder's final "
           "norm (its trained affine); mae-mean: MAE's --global_pool, LayerNorm without affine (MAE's fc_norm at its "
           "default init) of the pre-norm patch mean; prenorm-mean: the pre-norm patch mean")
    a("--epochs", type=int, default=90, help="linear probe epochs")
    a("--warmup-epochs", type=float, default=10, help="linear lr warmup, in (fractional) epochs")
    a("--batch-size", type=int, default=512, help="per process (MAE: 512 x 32 GPUs = 16384)")
    a("--accum", type=int, default=1, help="gradient accumulation; effective batch = batch x procs x accum")
    a("--blr", type=float, default=0.1, help="base lr: lr = blr * effective batch / 256")
    a("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    a("--weight-decay", type=float, default=0.0, help="LARS weight decay")
    a("--eval-every", type=int, default=1, help="evaluate every N epochs (0: only at the end)")
    a("--nb-knn", type=int, nargs="+", default=[10, 20, 100, 200],
      help="k values (1-NN is always added; a k above the number of training images is clamped to it, with a warning, "
           "and recorded as the k used)")
    a("--temperature", type=float, default=0.07, help="k-NN vote temperature T: weights exp(cos / T)")
    a("--loo", action="store_true", help="k-NN leave-one-out within the val set (Latent MIM's NN metric)")
    a("--shots", type=int, default=None,
      help="few-shot transfer: K training images per class in each trial, features extracted once without "
           "augmentation, every trial scored on the whole val split; --mode knn: the K-shot subset is the memory "
           "bank; --mode linear: multinomial logistic regression (L-BFGS, --lambd) on L2-normalised features as "
           "DINO's and MSN's low-shot evaluations, in place of MAE's LARS probe, which is not a few-shot protocol "
           "(--cached implied; --epochs, --lr and the other LARS flags unused) (default: none: the whole train split)")
    a("--trials", type=int, default=None, help="few-shot trials; trial t draws its subset with seed mix_seed(--seed, "
                                               "t); mean and sample std over them (default: 5 with --shots)")
    a("--lambd", type=float, default=None, help="few-shot logistic regression: lambda of sum_i CE_i + lambda / 2 "
                                                "||W||^2; MSN uses 0.00025 (default: DINO's 0.1 with --shots)")
    a("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="data loading processes per process")
    a("--seed", type=int, default=0, help="seed of the head's initial weights, data order and augmentation, and of "
                                          "the few-shot subsets")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when there is a GPU")
    a("--log-every", type=int, default=20, help="running loss every N optimizer steps in the progress bar")
    add_decode_arg(p)
    return p


if __name__ == "__main__":
    run_main(main, build_parser())
