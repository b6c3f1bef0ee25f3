"""Latent MIM: masked image modeling in latent space (Wei, Gupta, Morgado, ECCV 2024, arXiv 2407.15837).

An online ViT encodes a few visible patches (20 of 196); a decoder predicts the latent features that a momentum
(EMA) copy of the encoder gives to the hidden target patches; the loss compares latents, not pixels. The paper names
four challenges of Latent MIM, each answered by an ablation table; every row is one flag here: "joint online/target
optimization results in representation collapse" (--target), "direct reconstruction is conducive to trivial
solutions" (--loss), "effective learning requires low correlation between visible and target patches" (--mask-ratio,
--gap, --sim-weight), "decoder must be designed for latent reconstruction with latent conditioning" (--decoder, --proj).
Official code: github.com/yibingwei-1/LatentMIM (models_lmim.py, vits.py, xvits.py, main_lmim.py).

    torchrun --nproc_per_node=8 latent_mim.py --data /imagenet          # the paper's ImageNet recipe (defaults)
    python latent_mim.py --recipe demo --data synthetic                 # CPU demo (--help lists the recipes)
"""
import copy, math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from cli import (ArgumentParser, UserError, add_bench_args, add_common_args, add_decoder_args, check_common_args,
                 run_main)
from common import (Attention, MAEDecoder, Mlp, SeededDataset, StepRandom, build_adamw, build_dataset, build_vit,
                    cosine_schedule, ema_momentum, ema_update, gather_tokens, image_transform,
                    init_weights_mae, mix_seed, patchify, pretrain_transform, random_masking, set_lr,
                    standardize_tokens)
from figures import denormalize, figure_line, sample_across_classes, save_figure
from train_utils import TrainRun, autocast, pick_device

METHOD = "latent_mim"
TARGETS = ("momentum", "shared-stopgrad", "independent", "joint")
LOSSES = ("mse", "l1", "huber", "patchdisc")
DECODERS = ("self", "cross", "cross-cues")


