"""What the evaluations share: the encoder of any checkpoint (load_vit: this project's format or a public ViT), its
frozen features (no gradient, bf16 autocast on CUDA, eval mode) and top-k accuracy. The read-outs, with x_L[i] token
i after the last block (0 = cls), LN_g,b the encoder's final norm and LN_1,0 one without affine:
    cls:          LN_g,b(x_L[0])                     MAE linprobe default (--cls_token) / DINO k-NN default
    mean:         mean_i LN_g,b(x_L[i])              mean of the patch tokens, each after the encoder's own final norm
    mae-mean:     LN_1,0(mean_i x_L[i])              MAE's --global_pool probe exactly (models_vit.py)
    prenorm-mean: mean_i x_L[i]                      Latent MIM's NN feature (with --mode knn --loo)
MAE's --global_pool feeds the pre-norm patch mean to a new fc_norm, a LayerNorm that the checkpoint lacks and the
probe freezes at its default init (g = 1, b = 0), hence LN_1,0; `mean` normalises before averaging, which is not the
same. The affine does not matter for the linear probe (its BatchNorm1d without affine removes it), but for k-NN.
"""
import json, math, sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from tqdm import tqdm

from cli import UserError
from common import VIT_PRESETS, SeededDataset, ViT, eval_transform, image_transform, make_loader
from train_utils import autocast, gather_rows, load_checkpoint, load_state


# ------------------------------------------------------------------------------------------------ encoder, features
ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")
STATE_DICT_KEYS = ("encoder", "teacher", "target_encoder", "model", "state_dict", "student", "module", "net")
STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.", "student.", "teacher.", "model.")


def find_encoder_state(ckpt):
    """The ViT keys of a checkpoint of this project or a public one (MAE, DINO, iBOT, timm), wrapper prefixes
    (module., _orig_mod., backbone., ...) removed however they are stacked; decoders, heads and fc_norm dropped."""
    for cand in [ckpt] + [ckpt[k] for k in STATE_DICT_KEYS if isinstance(ckpt.get(k), dict)]:
        state = {}
        for k, v in cand.items():
            while k.startswith(STRIP_PREFIXES):
                k = k.split(".", 1)[1]
            if torch.is_tensor(v):
                state[k] = v
        if "patch_embed.proj.weight" in state:
            return {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
    return None


def vit_config_from_state_dict(state):
    """Infer the ViT constructor arguments from the shapes of an encoder state dict (public checkpoints)."""
    try:
        w = state["patch_embed.proj.weight"]  # [D, C, p, p]
        dim, chans, patch = w.shape[0], w.shape[1], w.shape[2]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        grid = math.isqrt(state["pos_embed"].shape[1] - 1) if "pos_embed" in state else 224 // patch
    except (KeyError, ValueError, IndexError, AttributeError) as e:
        raise UserError(f"not a ViT encoder state dict (missing {e})") from None
    # shapes do not give the head count: take it from the preset of the same width and depth, else 64-wide heads
    heads = next((h for d, n, h, _ in VIT_PRESETS.values() if (d, n) == (dim, depth)), max(dim // 64, 1))
    return dict(img_size=grid * patch, patch_size=patch, in_chans=chans, embed_dim=dim, depth=depth, num_heads=heads,
                mlp_ratio=hidden / dim)


def load_vit(path, num_heads=None):
    """The encoder of any checkpoint, strictly: this project's format (encoder + encoder_args) or a public ViT
    (architecture from the shapes; `num_heads` overrides the head count, which shapes cannot tell).
    `vit.checkpoint_position`: step, epoch and method of this project's checkpoints (None for public ones)."""
    ckpt = load_checkpoint(path)
    if isinstance(ckpt.get("encoder_args"), dict) and isinstance(ckpt.get("encoder"), dict):
        config, state = ckpt["encoder_args"], ckpt["encoder"]
    else:
        state = find_encoder_state(ckpt)
        if state is None:
            raise UserError(f"{path} contains no ViT encoder (no patch_embed.proj.weight under "
                            f"{', '.join(STATE_DICT_KEYS)})")
        config = vit_config_from_state_dict(state)
    if num_heads:
        config = {**config, "num_heads": num_heads}
    vit = ViT(**config)
    load_state(vit, state, "the encoder", path)
    ours = "encoder_args" in ckpt and "method" in ckpt  # the training position: this project's checkpoints only
    vit.checkpoint_position = {k: ckpt.get(k) if ours else None for k in ("step", "epoch", "method")}
    return vit


def add_encoder_args(parser):
    """The flags of every evaluation: the checkpoint, the data, the encoder's size and heads, the results file."""
    a = parser.add_argument
    a("--ckpt", required=True, help="checkpoint of semmae.py / latent_mim.py / pcae.py, or a public MAE/DINO/iBOT/"
                                    "timm ViT checkpoint")
    a("--data", required=True, help="folder with train/<class>/* and val/<class>/*, or 'synthetic'")
    a("--input-size", type=int, default=None, help="image size (default: the encoder's; must match it)")
    a("--num-heads", type=int, default=None, help="override the head count inferred for public checkpoints")
    a("--synthetic-size", type=int, default=2048, help="train images of --data synthetic (val: a quarter)")
    a("--output", default=None, help="JSON-lines results file (default: probe.jsonl next to the checkpoint)")


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
        open(path, "a").close()  # fail now, not after hours of evaluation
    except OSError as e:
        raise UserError(f"cannot write the results to {path} ({e.strerror or e}); pass --output") from None
    return path


def append_rows(path, *rows):
    """Append result rows to a .jsonl file, one JSON object per line, in one write."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))


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


# ----------------------------------------------------------------------------------------------------------- top-k
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

