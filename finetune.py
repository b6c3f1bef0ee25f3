"""MAE's end-to-end fine-tuning of any checkpoint's encoder (the paper's appendix; FINETUNE.md, main_finetune.py,
util/lr_decay.py, models_vit.py), which SemMAE and PCAE reuse: the whole encoder with a new linear head, layer-wise lr
decay, RandAugment, random erasing, mixup / cutmix and label smoothing, in the loop of the method files (TrainRun).

    python finetune.py --ckpt runs/pcae/checkpoint.pth --data synthetic
    torchrun --nproc_per_node 8 finetune.py --ckpt mae_pretrain_vit_base.pth --data /imagenet --batch-size 128

Output: checkpoint.pth (the last), checkpoint-best.pth (best top-1) and log.jsonl (train loss, lr, val top-1 / top-5 /
loss every --eval-every epochs) in --output-dir; the final numbers in probe.jsonl next to the checkpoint (--output).
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Subset
from torchvision.transforms import v2

from cli import ArgumentParser, UserError, add_run_args, check_common_args, check_lr_and_device, run_main, stop_signal
from common import (IMAGENET_MEAN, IMAGENET_STD, SeededDataset, build_dataset, eval_transform, image_transform,
                    make_loader, mix_seed, seeded_draws)
from eval_utils import add_encoder_args, append_rows, label_rank, load_encoder, output_path, report_bad
from train_utils import Dist, TrainRun, autocast, encoder_export, load_checkpoint, save_checkpoint


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
    normal noise: timm's 'pixel' mode) after the normalisation. Deviations from timm 0.3.2, all torchvision's (listed
    in docs/probe.md): no magnitude noise (mstd0.5), an Identity op for Invert / SolarizeAdd, Posterize keeps 4 bits,
    bilinear geometric ops, uint8 tensors instead of PIL images; 11 magnitude bins make 9 mean 9/10, as in timm."""
    fill = [round(255 * m) for m in IMAGENET_MEAN]  # timm's img_mean: (124, 116, 104)
    randaug = [v2.RandomApply([v2.RandAugment(1, randaug_magnitude, 11, v2.InterpolationMode.BILINEAR, fill)], p=0.5)
               for _ in range(randaug_ops)]
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True,
                                                          interpolation=v2.InterpolationMode.BICUBIC),
                       v2.RandomHorizontalFlip(), *randaug, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                       v2.RandomErasing(reprob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random")])


class BatchMix:
    """MAE's mixup / cutmix with label smoothing (timm's Mixup, mode 'batch', prob 1, as main_finetune.py sets it):
    a micro-batch is mixed with itself in another order, one lambda for the whole batch. When both are on, CutMix
    with probability switch_prob, else MixUp:

        MixUp:   lambda ~ Beta(mixup, mixup),    x <- lambda x + (1 - lambda) x'
        CutMix:  lambda ~ Beta(cutmix, cutmix),  a box of about (1 - lambda) of the image pasted from x', clipped to
                 the image; then lambda <- 1 - box area / image area (timm's correct_lam)
        targets: t = lambda y + (1 - lambda) y',  y = (1 - eps) onehot + eps / C  (eps = smoothing; rows sum to 1)

    torchvision's v2.MixUp / v2.CutMix draw from torch's default CPU generator, seeded for the call with (seed, step,
    the micro-batch's place in the step's global batch): a resume repeats the draws, 2 processes equal 1 x accum 2.
    Deviations (torchvision's): the partner x' is the previous image (timm: the mirrored one), the CutMix box has
    half-sides int(0.5 sqrt(1 - lambda) W) (timm: int(sqrt(1 - lambda) W) // 2); smoothing after mixing is the same."""
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
            with seeded_draws(seed):
                imgs, targets = self.mix(imgs, labels)
        return imgs, targets * (1.0 - self.smoothing) + self.smoothing / self.num_classes


@torch.no_grad()
def evaluate_classifier(model, loader, dist, dataset=None):
    """{top1, top5 (percent), val_loss (mean cross-entropy)} of model.logits on the val images (Resize + CenterCrop,
    eval mode), as MAE's engine_finetune.evaluate. Each process takes its share of the images and the counts are
    summed over processes, so every image counts once. Ranks as label_rank (ties in class order). A stop signal
    between batches ends the pass early and returns {}: the run saves and exits, and its resume evaluates again."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=dist.device)  # top-1 hits, top-5 hits, cross-entropy
    images = 0  # this process's images, counted on the host
    for imgs, labels, bad in loader:
        if stop_signal() is not None:
            break
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
    sums = torch.cat([sums, sums.new_tensor([images, stop_signal() is not None])])  # one copy, after the loop
    top1, top5, loss, n, stopped = (dist.all_reduce_mean(sums) * dist.world).tolist()
    if stopped:
        return {}
    n = max(round(n), 1)
    return dict(top1=100.0 * round(top1) / n, top5=100.0 * round(top5) / n, val_loss=loss / n)


def check_args(args):
    """The flags that no constructor checks (the recipe's defaults by width are filled in first)."""
    check_common_args(args)
    if not (0 < args.layer_decay <= 1 and 0 <= args.drop_path < 1 and 0 <= args.smoothing < 1 and args.min_lr >= 0):
        raise UserError("--layer-decay must be in (0, 1], --drop-path and --smoothing in [0, 1), --min-lr >= 0")
    if not (args.mixup >= 0 and args.cutmix >= 0 and 0 <= args.mixup_switch_prob <= 1 and 0 <= args.reprob <= 1):
        raise UserError("--mixup and --cutmix must be >= 0, --mixup-switch-prob and --reprob in [0, 1]")
    if args.randaug_ops < 0 or not 0 <= args.randaug_magnitude <= 10:
        raise UserError("--randaug-ops must be >= 0 and --randaug-magnitude in 0..10")


def main(args):
    check_lr_and_device(args)  # before a process picks its device
    vit = load_encoder(args, Dist(args.device))  # sets --input-size from the encoder
    for k, v in FINETUNE_RECIPES.get(vit.embed_dim, FINETUNE_RECIPES[768]).items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    args.output_dir = args.output_dir or str(Path(args.ckpt).parent / "finetune")
    check_args(args)
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
    run.resume(model, optimizer, model.vit)  # exported in every checkpoint: the fine-tuned encoder, for load_vit
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
        for step in run.steps():
            set_layer_lr(optimizer, run.lr(step, 0.0, end_frac))
            step_loss = 0.0
            for micro in range(args.accum):
                imgs, labels = run.next_batch()
                slot = micro * run.dist.world + run.dist.rank  # the micro-batch's place in the step's global batch
                imgs, targets = mix(imgs, labels, mix_seed(args.seed, step, slot))
                with run.no_sync(ddp_model, micro), autocast(run.device):
                    loss, metrics = ddp_model(imgs, run.step_random(step, micro), targets)
                (loss / args.accum).backward()
                step_loss += loss.detach() / args.accum
            optimizer.step()  # no gradient clipping (MAE: --clip_grad None)
            optimizer.zero_grad(set_to_none=True)
            run.step_done(step, step_loss, metrics)
        due = args.eval_every and (epoch + 1) % args.eval_every == 0 or epoch == args.epochs - 1
        evaluated = evaluate_classifier(model, val_loader, run.dist, val_set) if run.epoch_complete and due else {}
        stop = run.end_epoch(**evaluated)  # saves; True once --max-steps is reached
        if evaluated:
            row.update(top1=evaluated["top1"], top5=evaluated["top5"], max_top1=max(evaluated["top1"], best))
        if evaluated and evaluated["top1"] > best:
            best = evaluated["top1"]
            best_state = {"model": model.state_dict(), "epoch": epoch, **evaluated, "args": vars(args),
                          **encoder_export(model.vit, "finetune")}
            # rank 0 writes; a failure there (a full disk) stops every process instead of leaving them waiting
            run.all_processes(lambda: save_checkpoint(best_path, best_state) if run.dist.is_main else None)
        if stop:
            break
    run.finish()
    row["epochs_done"] = run.epoch  # fewer than --epochs after --max-steps: no line in probe.jsonl
    if run.dist.is_main and run.epoch == args.epochs and row["top1"] is not None:
        print(f"finetune {Path(args.ckpt).name}: top-1 {row['top1']:.2f}  top-5 {row['top5']:.2f}  (best top-1 "
              f"{row['max_top1']:.2f})  -> {out}", flush=True)
        append_rows(out, row)
    return row


def build_parser():
    p = ArgumentParser(prog="finetune.py", description="MAE's end-to-end fine-tuning of a pretrained ViT encoder "
                                                       "(defaults by width: ViT-B / ViT-L, ViT-H, as FINETUNE.md)")
    add_encoder_args(p)
    a = p.add_argument
    a("--pool", default="mae-mean", choices=FINETUNE_POOLS, help="mae-mean: a trained fc_norm of the pre-norm patch "
                                                                 "mean (MAE's --global_pool); cls: the cls token")
    a("--epochs", type=int, default=None, help="default 100 (ViT-B), 50 (ViT-L/H)")
    a("--warmup-epochs", type=float, default=5, help="linear lr warmup, in (fractional) epochs")
    a("--batch-size", type=int, default=32, help="per process (MAE: 32 x 32 GPUs = 1024)")
    a("--accum", type=int, default=1, help="gradient accumulation; effective batch = batch x procs x accum")
    a("--blr", type=float, default=None, help="base lr: lr = blr * effective batch / 256; default 5e-4 (ViT-B), "
                                               "1e-3 (ViT-L/H)")
    a("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    a("--weight-decay", type=float, default=0.05, help="AdamW weight decay (none on 1-D parameters, cls_token and "
                                                       "pos_embed)")
    a("--layer-decay", type=float, default=None, help="layer-wise lr decay; default 0.65 / 0.75")
    a("--drop-path", type=float, default=None, help="stochastic depth of the last block; default 0.1 / 0.2, 0.3")
    a("--min-lr", type=float, default=1e-6, help="lr at the end of the cosine (times each layer's scale)")
    a("--smoothing", type=float, default=0.1, help="label smoothing")
    a("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    a("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    a("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both are on")
    a("--randaug-ops", type=int, default=2, help="RandAugment ops per image, each applied with probability 0.5")
    a("--randaug-magnitude", type=int, default=9, help="RandAugment magnitude, 0..10")
    a("--reprob", type=float, default=0.25, help="random erasing probability")
    a("--eval-every", type=int, default=1, help="evaluate every N epochs (0: only at the end)")
    a("--output-dir", default=None, help="checkpoints and log.jsonl (default: finetune/ next to the checkpoint); a "
                                         "run resumes from its checkpoint.pth")
    add_run_args(p)
    p.free_on_resume("eval_every", "output")
    return p


if __name__ == "__main__":
    run_main(main, build_parser())