# ------------------------------------------------------------------------------------ non-contiguous grid, masking
def gap_patchify(imgs, patch_size, gap, offsets=None, rng=None):
    """[B, C, H, W] with H = gh (p + gap), W = gw (p + gap) -> [B, gh gw, p*p*C] (patchify's (p, q, c) order).
    The paper's non-contiguous grid: the image is cut into cells of p + gap pixels; from each cell one p x p patch is
    cropped at offset (oy, ox), each uniform in {0..gap-1} per image, cell and axis, so neighbouring patches are
    1..2 gap - 1 pixels apart. offsets [B, L, 2] (row, column), or drawn from rng (the step's StepRandom).
    gap = 0 is plain `patchify`."""
    B, C, H, W = imgs.shape
    cell = patch_size + gap
    if H % cell or W % cell:
        raise ValueError(f"image {H}x{W} is not a grid of {patch_size}+{gap} pixel cells")
    if gap == 0:
        return patchify(imgs, patch_size)
    if offsets is None:
        if rng is None:
            raise ValueError("gap_patchify needs the patch offsets or the rng to draw them from")
        offsets = rng.randint(gap, (H // cell) * (W // cell), 2)  # [B, L, 2]
    cells = rearrange(imgs, "b c (h s) (w t) -> b (h w) (s t) c", s=cell, t=cell)  # [B, L, cell*cell, C]
    i = torch.arange(patch_size, device=imgs.device)
    rows, cols = offsets[..., :1] + i, offsets[..., 1:] + i  # [B, L, p] pixel rows / columns inside each cell
    flat = (rows[..., :, None] * cell + cols[..., None, :]).flatten(2)  # [B, L, p*p], (p, q) order
    return torch.gather(cells, 2, flat[..., None].expand(-1, -1, -1, C)).flatten(2)  # [B, L, p*p*C]


def num_visible(num_patches, mask_ratio):
    """Visible count V = round(L (1 - ratio)): 0.9 -> 20 of 196 (the paper's '0.9' is 176 targets), 0.75 -> 49."""
    return int(round(num_patches * (1.0 - mask_ratio)))


# ---------------------------------------------------------------------------------------------------------- losses
def patch_discrimination_loss(pred, target, tau=0.2):
    """Delta_PatchDisc^k = -tau log( exp(sim(z^_k, z_k)/tau) / sum_{l in T} exp(sim(z^_k, z_l)/tau) ),
    sim = cosine; mean over images and target patches k. pred, target [B, T, D].
    The negatives l are the other targets of the SAME image (no cross-image negatives). The paper prints
    exp(-sim/tau), a sign typo (it would push each prediction away from its own target); the official code uses
    +sim/tau. It also scales by 2 tau; we keep the equation's tau and halve R's weight (0.05 for its 0.1), so our
    total loss is exactly half the official one and AdamW (blind to the loss scale, up to its eps) steps the same."""
    with torch.autocast(pred.device.type, enabled=False):  # softmax over 176 logits / 0.2 in fp32
        p, t = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
        logits = p @ t.transpose(1, 2) / tau  # [B, T, T]: sim(z^_k, z_l) / tau
        return -tau * logits.log_softmax(-1).diagonal(dim1=1, dim2=2).mean()


def latent_loss(pred, target, kind, tau=0.2, delta=1.0):
    """Mean over images and target patches k of the paper's per-patch Delta^k (pred, target [B, T, D]):
    Delta_L2 = ||z^_k - z_k||_2^2,  Delta_L1 = ||z^_k - z_k||_1,
    Delta_Huber = 1/2 Delta_L2 if Delta_L2 < delta^2 else delta (Delta_L1 - delta/2),
    Delta_PatchDisc: see `patch_discrimination_loss`.
    (decision) Huber per channel, e = z^_kc - z_kc: 1/2 e^2 if |e| < delta else delta (|e| - delta/2), summed over
    channels c as L1 and L2 are. On the whole vector of 768 standardised channels, Delta_L2 < 1 needs an RMS error
    below 0.04: the quadratic branch would never be taken, and Huber (NN 24.3) could not differ from L1 (15.2)."""
    if kind == "patchdisc":
        return patch_discrimination_loss(pred, target, tau)
    diff = pred.float() - target.float()  # [B, T, D]
    if kind == "mse":
        return diff.pow(2).sum(-1).mean()
    if kind == "l1":
        return diff.abs().sum(-1).mean()
    if kind == "huber":
        e = diff.abs()  # [B, T, D], per channel
        return torch.where(e < delta, 0.5 * e.pow(2), delta * (e - delta / 2)).sum(-1).mean()
    raise ValueError(f"unknown loss {kind!r}; choose from {', '.join(LOSSES)}")


def pred_to_unit(pred, eps=1e-4):
    """Official 'pred2unit' before PatchDisc: standardise predictions per image and channel over the target
    positions, x^ <- (x^ - mean_t) / (std_t + 1e-4). [B, T, D] -> [B, T, D]."""
    pred = pred.float()
    return (pred - pred.mean(1, keepdim=True)) / (pred.std(1, keepdim=True) + eps)


def mean_pairwise_cosine(z):
    """E_{i,j}[sim(z_i, z_j)] over all pairs of one image including i = j, per image: [B, N, D] -> [B].
    Computed as ||mean_i z_i/||z_i|| ||^2, which equals the mean of the N x N cosine matrix at O(N D) cost."""
    return F.normalize(z.float(), dim=-1).mean(1).pow(2).sum(-1)


def similarity_regularizer(pred, visible, gamma):
    """R = (gamma - E_{i,j in T}[sim(z^_i, z^_j)])^2 + (gamma - E_{i,j in V}[sim(z_i, z_j)])^2, averaged over images.
    pred [B, T, D] raw decoder outputs, visible [B, V, D] online (projected) visible tokens.
    (decision) R is computed per image and then averaged; the official code squares the batch-mean similarity. Per
    image is the paper's equation and keeps the loss a mean of per-image terms, so DDP and accumulation are exact."""
    return ((gamma - mean_pairwise_cosine(pred)) ** 2 + (gamma - mean_pairwise_cosine(visible)) ** 2).mean()


# ---------------------------------------------------------------------------------------------------------- decoder
def visual_cue_weights(pos_target, pos_visible):
    """Softmax(P_T P_V^T / sqrt(d)): how much each target position draws on each visible one. pos_target [B, T, d],
    pos_visible [B, V, d] -> [B, T, V]. The paper's formula as we have it shows no 1/sqrt(d); the official code has
    it. fp32, autocast off, as the PatchDisc logits: logits reach d/2 / sqrt(d) = 11.3; in bf16 weights err up to 6%."""
    with torch.autocast(pos_target.device.type, enabled=False):
        d = pos_target.shape[-1]
        return (pos_target.float() @ pos_visible.float().transpose(1, 2) / math.sqrt(d)).softmax(-1)


def visual_cue_queries(mask_token, pos_target, pos_visible, z_visible):
    """m_i = m + p_t + Softmax(P_T P_V^T / sqrt(d)) Z_V: the mask token plus the target's position plus visible
    features averaged with purely positional weights (`visual_cue_weights`). mask_token [D] or [1, 1, D]; pos_target
    [B, T, D] and pos_visible [B, V, D] from the fp32 table; z_visible [B, V, D] -> [B, T, D] fp32, as the official
    queries (promoted by its fp32 mask token and position table)."""
    weights = visual_cue_weights(pos_target, pos_visible)  # [B, T, V]
    with torch.autocast(pos_target.device.type, enabled=False):
        cues = weights @ z_visible.float()  # [B, T, D]
        return mask_token.float().reshape(1, 1, -1) + pos_target.float() + cues


class CrossAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.kv_proj, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, q, kv):  # q [B, Nq, d], kv [B, Nkv, d]
        q = rearrange(self.q_proj(q), "b n (h e) -> b h n e", h=self.num_heads)
        k, v = rearrange(self.kv_proj(kv), "b n (two h e) -> two b h n e", two=2, h=self.num_heads)
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n e -> b n (h e)"))


class CrossBlock(nn.Module):
    """Pre-LN decoder block: q += SelfAttn(LN(q)); q += CrossAttn(LN(q), LN(kv)); q += MLP(LN(q))."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2q, self.norm2kv = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm3, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q, kv):
        q = q + self.self_attn(self.norm1(q))
        q = q + self.cross_attn(self.norm2q(q), self.norm2kv(kv))
        return q + self.mlp(self.norm3(q))


class CrossDecoder(MAEDecoder):
    """The paper's cross-attention decoder (decoder table): the target queries attend to themselves and to fixed
    keys / values [cls, z_V + p_V] (the same in every block). Queries m + p_t ('cross') or the visual-cue queries
    m_i = m + p_t + Softmax(P_T P_V^T / sqrt(d)) Z_V ('cross-cues'), after a query token (zero position) dropped at
    the end. Embedding, mask token (zero init, as the official code), positions, norm and head are MAEDecoder's."""
    def __init__(self, enc_dim, grid_size, decoder_dim=512, decoder_depth=3, decoder_heads=16, cues=True):
        super().__init__(enc_dim, grid_size, enc_dim, decoder_dim, decoder_depth, decoder_heads, mask_token_std=0.0,
                         make_block=lambda: CrossBlock(decoder_dim, decoder_heads))
        self.cues = cues
        self.query_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.normal_(self.query_token, std=0.02)  # after the other weights: their random draws keep their order

    def forward(self, latent, vis_ids, query_ids, rng=None):
        """latent [B, 1+V, D] online tokens (cls first) of patches vis_ids [B, V]; query_ids [B, T] -> [B, T, D]."""
        x = self.embed(latent)  # [B, 1+V, d]: embedded cls and visible features Z_V (no position yet)
        b, table = x.shape[0], self.pos_embed.dtype  # the visual cues read the fp32 position table
        p_v, p_t = self.positions(b, vis_ids, table), self.positions(b, query_ids, table)  # [B, V, d], [B, T, d]
        kv = x + torch.cat([self.pos_embed[:, :1].expand(b, -1, -1), p_v], 1).to(x.dtype)  # [B, 1+V, d]
        if self.cues:
            q = visual_cue_queries(self.mask_token, p_t, p_v, x[:, 1:])  # [B, T, d], fp32
        else:
            q = self.mask_token.to(x.dtype) + p_t.to(x.dtype)
        q = torch.cat([self.query_token.to(q.dtype).expand(b, -1, -1), q], 1)  # [B, 1+T, d]
        for blk in self.blocks:
            q = blk(q, kv)
        return self.head(self.norm(q[:, 1:]))  # [B, T, D]


def build_projector(dim, hidden):
    """'Proj. mlp': Linear(D, h) LN GELU Linear(h, h) LN GELU Linear(h, D) LN, no biases, on every output token."""
    proj = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.LayerNorm(hidden), nn.GELU(),
                         nn.Linear(hidden, hidden, bias=False), nn.LayerNorm(hidden), nn.GELU(),
                         nn.Linear(hidden, dim, bias=False), nn.LayerNorm(dim))
    return proj.apply(init_weights_mae)


# ------------------------------------------------------------------------------------------------------------ model
class LatentMIM(nn.Module):
    """Online encoder + projector, a target encoder (`target`, collapse table), a decoder (`decoder`, decoder table)
    and the latent loss (`loss`, loss table) plus the similarity regulariser R (`sim_weight`, gamma set per step)."""
    def __init__(self, model="base", patch_size=None, input_size=224, gap=4, mask_ratio=0.9, target="momentum",
                 proj="mlp", proj_dim=4096, decoder="cross-cues", decoder_dim=512, decoder_depth=3, decoder_heads=16,
                 loss="patchdisc", tau=0.2, huber_delta=1.0, pred2unit=True, sim_weight=0.05, gamma=0.75):
        super().__init__()
        if target not in TARGETS or decoder not in DECODERS or loss not in LOSSES:
            raise ValueError(f"unknown target, decoder or loss: {target!r}, {decoder!r}, {loss!r}")
        if gap < 0 or not sim_weight >= 0:
            raise ValueError(f"--gap and --sim-weight must be non-negative, got {gap}, {sim_weight}")
        if not tau > 0 or not huber_delta > 0 or proj_dim < 1:
            raise ValueError(f"--tau, --huber-delta and --proj-dim must be positive, got {tau}, {huber_delta}, "
                             f"{proj_dim}")
        self.encoder = build_vit(model, patch_size=patch_size, img_size=input_size)
        D, self.patch, self.grid = self.encoder.embed_dim, self.encoder.patch_size, self.encoder.grid_size
        self.gap, self.crop = gap, self.grid * (self.patch + gap)
        self.num_patches = self.grid ** 2
        self.num_visible = num_visible(self.num_patches, mask_ratio)  # V; the other T = L - V patches are targets
        if not 0 < mask_ratio < 1 or not 1 <= self.num_visible < self.num_patches:
            raise ValueError(f"--mask-ratio {mask_ratio} leaves {self.num_visible} of {self.num_patches} patches "
                             f"visible; it must be in (0, 1) and leave at least one visible patch and one target")
        make_proj = lambda: build_projector(D, proj_dim) if proj == "mlp" else nn.Identity()
        self.proj = make_proj()
        self.target = target
        if target == "momentum":  # EMA copy, updated after each optimizer step, never by gradients
            self.target_encoder, self.target_proj = copy.deepcopy(self.encoder), copy.deepcopy(self.proj)
            self.target_encoder.requires_grad_(False)
            self.target_proj.requires_grad_(False)
        elif target == "independent":  # separately initialised and trained by the loss as well
            self.target_encoder = build_vit(model, patch_size=patch_size, img_size=input_size)
            self.target_proj = make_proj()
        # 'shared-stopgrad' and 'joint' use the online encoder itself (no extra parameters that could go unused)
        if decoder == "self":  # MAE-style: mask tokens m + p_t and the visible tokens through self-attention blocks
            self.decoder = MAEDecoder(D, self.grid, D, decoder_dim, decoder_depth, decoder_heads, mask_token_std=0.0)
        else:  # the paper's cross-attention decoder, with or without the visual cues
            self.decoder = CrossDecoder(D, self.grid, decoder_dim, decoder_depth, decoder_heads,
                                        cues=decoder == "cross-cues")
        self.loss_kind, self.tau, self.delta, self.pred2unit = loss, tau, huber_delta, pred2unit
        self.sim_weight = sim_weight
        # gamma of R, set every step from its schedule; a buffer so that changing it needs no recompile or sync
        self.register_buffer("sim_gamma", torch.tensor(float(gamma)), persistent=False)

    def mask(self, imgs, rng):
        """Jittered patches [B, L, p*p*3], visible ids [B, V] and masked (target) ids [B, T], T = L - V, from rng."""
        if imgs.shape[-2:] != (self.crop, self.crop):
            raise ValueError(f"training images must be {self.crop} px (grid {self.grid} x (patch {self.patch} + "
                             f"gap {self.gap})), got {tuple(imgs.shape[-2:])}")
        pixels = gap_patchify(imgs, self.patch, self.gap, rng=rng)  # draws the offsets first (gap > 0)
        vis_ids, mask_ids = random_masking(rng.rand(self.num_patches), self.num_visible)
        return pixels, vis_ids, mask_ids

    def encode(self, pixels, ids, rng=None):
        """The online branch: pixels [B, V, p*p*3] of the patches at grid positions ids [B, V] -> [cls, z_V]
        [B, 1+V, D], projected."""
        return self.proj(self.encoder.forward_pixels(pixels, ids, rng))

    def targets(self, pixels, ids, rng=None):
        """z_T [B, T, D]: the target encoder sees only the target patches (plus its cls token)."""
        own = self.target in ("momentum", "independent")  # a target encoder of its own, or the online one
        vit, proj = (self.target_encoder, self.target_proj) if own else (self.encoder, self.proj)
        with torch.set_grad_enabled(self.target in ("independent", "joint")):  # these train the target branch too
            return proj(vit.forward_pixels(pixels, ids, rng))[:, 1:]

    def loss(self, pred, target, visible):
        """The loss table's Delta (mean over target patches) + sim_weight R. pred [B, T, D] raw predictions z^,
        target [B, T, D], visible [B, V, D] online visible tokens (for R)."""
        if self.loss_kind == "patchdisc":
            loss = latent_loss(pred_to_unit(pred) if self.pred2unit else pred, target, "patchdisc", self.tau)
        else:  # per-token standardised targets (official 'norm_l2'; (decision) also L1 / Huber: code has MSE only)
            loss = latent_loss(pred, standardize_tokens(target), self.loss_kind, self.tau, self.delta)
        if self.sim_weight > 0:
            loss = loss + self.sim_weight * similarity_regularizer(pred, visible, self.sim_gamma)
        return loss

    def forward(self, imgs, rng):
        pixels, vis_ids, mask_ids = self.mask(imgs, rng)
        z = self.encode(gather_tokens(pixels, vis_ids), vis_ids, rng)  # [B, 1+V, D]
        target = self.targets(gather_tokens(pixels, mask_ids), mask_ids, rng)  # [B, T, D]
        pred = self.decoder(z, vis_ids, mask_ids)  # [B, T, D] raw predictions z^
        loss = self.loss(pred, target, z[:, 1:])
        with torch.no_grad():  # the collapse monitor ("Sim"): within-image mean pairwise cosine, on device
            metrics = {f"sim_{name}": mean_pairwise_cosine(t).mean()
                       for name, t in (("pred", pred), ("vis", z[:, 1:]), ("target", target))}
        return loss, metrics

    def update_teacher(self, momentum):
        """q <- m q + (1 - m) p for the target encoder and projector (momentum target only)."""
        ema_update(self.target_encoder, self.encoder, momentum)
        ema_update(self.target_proj, self.proj, momentum)


def build_model(args):
    names = ("model", "patch_size", "input_size", "gap", "mask_ratio", "target", "proj", "proj_dim", "decoder",
             "decoder_dim", "decoder_depth", "decoder_heads", "loss", "tau", "huber_delta", "pred2unit", "sim_weight")
    return LatentMIM(**{name: getattr(args, name) for name in names}, gamma=args.gamma_start)


# ------------------------------------------------------------------------------------------------------------- CLI
# the ablation setting: ImageNet-100 x 8 GPUs, R off (official configs/lmim.yaml: avg_sim_coeff 0) unless a row turns
# it on
IN100 = "--epochs 300 --warmup-epochs 30 --batch-size 128 --accum 4 --sim-weight 0"
RECIPES = {  # --recipe NAME: these flags, then the command line's (which win)
    "imagenet": "",  # the paper's ImageNet-1k recipe: the defaults below
    # the README's set-up demo: micro ViT, 32 px, 2048 synthetic images, 60 epochs (6.5 min on 2 CPU cores)
    "demo": "--model micro --input-size 32 --epochs 60 --warmup-epochs 3 --batch-size 64 --accum 1 --lr 1e-3 --gap 2 "
            "--proj-dim 256 --decoder-dim 64 --decoder-heads 4 --num-workers 1",
    # the README's 5-epoch synthetic demo at 64 px, 512 images
    "demo-64px": "--model micro --input-size 64 --gap 2 --proj-dim 256 --decoder-dim 64 --decoder-heads 4 "
                 "--synthetic-size 512 --batch-size 32 --accum 1 --epochs 5 --warmup-epochs 1 --lr 1e-3 "
                 "--num-workers 0",
    # the README's collapse demo on CPU (the collapse table's setting; add --target)
    "demo-collapse": "--model micro --input-size 64 --synthetic-size 512 --batch-size 32 --accum 1 --epochs 8 "
                     "--warmup-epochs 1 --lr 1e-3 --num-workers 0 --loss mse --mask-ratio 0.75 --gap 0 --sim-weight 0 "
                     "--decoder self --proj none --decoder-dim 64 --decoder-heads 4",
    "in100": IN100,  # the ablation setting (README, ablation rows: add a row's flags; the decoder rows)
    # B1, the base of the collapse and loss rows, and B2, the base of the mask / gap / sim rows
    "in100-b1": IN100 + " --loss mse --mask-ratio 0.75 --gap 0 --decoder self --proj none",
    "in100-b2": IN100 + " --loss patchdisc --decoder self --proj none",
}


def build_parser():
    parser = add_common_args(ArgumentParser(prog="latent_mim.py", description="Latent MIM pretraining (ECCV 2024)",
                                            recipes=RECIPES), METHOD)
    a = parser.add_argument
    a("--target", choices=TARGETS, default="momentum", help="target encoder (collapse table)")
    a("--momentum", type=float, default=0.99, help="base EMA momentum, cosine to 1 over training")
    a("--loss", choices=LOSSES, default="patchdisc", help="latent reconstruction loss (loss table)")
    a("--tau", type=float, default=0.2, help="PatchDisc temperature")
    a("--huber-delta", type=float, default=1.0, help="Huber loss threshold (--loss huber)")
    a("--no-pred2unit", dest="pred2unit", action="store_false", help="do not standardise predictions before PatchDisc")
    a("--mask-ratio", type=float, default=0.9, help="visible = round(L (1 - ratio)): 0.9 -> 20 of 196")
    a("--gap", type=int, default=4, help="pixels between grid cells; patches jitter by 0..gap-1 (0: contiguous)")
    a("--crop-size", type=int, default=None, help="training crop; must be grid x (patch + gap) (default: that)")
    # 0.05 = the official 0.1 against the official 2 tau scaling of PatchDisc (we scale by tau, as the equation)
    a("--sim-weight", type=float, default=0.05, help="weight of the similarity regulariser R (0: off)")
    a("--gamma-start", type=float, default=0.75, help="R's target similarity at the start (cosine schedule)")
    a("--gamma-end", type=float, default=0.25, help="... and at the end of training")
    a("--decoder", choices=DECODERS, default="cross-cues", help="decoder table: self / cross / cross + visual cues")
    add_decoder_args(parser, depth=3)
    a("--proj", choices=("none", "mlp"), default="mlp", help="projector after both encoders")
    a("--proj-dim", type=int, default=4096, help="projector hidden width")
    a("--min-lr-frac", type=float, default=0.25, help="lr warms up from and decays to this fraction of the peak")
    a("--vis", default="", help="write a PNG of jittered grids and visible / target patches to this path and exit")
    parser.free_on_resume("vis")
    add_bench_args(parser)
    # the official ImageNet recipe: 256 per GPU x 8 GPUs x accum 2 = 4096; lr = 1.5e-4 * 4096 / 256 = 2.4e-3
    parser.set_defaults(model="base", input_size=224, epochs=800, warmup_epochs=40, batch_size=256, accum=2,
                        blr=1.5e-4, weight_decay=0.05)
    return parser


def check_args(args, model):
    """What the model cannot check itself: --crop-size against its grid, and the flags of the loop."""
    if args.crop_size is not None and args.crop_size != model.crop:
        raise UserError(f"--crop-size {args.crop_size} is inconsistent: the grid of {model.grid} cells of "
                        f"{model.patch}+{args.gap} px needs {model.crop} px")
    args.crop_size = model.crop
    if not 0.0 <= args.momentum <= 1.0 or not args.min_lr_frac >= 0:
        raise UserError("--momentum must be in [0, 1] and --min-lr-frac non-negative")


def train_dataset(args):
    base = build_dataset(args.data, "train", size=args.input_size, length=args.synthetic_size, seed=args.seed)
    return SeededDataset(base, image_transform(pretrain_transform(args.crop_size)))


# ------------------------------------------------------------------------------------------------ figure and bench
def outline(panel, top, left, size, colour):
    """A 1-px square frame of `size` px from (top, left) on panel [3, H, W], clipped to it."""
    H, W = panel.shape[-2:]
    rows, cols = slice(max(top, 0), min(top + size, H)), slice(max(left, 0), min(left + size, W))
    for r in {top, top + size - 1} & set(range(H)):
        panel[:, r, cols] = colour
    for c in {left, left + size - 1} & set(range(W)):
        panel[:, rows, c] = colour


def write_vis(args, model, n=4):
    """Per image: the training crop; the jittered grid (pixels the encoders never see dimmed); the patches as they
    are, the targets outlined in red (a tint hid the targets of reddish images). The outline runs 1 px outside the
    patch, in the gap, where no other patch is (offsets stay below the gap); without a gap, on the patch's edge.
    Labelled columns; the images come from different classes (sample_across_classes)."""
    dataset = train_dataset(args)
    picks = sample_across_classes(dataset.base, n, args.seed)
    n = len(picks)
    imgs = denormalize(torch.stack([dataset[(i, mix_seed(args.seed, i))][0] for i in picks]))  # [n, 3, crop, crop]
    patch, grid, cell = model.patch, model.grid, model.patch + args.gap
    rng = StepRandom(args.seed, 0, torch.device("cpu"), slice(0, n), n)  # the same draws as the model's `mask`
    offsets = rng.randint(args.gap, grid * grid, 2) if args.gap else torch.zeros(n, grid * grid, 2, dtype=torch.long)
    V = model.num_visible
    vis_ids, _ = random_masking(rng.rand(grid * grid), V)
    jitter, roles = 0.2 * imgs, torch.zeros_like(imgs)
    red, ring = torch.tensor([1.0, 0.1, 0.1]).view(3, 1), int(args.gap > 0)
    for b in range(n):
        visible = set(vis_ids[b].tolist())
        for k in range(grid * grid):
            y, x = (k // grid) * cell + int(offsets[b, k, 0]), (k % grid) * cell + int(offsets[b, k, 1])
            crop = imgs[b, :, y:y + patch, x:x + patch]
            jitter[b, :, y:y + patch, x:x + patch] = crop
            roles[b, :, y:y + patch, x:x + patch] = crop
            if k not in visible:
                outline(roles[b], y - ring, x - ring, patch + 2 * ring, red)
    panels = torch.stack([imgs, jitter, roles], 1).flatten(0, 1)  # [3n, 3, crop, crop]
    T = grid * grid - V
    size = save_figure(panels, args.vis, columns=3, padding=4, labels=[
        f"crop {args.crop_size} px", f"{grid}x{grid} grid, gap {args.gap}", f"{V} visible, {T} targets (red)"])
    print(figure_line(args.vis, size, n, [f"training crop ({args.crop_size} px)", f"the jittered {grid}x{grid} grid, "
                                          f"gap {args.gap} (pixels no encoder sees dimmed)", f"{V} visible patches, "
                                          f"{T} target patches outlined in red"]))


def bench(args, model):
    """--bench: optimizer steps of the real training step on random tensors already on the device (no loader)."""
    device = pick_device(args.device)
    model.to(device)
    imgs = torch.randn(args.batch_size, 3, args.crop_size, args.crop_size, device=device)
    ema = (lambda: model.update_teacher(args.momentum)) if model.target == "momentum" else None
    labels = {"masking": (model, "mask"), "encoder": (model, "encode"), "teacher": (model, "targets"),
              "decoder": (model.decoder, "forward"), "loss": (model, "loss")}  # --profile, wrapped from outside
    case = (model, [imgs], build_adamw(model, args.weight_decay, 1e-4, no_weight_decay), ema, labels)
    from tools.bench import benchmark
    return benchmark({METHOD: case}, device, args.bench_steps, args.compile, args.profile, args.seed)[METHOD]


# ---------------------------------------------------------------------------------------------------------- training
def no_weight_decay(name, param):
    """The official optimizer groups (timm's param_groups_weight_decay with every name containing 'bias', 'norm' or
    'embed' listed): no weight decay on biases, 1-D norm weights, the patch-embedding weight(s) and the decoder's
    input embedding; the cls, mask and query tokens ARE decayed (the position tables are buffers)."""
    return param.ndim <= 1 or name.endswith((".bias", "patch_embed.proj.weight")) or name == "decoder.embed.weight"


def main(args):
    check_common_args(args)
    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = build_model(args)  # checks its flags, before TrainRun makes the output folder
    check_args(args, model)
    if args.vis:
        return write_vis(args, model)
    if args.bench:
        return bench(args, model)
    run = TrainRun(args, METHOD, train_dataset(args))
    model.to(run.device)
    optimizer = build_adamw(model, args.weight_decay, run.peak_lr, no_weight_decay)
    # Exported encoder = the online encoder: it is the network the loss trains (the target is only its EMA, or
    # absent), and the official k-NN evaluation reads `model.encoder` too. Its config (224 px, gap 0) is what
    # the evaluations' load_vit rebuilds; the projector is dropped, as in the official evaluation.
    run.resume(model, optimizer, model.encoder)
    ddp_model = run.wrap(model)
    run.measure_flops(model, torch.zeros(2, 3, args.crop_size, args.crop_size, device=run.device))  # for MFU
    for epoch in range(run.epoch, args.epochs):
        for step in run.steps():
            set_lr(optimizer, run.lr(step, start_frac=args.min_lr_frac, end_frac=args.min_lr_frac))
            gamma = cosine_schedule(step / run.total_steps, 1.0, args.gamma_start, args.gamma_end)  # R: 0.75 -> 0.25
            model.sim_gamma.fill_(gamma)
            step_loss = 0.0
            for micro in range(args.accum):
                imgs, _ = run.next_batch()
                with run.no_sync(ddp_model, micro), autocast(run.device):
                    loss, metrics = ddp_model(imgs, run.step_random(step, micro))
                (loss / args.accum).backward()
                step_loss += loss.detach() / args.accum
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            extra = {"gamma": gamma} if args.sim_weight > 0 else {}
            if args.target == "momentum":  # m: cosine from 0.99 to 1 over all optimizer steps
                extra["momentum"] = m = ema_momentum(step, run.total_steps, args.momentum)
                model.update_teacher(m)
            run.step_done(step, step_loss, {**metrics, **extra})
        if run.end_epoch():  # saves; True once --max-steps is reached
            break
    run.finish()


if __name__ == "__main__":
    run_main(main, build_parser())
