"""Shared pieces of semmae.py, latent_mim.py, pcae.py and eval_probe.py. Nothing here is specific to one method.

Part 1, what a reader of the papers needs:
   1. position embeddings           MAE's fixed 2-D sin-cos table (integer grid positions, all three methods)
   2. the ViT                       pre-LN blocks, stochastic depth, the encoder with the common parameter names
   3. patches, masks, randomness    patchify, gather, random masking, per-token standardisation, StepRandom
   4. the MAE-style decoder         mask tokens at the ids to predict (SemMAE, PCAE, Latent MIM's 'self' decoder)
   5. schedules and the EMA update  warmup + half-cosine, momentum schedule, teacher <- EMA of the student
Part 2, plumbing:
   6. data                          ImageFolder, synthetic shapes, transforms, seeded samples, resumable order,
                                    figures (images across the classes, enlarged to a readable width)
   7. processes and precision       torchrun layout, bf16 autocast, gathering rows of all processes
   8. checkpoints                   atomic save (one-line disk-full error), weights-only load, public ViT
                                    checkpoints, the output folder's lock
   9. optimizer                     AdamW with a weight-decay rule per method
  10. logging and MFU               non-finite guard (and agreed stop requests), progress (a bar on a terminal, else
                                    lines) and log.jsonl, FLOP counting
  11. arguments and errors          the flags every script shares, --recipe, --help with defaults, the resolved
                                    command line, one-line errors, exit codes, SIGTERM / SIGUSR1
  12. the training run              the small state object and helpers that each method file's loop calls
  13. benchmark                     --bench / --profile and the data-loader benchmark

Reproducibility (what makes kill/resume and DDP == one process exact):
- the data order of epoch e is a permutation seeded by (seed, e); optimizer step s, accumulation micro-step a and
  rank r always read the same slice of it (`ResumableSampler`), and a resumed epoch starts at the saved position,
  stored in samples of that order: each optimizer step reads the same samples for any number of processes x batch x
  accumulation with the same effective batch, so a resume may change that layout;
- each sample's augmentation is seeded by (seed, epoch, index), so it does not depend on workers or processes;
- model-side randomness (masks, jitter, drop path) comes from `StepRandom`: drawn for the whole optimizer-step batch
  from a generator seeded by (seed, step), of which each process and micro-step keeps its own rows.
"""
import argparse, atexit, contextlib, errno, hashlib, json, math, os, shlex, shutil, signal, socket, sys, threading, time
import weakref
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# =====================================================================================================================
# Part 1: what a reader of the papers needs
# =====================================================================================================================


# ------------------------------------------------------------------------------------------ 1. position embeddings
def get_1d_sincos_pos_embed(embed_dim, pos):
    """omega_d = 1 / 10000^(d / (D/2)), d = 0..D/2-1;  emb(pos) = [sin(pos * omega), cos(pos * omega)]  -> [M, D]"""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0))
    out = pos.reshape(-1).double()[:, None] * omega[None]  # [M, D/2]
    return torch.cat([out.sin(), out.cos()], dim=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """MAE's fixed 2-D sin-cos table [grid_size**2 (+1), embed_dim], row-major over the patch grid, at the integer
    positions 0..g-1 (as MAE; the official Latent MIM code spaces them as k g / (g - 1), this project uses MAE's for
    all three methods). The first half of the channels encodes the column (x), the second the row (y); cls row zero."""
    assert embed_dim % 4 == 0, "sin-cos position embeddings need embed_dim divisible by 4"
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb = torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, cols), get_1d_sincos_pos_embed(embed_dim // 2, rows)], 1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


# ---------------------------------------------------------------------------------------------------------- 2. ViT
class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # [B, N, D]
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernel where available
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x, p, training, u=None):
    """Stochastic depth: zero a residual branch per sample with probability p, scale the rest by 1/(1-p).
    u [B]: the samples' uniform numbers, drawn by `run_blocks` from the step's StepRandom."""
    if p == 0.0 or not training:
        return x
    if u is None:
        raise ValueError("stochastic depth in training needs its uniforms (run the blocks with run_blocks(..., rng))")
    keep = (u >= p).to(x.dtype) / (1.0 - p)
    return x * keep.view(-1, *([1] * (x.ndim - 1)))


class Block(nn.Module):
    """Pre-LN transformer block: x += Attn(LN(x)); x += MLP(LN(x))."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0, norm_eps=1e-6):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=norm_eps), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=norm_eps), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x, drop_u=None):  # drop_u [B, 2]: stochastic-depth uniforms of the two branches
        u_attn, u_mlp = (None, None) if drop_u is None else drop_u.unbind(1)
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training, u_attn)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training, u_mlp)


def run_blocks(blocks, x, rng=None):
    """x through a stack of Blocks. Their stochastic depth is drawn from `rng` (the step's StepRandom, so it is the
    same however the batch is split) in ONE draw before the loop: the blocks then contain no generator call, which
    would break torch.compile's graph in every block."""
    noise = None
    if any(b.drop_path > 0 and b.training for b in blocks):
        if rng is None:
            raise ValueError("these blocks use stochastic depth: pass the step's rng")
        noise = rng.rand(len(blocks), 2)  # [B, depth, 2]
    for i, blk in enumerate(blocks):
        x = blk(x, None if noise is None else noise[:, i])
    return x


VIT_PRESETS = {  # name -> (embed_dim, depth, num_heads, patch_size)
    "micro": (64, 4, 4, 8),  # for tests and the synthetic demo only
    "tiny": (192, 12, 3, 16), "small": (384, 12, 6, 16), "base": (768, 12, 12, 16),
    "large": (1024, 24, 16, 16), "huge": (1280, 32, 16, 14),
}


def init_weights_mae(module):
    """MAE init: xavier_uniform Linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViT(nn.Module):
    """Vision Transformer encoder with the common parameter names (timm / MAE / DINO / iBOT layout) and fixed 2-D
    sin-cos position embeddings. The pieces are separate so that methods can embed any subset of patches, run the
    blocks one at a time (dropping tokens in between) and apply the final norm themselves."""
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 drop_path_rate=0.0):
        super().__init__()
        if patch_size < 1 or img_size < 1 or img_size % patch_size:
            raise UserError(f"image size {img_size} is not divisible by the patch size {patch_size}")
        if num_heads < 1 or embed_dim % num_heads:
            raise UserError(f"{num_heads} heads do not divide the width {embed_dim}")
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed, not trained; a persistent buffer so that it is saved and loads from public checkpoints
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(embed_dim, self.grid_size, cls_token=True)[None])
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows linearly with depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(init_weights_mae)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear on the flattened patch
        nn.init.normal_(self.cls_token, std=0.02)

    def patch_tokens(self, imgs):
        """[B, 3, H, W] -> [B, L, D] patch embeddings, no position."""
        return self.patch_embed.proj(imgs).flatten(2).transpose(1, 2)

    def embed_pixels(self, patches):
        """[B, N, p*p*3] flattened pixels (`patchify` order) -> [B, N, D], the same map as the conv embedding."""
        w = self.patch_embed.proj.weight.permute(0, 2, 3, 1).flatten(1)  # [D, p*p*3] in (p, q, c) order
        return F.linear(patches, w, self.patch_embed.proj.bias)

    def add_pos(self, x, ids=None):
        """x [B, N, D] + the position embeddings of patches ids [B, N] (all L patches in order when ids is None)."""
        pos = self.pos_embed[:, 1:].to(x.dtype)
        return x + (pos if ids is None else gather_tokens(pos.expand(x.shape[0], -1, -1), ids))

    def prepend_cls(self, x):
        """[B, N, D] -> [B, 1+N, D] with the cls token (plus its all-zero position)."""
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def embed(self, imgs, ids=None):
        """Images -> [cls, patches ids] tokens with positions, ready for the blocks. ids [B, N] or None (all)."""
        x = self.patch_tokens(imgs)
        if ids is not None:
            x = gather_tokens(x, ids)
        return self.prepend_cls(self.add_pos(x, ids))

    def forward_blocks(self, x, rng=None):
        return run_blocks(self.blocks, x, rng)

    def forward_pixels(self, pixels, ids, rng=None):
        """Encode a subset of patches given as pixels: pixels [B, N, p*p*3] (`patchify` order, possibly jittered
        crops) of the patches at grid positions ids [B, N] -> [B, 1+N, D] normalised tokens, cls first. Only the N
        patches are embedded (cheaper than the conv over the whole image); rng: stochastic depth (see run_blocks)."""
        x = self.prepend_cls(self.add_pos(self.embed_pixels(pixels), ids))  # [B, 1+N, D]
        return self.norm(self.forward_blocks(x, rng))

    def forward(self, imgs, ids=None):
        """[B, 3, H, W] -> [B, 1+N, D] normalised tokens (cls first) of patches ids (or all)."""
        return self.norm(self.forward_blocks(self.embed(imgs, ids)))


def preset_patch_size(model, patch_size=None):
    """The patch size of a preset (or the override): the one lookup every script uses before building a model."""
    if model not in VIT_PRESETS:
        raise UserError(f"unknown model {model!r}; choose from {', '.join(VIT_PRESETS)}")
    return patch_size or VIT_PRESETS[model][3]


def build_vit(name, **overrides):
    """ViT preset by name ('tiny' .. 'huge', 'micro' for tests); keyword arguments override the preset."""
    preset_patch_size(name)  # a clear error for an unknown name
    dim, depth, heads, patch = VIT_PRESETS[name]
    kw = dict(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return ViT(**kw)


# --------------------------------------------------------------------------------- 3. patches, masks, randomness
def patchify(imgs, patch_size):
    """[B, C, H, W] -> [B, L, p*p*C], patches row-major, pixels in (p, q, c) order as in MAE."""
    return rearrange(imgs, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(patches, patch_size, channels=3):
    """[B, L, p*p*C] -> [B, C, H, W] for a square grid; the inverse of `patchify`."""
    h = math.isqrt(patches.shape[1])
    return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=h, p=patch_size, q=patch_size, c=channels)


def gather_tokens(x, ids):
    """x [B, L, ...] at ids [B, N] -> [B, N, ...]."""
    idx = ids.reshape(*ids.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


def random_masking(noise, num_visible):
    """Per-image random split of L patches: noise [B, L] uniform -> (visible ids [B, V], masked ids [B, L-V]),
    the V patches with the smallest noise being visible; the same count for every image keeps tensors dense."""
    order = noise.argsort(dim=1)
    return order[:, :num_visible], order[:, num_visible:]


def standardize_tokens(x, eps=1e-6):
    """Per token over channels, no affine: x <- (x - mean) / sqrt(var + 1e-6), with the unbiased variance as torch's
    .var() and the official codes (MAE's norm_pix_loss targets, PCAE's and Latent MIM's latent targets). [..., C]."""
    x = x.float()
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + eps).sqrt()


def mix_seed(*values):
    """Combine integers into one 63-bit seed (splitmix64-style), so that (seed, step) pairs never collide."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h >> 1


class StepRandom:
    """Model-side randomness of one optimizer step (masks, jitter, drop path). Every draw is made for the whole
    optimizer-step batch from a generator seeded by (seed, step) and this process / micro-step keeps its rows, so the
    result does not depend on the number of processes, on accumulation, or on a resume in between. Every process
    must make the same sequence of draws. rows=None: a local generator whose draws have exactly the given shape
    (figures, evaluation, tests)."""
    def __init__(self, seed, step, device, rows=None, global_batch=None):
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(mix_seed(seed, step))
        self.device, self.rows, self.global_batch = device, rows, global_batch

    @classmethod
    def for_micro_step(cls, seed, step, micro, batch, world, rank, accum, device):
        start = (micro * world + rank) * batch  # matches ResumableSampler's order
        return cls(seed, step, device, slice(start, start + batch), batch * world * accum)

    @torch.compiler.disable  # a generator cannot be traced: run the draw eagerly, keep the graph around it
    def _take(self, draw, shape):
        if self.rows is None:  # local use: shape includes the batch
            return draw(shape)
        return draw((self.global_batch, *shape))[self.rows]

    def rand(self, *shape):
        """Uniform [0, 1) of shape [B, *shape] (or `shape` itself for a local StepRandom)."""
        return self._take(lambda s: torch.rand(s, generator=self.gen, device=self.device), shape)

    def randint(self, high, *shape):
        return self._take(lambda s: torch.randint(high, s, generator=self.gen, device=self.device), shape)


# ------------------------------------------------------------------------------------------- 4. MAE-style decoder
class MAEDecoder(nn.Module):
    """MAE's decoder, given the encoder tokens [cls, visible] and the ids of the patches to predict: embed the tokens
    to the decoder width, append one shared mask token per query, add fixed sin-cos positions (cls at a zero
    position, every other token at its own patch), run the blocks, norm, and map the queries to `out_dim`.
    Attention is permutation-equivariant, so adding each token's own position replaces MAE's unshuffle.
    make_block: the block constructor (Latent MIM's cross-attention decoder reuses the rest with its own blocks)."""
    def __init__(self, enc_dim, grid_size, out_dim, decoder_dim=512, decoder_depth=8, decoder_heads=16, drop_path=0.0,
                 mask_token_std=0.02, make_block=None):
        super().__init__()
        make_block = make_block or (lambda: Block(decoder_dim, decoder_heads, 4.0, drop_path))
        self.embed = nn.Linear(enc_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(decoder_dim, grid_size, cls_token=True)[None],
                             persistent=False)  # fixed [1, 1+L, Dd]; rebuilt from the config, not saved
        self.blocks = nn.ModuleList(make_block() for _ in range(decoder_depth))
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.head = nn.Linear(decoder_dim, out_dim)
        self.apply(init_weights_mae)
        if mask_token_std > 0:  # MAE: normal(0.02); the official Latent MIM code keeps it at zero
            nn.init.normal_(self.mask_token, std=mask_token_std)

    def positions(self, batch, ids, dtype):
        """[B, N] patch ids -> their fixed decoder positions [B, N, Dd]."""
        return gather_tokens(self.pos_embed[:, 1:].to(dtype).expand(batch, -1, -1), ids)

    def forward(self, latent, vis_ids, query_ids, rng=None):
        """latent [B, 1+V, D] encoder tokens (cls first) of patches vis_ids [B, V]; query_ids [B, Q] -> [B, Q, out]."""
        b, q = latent.shape[0], query_ids.shape[1]
        x = self.embed(latent)  # [B, 1+V, Dd]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(b, q, -1)], dim=1)  # [B, 1+V+Q, Dd]
        pos = self.positions(b, torch.cat([vis_ids, query_ids], dim=1), x.dtype)  # [B, V+Q, Dd]
        x = x + torch.cat([self.pos_embed[:, :1].to(x.dtype).expand(b, -1, -1), pos], dim=1)
        x = run_blocks(self.blocks, x, rng)
        return self.head(self.norm(x[:, -q:]))  # LayerNorm is per token: slice first


# ----------------------------------------------------------------------------------- 5. schedules and the EMA update
def cosine_schedule(t, total, start, end):
    """Half-cosine from `start` at t = 0 to `end` at t = total:  end + (start - end) * 0.5 * (1 + cos(pi t / T))."""
    t = min(max(t, 0.0), total)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t / max(total, 1e-12)))


def warmup_cosine(t, total, warmup, peak, start_frac=0.0, end_frac=0.0):
    """Linear warmup from start_frac * peak to peak over `warmup`, then half-cosine to end_frac * peak at `total`.
    t, total and warmup in the same unit (fractional epochs in the scripts), so resume needs no scheduler state."""
    if t < warmup:
        return peak * (start_frac + (1.0 - start_frac) * t / warmup)
    return cosine_schedule(t - warmup, total - warmup, peak, peak * end_frac)


def ema_momentum(t, total, base):
    """Teacher momentum rising from `base` to 1 on a cosine:  m(t) = 1 - 0.5 (1 + cos(pi t / T)) (1 - base)."""
    return cosine_schedule(t, total, base, 1.0)


@torch.no_grad()
def ema_update(target, online, momentum):
    """q <- m q + (1 - m) p for every parameter pair (same architecture), as one fused op over the flat lists."""
    tp, op = list(target.parameters()), list(online.parameters())
    if len(tp) != len(op):
        raise ValueError("EMA needs two networks of the same architecture")
    if tp:
        torch._foreach_lerp_(tp, op, 1.0 - momentum)  # q + (1 - m)(p - q) == m q + (1 - m) p


# =====================================================================================================================
# Part 2: plumbing
# =====================================================================================================================


# ----------------------------------------------------------------------------------------------------------- 6. data
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's list
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # Pillow's modes of 16-bit greyscale PNG / TIFF
MAX_READ_TRIES = 10  # a sample's image and the next ones of its class tried before the run stops (SeededDataset)
BAD_SHARE, BAD_MIN_SAMPLES = 0.1, 1000  # note_bad stops a run once this share of >= this many samples was unreadable


def pretrain_transform(size, scale=(0.2, 1.0)):
    """MAE pretraining augmentation: RandomResizedCrop (bicubic) + horizontal flip + ImageNet normalisation."""
    from torchvision.transforms import v2
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC,
                                                          antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(size):
    """Evaluation, as MAE's build_transform: Resize the short side to int(size / crop_pct) (bicubic) +
    CenterCrop(size) + normalisation, crop_pct = 224/256 up to 224 px (224 -> 256) and 1 above (384 -> 384)."""
    from torchvision.transforms import v2
    crop_pct = 224 / 256 if size <= 224 else 1.0
    return v2.Compose([v2.ToImage(), v2.Resize(int(size / crop_pct), interpolation=v2.InterpolationMode.BICUBIC,
                                               antialias=True),
                       v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def denormalize(imgs):
    """ImageNet-normalised images [..., 3, H, W] -> pixel values in [0, 1], on the CPU, for figures."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (imgs.detach().float().cpu() * std + mean).clamp(0, 1)


FIGURE_MIN_WIDTH = 512  # the --vis figures are enlarged until a row of panels is at least this many pixels wide


def sample_across_classes(dataset, n, seed):
    """Indices of n images of `dataset` for a figure, spread over its classes (a class-sorted folder's first images
    are all of one class): all images in an order shuffled by a generator seeded by `seed`, taken round-robin over
    the classes (the first image of each class in that order, then the second of each, ...), so n different classes
    when there are n. Labels come from `samples` (ImageFolder: no image is read), else from `load` (SyntheticShapes),
    read in that order only until the choice is settled."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    samples, classes = getattr(dataset, "samples", None), len(getattr(dataset, "classes", ())) or 1
    n, seen, ranked = min(n, len(dataset)), {}, []  # seen: images of each label so far; ranked: (round, place, index)
    for place, i in enumerate(order):
        label = samples[i][1] if samples is not None else dataset.load(i)[1]
        ranked.append((seen.get(label, 0), place, i))
        seen[label] = seen.get(label, 0) + 1
        fewest = min(seen.values()) if len(seen) == classes else 0  # every later image is in this round or a later one
        if sum(min(count, fewest + 1) for count in seen.values()) >= n:  # n chosen in rounds <= fewest: settled
            break
    return [i for _, _, i in sorted(ranked)[:n]]


def save_figure(tiles, path, columns, padding, pad_value=1.0):
    """Save images [N, 3, h, w] (or a list of [3, h, w]) in [0, 1] as a PNG grid of `columns` per row, each enlarged
    by the smallest integer factor that makes a row at least FIGURE_MIN_WIDTH px wide, by repeating pixels (nearest
    neighbour: patches stay crisp squares). Returns the PNG's (width, height)."""
    from torchvision.utils import make_grid, save_image
    tiles = torch.stack(list(tiles)) if isinstance(tiles, (list, tuple)) else tiles
    k = max(1, math.ceil((FIGURE_MIN_WIDTH - (columns + 1) * padding) / (columns * tiles.shape[-1])))
    grid = make_grid(tiles.repeat_interleave(k, -2).repeat_interleave(k, -1), nrow=columns, padding=padding,
                     pad_value=pad_value)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return grid.shape[2], grid.shape[1]


def read_image(path):
    """The RGB PIL image of the regular file `path`. 16-bit greyscale (HIGH_BIT_MODES; "I" is how Pillow opens some
    16-bit PNG / TIFF) is scaled to 8 bits, v -> round(v / 257) (65535 -> 255, 32768 -> 128), before the RGB
    conversion, which would clip it to 255. Every failure is an OSError naming the file: not a regular file (a FIFO
    named x.jpg is opened non-blocking and refused, not waited on), unreadable, truncated, not an image, or larger
    than Pillow's decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS, about 179 M pixels by default: to read
    such images, set `PIL.Image.MAX_IMAGE_PIXELS = None` or a larger number at the top of the script)."""
    import stat
    import numpy as np
    from PIL import Image
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError("not a regular file")
            with Image.open(f) as img:
                if img.mode in HIGH_BIT_MODES:
                    img = Image.fromarray(np.clip(np.rint(np.asarray(img) / 257), 0, 255).astype(np.uint8))
                return img.convert("RGB")
    except Exception as e:  # OSError, ValueError, SyntaxError, DecompressionBombError, ...: any is this file's fault
        why = " ".join(str(e).split())  # one line
        if isinstance(e, Image.UnidentifiedImageError):  # its message shows the file object, not the path
            why = "cannot identify image file (not an image, or a format Pillow does not read)"
        elif isinstance(e, Image.DecompressionBombError):
            why += " (raise PIL.Image.MAX_IMAGE_PIXELS to read it)"
        raise OSError(f"unreadable image {path}: {why}") from None


def is_folder(entry):
    """A folder or a link to one; False for a link loop (whose is_dir raises)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def entry_kind(entry):
    """'image' for a regular file (or a link to one) with an extension in IMG_EXTENSIONS, else what ImageFolder
    reports as skipped: its extension, 'sub-folder', 'not a regular file' (FIFOs, devices, broken links) or
    'unreadable entry' (a link loop, a file that vanished: an entry's own error never stops the scan)."""
    try:
        if not entry.name.lower().endswith(IMG_EXTENSIONS):
            return "sub-folder" if is_folder(entry) else os.path.splitext(entry.name)[1].lower() or "no extension"
        return "image" if entry.is_file() else "not a regular file"  # is_file follows links
    except OSError:
        return "unreadable entry"


class ImageFolder:
    """root/<class>/<image> with clear errors for a missing path, no class folders, an unreadable or empty class
    folder. Read: the regular files (or links to them) directly in a class folder whose extension is in
    IMG_EXTENSIONS, as torchvision's ImageFolder (which also searches sub-folders). Everything else in a class folder
    (other extensions such as .gif, FIFOs, devices, broken links and link loops, sub-folders) is skipped, counted in
    `skipped` ({kind: count}, see entry_kind) and reported in one line at start-up (on rank 0).
    `load(i)` -> (PIL RGB image, label); an unreadable image raises OSError naming its path (see read_image).
    `class_range(i)` -> (start, end): the samples of i's class, among which SeededDataset finds a replacement."""
    def __init__(self, root):
        from collections import Counter
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"data directory not found: {root}")
        self.classes = sorted(d.name for d in os.scandir(root) if is_folder(d) and not d.name.startswith("."))
        if not self.classes:
            raise UserError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
        self.samples, self.ranges, skipped = [], [], Counter()
        read = f"read are regular files with the extensions {' '.join(IMG_EXTENSIONS)}"
        for label, name in enumerate(self.classes):
            files, others = [], sum(skipped.values())
            try:
                entries = list(os.scandir(root / name))
            except OSError as e:
                raise UserError(f"cannot read class folder {root / name} ({e.strerror or e})") from None
            for entry in entries:
                kind = entry_kind(entry)
                if kind == "image":
                    files.append(entry.path)
                else:
                    skipped[kind] += 1
            if not files:
                others = sum(skipped.values()) - others
                raise UserError(f"class folder {root / name} contains no images"
                                + (f" ({others} other entries; {read})" if others else ""))
            self.ranges.append((len(self.samples), len(self.samples) + len(files)))
            self.samples += [(f, label) for f in sorted(files)]
        self.skipped = dict(sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
        if skipped and int(os.environ.get("RANK", 0)) == 0:  # once, not once per process
            kinds = ", ".join(f"{k}: {v}" for k, v in self.skipped.items())
            print(f"note: {root}: skipped {sum(skipped.values())} entries of the class folders ({kinds}); {read}",
                  file=sys.stderr, flush=True)

    def __len__(self):
        return len(self.samples)

    def path(self, i):
        return self.samples[i][0]

    def class_range(self, i):
        return self.ranges[self.samples[i][1]]

    def load(self, i):
        path, label = self.samples[i]
        return read_image(path), label


SYNTHETIC_CLASSES = ("disk", "square", "triangle", "ring", "cross",
                     "h-stripes", "v-stripes", "d-stripes", "checkerboard", "dots")


class SyntheticShapes:
    """Procedural labelled images, a pure function of (seed, index): no download, any size. The class is a shape or
    a texture (SYNTHETIC_CLASSES) at a random place and scale; colours are random and carry no class information, so
    a linear probe has to read structure. `load(i)` -> (uint8 tensor [3, size, size], label)."""
    def __init__(self, size=64, length=2048, seed=0):
        self.size, self.length, self.seed = size, length, seed
        self.classes = list(SYNTHETIC_CLASSES)

    def __len__(self):
        return self.length

    def path(self, i):
        return f"synthetic:{self.seed}:{i}"

    def load(self, i):
        g = torch.Generator().manual_seed(mix_seed(self.seed, i))
        label = int(torch.randint(len(self.classes), (), generator=g))
        u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))
        s = self.size
        y, x = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
        r, cy, cx = u(0.18, 0.35), u(0.35, 0.65), u(0.35, 0.65)
        dy, dx = y - cy, x - cx
        per = u(0.06, 0.15)  # texture period
        shapes = {
            "disk": dy ** 2 + dx ** 2 < r ** 2,
            "square": (dy.abs() < r * 0.85) & (dx.abs() < r * 0.85),
            "triangle": (dy < r * 0.8) & (dy > -r) & (dx.abs() < (dy + r) * 0.6),
            "ring": ((dy ** 2 + dx ** 2).sqrt() - r * 0.75).abs() < r * 0.25,
            "cross": ((dy.abs() < r * 0.3) | (dx.abs() < r * 0.3)) & (dy.abs() < r) & (dx.abs() < r),
        }
        region = (dy.abs() < r * 1.2) & (dx.abs() < r * 1.2)
        textures = {
            "h-stripes": (y / per).floor() % 2 == 0, "v-stripes": (x / per).floor() % 2 == 0,
            "d-stripes": ((x + y) / per).floor() % 2 == 0,
            "checkerboard": ((x / per).floor() + (y / per).floor()) % 2 == 0,
            "dots": ((x / per) % 1 - 0.5) ** 2 + ((y / per) % 1 - 0.5) ** 2 < 0.09,
        }
        name = self.classes[label]
        fg = shapes[name] if name in shapes else region & textures[name]
        c_bg, c_fg = torch.rand(3, generator=g), torch.rand(3, generator=g)
        bg = c_bg[:, None, None] * (0.7 + 0.3 * y)  # a gentle gradient
        img = torch.where(fg, c_fg[:, None, None], bg) + 0.05 * torch.randn(3, s, s, generator=g)
        return (img.clamp(0, 1) * 255).to(torch.uint8), label


def build_dataset(data, split, size=64, length=2048, seed=0):
    """'synthetic' -> SyntheticShapes of `size` px: `length` images seeded by `seed` for train, a quarter of them
    seeded by seed + 1 for val; else ImageFolder(data/split) (size, length and seed unused)."""
    if data == "synthetic":
        return SyntheticShapes(size, length if split == "train" else max(length // 4, 1), seed + (split != "train"))
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"data directory not found: {root}")
    if not (root / split).is_dir():
        raise UserError(f"{root} has no '{split}' folder (expected {root}/{split}/<class>/<image>)")
    return ImageFolder(root / split)


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset with `load(i)`: applies `transform` and survives unreadable files.
    Index with i (no seeding, for evaluation) or with (i, seed) from ResumableSampler: the augmentation's randomness
    is then a function of the seed alone. An unreadable image is replaced by the next readable one of its class
    (wrapping around within the class: the label stays right and the choice is deterministic) and reported in the
    returned `bad` field (its index, else -1) so that the main process can report it once and count it. When the
    image and the next MAX_READ_TRIES - 1 of its class (or the whole class, if smaller) are unreadable, a DataError
    stops the run. A base without classes (no `class_range`) tries the
    next images of the whole dataset. Returns (*transformed sample, bad)."""
    def __init__(self, base, transform):
        self.base, self.transform = base, transform
        self.class_range = getattr(base, "class_range", lambda i: (0, len(self.base)))

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        lo, hi = self.class_range(i)
        tries = min(MAX_READ_TRIES, hi - lo)
        for attempt in range(tries):
            try:
                sample = self.base.load(lo + (i - lo + attempt) % (hi - lo))
                break
            except OSError as e:
                error = e
        else:
            what = (f"none of the {tries} images of the class of {self.base.path(i)} can be read" if tries == hi - lo
                    else f"neither {self.base.path(i)} nor the next {tries - 1} images of its class can be read")
            raise DataError(f"{what} (last: {error}); fix or remove the unreadable files")
        bad = -1 if attempt == 0 else i
        if seed is None:
            return (*self.transform(*sample), bad)
        in_worker = torch.utils.data.get_worker_info() is not None
        state = None if in_worker else torch.get_rng_state()  # do not disturb the main process's generator
        torch.default_generator.manual_seed(seed)  # the transforms draw from the CPU default generator
        out = self.transform(*sample)
        if state is not None:
            torch.set_rng_state(state)
        return (*out, bad)


def image_transform(transform):
    """Adapt an image transform to the (image, label) samples of SeededDataset."""
    return lambda img, label: (transform(img), label)


class ResumableSampler(torch.utils.data.Sampler):
    """Epoch-seeded permutation split by global batch: optimizer step s, micro-step a and rank r read
    perm[((s * accum + a) * world + r) * batch : ... + batch]. Yields (index, augmentation seed). Set `epoch` and
    `start_chunk` (micro-batches already done in this epoch) before iterating; the last partial step is dropped."""
    def __init__(self, length, batch, world=1, rank=0, accum=1, seed=0, shuffle=True):
        self.length, self.batch, self.world, self.rank, self.accum = length, batch, world, rank, accum
        self.seed, self.shuffle, self.epoch, self.start_chunk = seed, shuffle, 0, 0
        self.steps_per_epoch = length // (batch * world * accum)
        if self.steps_per_epoch == 0:
            raise UserError(f"the dataset has {length} images, fewer than one global batch "
                            f"({batch} x {world} processes x {accum} accumulation steps)")

    def __len__(self):
        return (self.steps_per_epoch * self.accum - self.start_chunk) * self.batch

    def __iter__(self):
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.length, generator=g) if self.shuffle else torch.arange(self.length)
        for chunk in range(self.start_chunk, self.steps_per_epoch * self.accum):
            start = (chunk * self.world + self.rank) * self.batch
            for i in perm[start:start + self.batch].tolist():
                yield i, mix_seed(self.seed, self.epoch, i)


def make_loader(dataset, batch_size, num_workers, sampler=None, shuffle=False, drop_last=False):
    """DataLoader with pinned memory and persistent workers; `bad` stays a CPU tensor (no device sync to read it)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle if sampler is None else None,
        num_workers=num_workers, pin_memory=torch.cuda.is_available(), drop_last=drop_last,
        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(0))  # own generator: iterating never touches the global RNG


# ---------------------------------------------------------------------------------- 7. processes and precision
def pick_device(name="auto"):
    """'auto': this process's GPU when there is one (LOCAL_RANK under torchrun), else the CPU; or 'cpu' / 'cuda'."""
    cuda = torch.cuda.is_available() if name in (None, "auto") else name == "cuda"
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")


class Dist:
    """Process layout, detected from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): one code path for CPU,
    one GPU and torchrun on one or several nodes; gloo on CPU, nccl on CUDA."""
    def __init__(self, device=None):
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.device = pick_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            atexit.register(self.close)

    @property
    def is_main(self):
        return self.rank == 0

    def print(self, *a, **kw):
        if self.is_main:
            print(*a, **kw, flush=True)

    def all_reduce_mean(self, t):
        if self.world > 1:
            torch_dist.all_reduce(t)
            t /= self.world
        return t

    def barrier(self):
        if self.world > 1:
            torch_dist.barrier()

    def close(self):
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def gather_rows(dist, x, n):
    """Every process holds rows rank::world of an n-row tensor (a Subset(range(rank, n, world)) of the data); returns
    all n rows, in index order, on every process."""
    if dist.world == 1:
        return x
    per = -(-n // dist.world)
    padded = x.new_zeros(per, *x.shape[1:])  # the same shape on every process
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(dist.world)]
    torch_dist.all_gather(parts, padded)
    return torch.stack(parts, 1).flatten(0, 1)[:n]  # row j of rank r is index j * world + r


def set_precision_flags():
    """TF32 for the fp32 matmuls and convolutions left outside bf16 autocast (CUDA only); set once at start-up."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def autocast(device):
    """bf16 autocast on CUDA (no GradScaler needed), full fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -------------------------------------------------------------------------------------------------- 8. checkpoints
def state_nbytes(obj):
    """Bytes of the tensors in a (nested) checkpoint state: about the size of its file."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def size_text(n):
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def save_checkpoint(path, state):
    """Atomic: write a temporary file, fsync, then rename over `path`, so a kill never leaves a broken checkpoint.
    A failed write removes the temporary file; a full disk or quota (OSError ENOSPC / EDQUOT, or torch's
    "unexpected pos" RuntimeError while less space is free than the state needs) is a one-line UserError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        need, free = state_nbytes(state), shutil.disk_usage(path.parent).free
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or isinstance(e, RuntimeError) and need > free:
            raise UserError(f"no space left to write {path}: it needs about {size_text(need)}, {size_text(free)} "
                            f"are free (the write failed after {size_text(written)}); free some space or use another "
                            f"--output-dir") from None
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path} ({e.strerror or e})") from None
        raise


def load_checkpoint(path):
    """torch.load with weights_only=True; a missing or non-checkpoint file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors differ between torch versions
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} does not contain a checkpoint dictionary")
    return ckpt


def load_training_checkpoint(path, method):
    """A checkpoint that a TrainRun wrote for `method` (model, optimizer, position), else a UserError naming it."""
    ckpt = load_checkpoint(path)
    if ckpt.get("method") != method or "model" not in ckpt or "optimizer" not in ckpt:
        raise UserError(f"{path} is not a {method} training checkpoint (method: {ckpt.get('method')})")
    return ckpt


def check_finite_weights(state, path):
    """A checkpoint whose weights hold NaN or inf cannot be continued (a save refuses such weights, so the file was
    written otherwise or damaged): FloatingPointError (exit 3) saying where to go on from, the copies that
    --keep-every kept in the same folder."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        copies = sorted(p.name for p in Path(path).parent.glob("checkpoint-*.pth"))
        older = (f"one of the copies kept there ({', '.join(copies)})" if copies else
                 "an earlier checkpoint (--keep-every N keeps a copy every N epochs)")
        raise FloatingPointError(f"{path} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}) and cannot be "
                                 f"continued: start a new run in another --output-dir with --resume {older}")


def encoder_export(vit, method):
    """The method-independent part of every checkpoint: enough for eval_probe.py to rebuild the encoder."""
    return {"encoder": vit.state_dict(), "encoder_args": dict(vit.config), "method": method}


def load_state(module, state, what, path):
    """load_state_dict(strict) with a one-line error for a checkpoint of another architecture."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3])[:300]
        raise UserError(f"{path}: {what} does not match this model ({detail})") from None


def check_output_dir(path, prepare=None):
    """Create the output directory and make sure it is writable before hours of training. prepare(path) runs in
    between (TrainRun: take the folder's lock, then remove what a killed save left, which may fill the disk)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if prepare is not None:
            prepare(path)
        probe = path / f".write_test{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory {path} is not writable ({e.strerror or e})") from None
    return path


LOCK_FILE = ".lock"  # in the output folder while a run trains there
LOCK_HEARTBEAT_S = 30  # the owner refreshes the lock file's modification time this often
LOCK_STALE_S = 300  # another host's lock whose heartbeat is older than this is stale: its owner was killed
LOCK_UNWRITTEN_S = 10  # an empty or unreadable lock older than this is stale: its owner writes it at once


def process_start(pid):
    """(alive, start) of process `pid` of this host; start: its start time in clock ticks since boot on Linux (tells a
    reused pid apart), None where unknown. A zombie (ended, not yet reaped) is not alive."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after "pid (command)"
        return fields[0] != "Z", fields[19]
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except PermissionError:  # alive, another user's
        pass
    return True, None


def lock_heartbeat(path, stop):
    while not stop.wait(LOCK_HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(path)


def release_lock(path, stop, mine):
    stop.set()
    with contextlib.suppress(OSError):
        if path.read_text() in ("", mine):  # still ours (empty: created, never written)
            path.unlink()


class OutputLock:
    """One training run per output folder. output-dir/.lock names its owner (host, boot id, pid, process start time,
    start date), written as soon as the file is created; a daemon thread refreshes its modification time, the
    heartbeat, every LOCK_HEARTBEAT_S seconds. An existing lock is taken over when its owner is this process (a run
    that ended by an exception in-process) or a process of this host that has ended (pid gone or reused, or the host
    rebooted since), or when it is still empty or unreadable LOCK_UNWRITTEN_S seconds after its last change (its
    owner was killed between creating and writing it). Another host's lock is taken over once its heartbeat is
    LOCK_STALE_S seconds old: the run waits for that (a requeue on another node after a hard kill), and is refused if
    the owner is still alive after that long. A live owner of this host: refused at once. Refusals, a stale lock that
    cannot be removed (a read-only folder) and a stop signal while waiting are one line. Removed by `release` or when
    the process ends."""
    def __init__(self, folder):
        self.path = Path(folder) / LOCK_FILE
        boot = Path("/proc/sys/kernel/random/boot_id")
        self.me = {"host": socket.gethostname(), "boot": boot.read_text().strip() if boot.exists() else "",
                   "pid": os.getpid(), "start": process_start(os.getpid())[1],
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        waited, said = 0.0, False
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # atomic, also on NFS
            except FileExistsError:
                text, who, state = self.holder()
            else:
                with open(fd, "w") as f, contextlib.suppress(OSError):  # a full disk: written by start(), after the
                    f.write(json.dumps(self.me))                         # clean-up has freed some space
                break
            if state in ("ours", "ended"):
                if state == "ended" and text is not None:
                    print(f"warning: taking over the lock of {who}: that run has ended", file=sys.stderr, flush=True)
                try:
                    if self.path.read_text() == text:  # not replaced by another run meanwhile
                        self.path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as e:  # without this error the loop would try again and again
                    raise UserError(f"cannot remove the stale lock {self.path} of {who} ({e.strerror or e}): make "
                                    f"{self.path.parent} writable, or use another --output-dir") from None
                continue
            if state == "live" or waited >= LOCK_STALE_S:
                raise UserError(f"{self.path.parent} is in use by another run: {who}; wait for it to end or use "
                                f"another --output-dir")
            if stop_signal() is not None:
                raise Requeue(f"{signal.Signals(stop_signal()).name} while waiting for the lock of {who}; nothing "
                              f"was trained: run the same command again")
            if not said and state == "remote":
                print(f"{self.path.parent} is locked by {who} on another host: waiting up to {LOCK_STALE_S} s for "
                      f"its heartbeat to stop", flush=True)
                said = True
            poll = min(5.0, LOCK_STALE_S / 10, LOCK_UNWRITTEN_S / 10)
            time.sleep(poll)
            waited += poll
        self.stop = threading.Event()
        self.release = weakref.finalize(self, release_lock, self.path, self.stop, json.dumps(self.me))

    def holder(self):
        """(text of the lock file, its owner in words, state): 'ours' (this process), 'ended' (stale), 'live' (a
        process of this host), 'remote' (another host's, with a fresh heartbeat), 'unwritten' (empty or unreadable,
        changed less than LOCK_UNWRITTEN_S ago: its owner is writing it)."""
        try:
            text, age = self.path.read_text(), time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None, "nobody", "ended"
        try:
            owner = json.loads(text)
        except ValueError:
            owner = None
        if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
            who = f"an {'empty' if not text else 'unreadable'} lock file (a run killed while taking it)"
            return text, who, "unwritten" if age < LOCK_UNWRITTEN_S else "ended"
        who = f"host {owner.get('host', '?')}, pid {owner['pid']}, started {owner.get('started', '?')}"
        if owner.get("host") != self.me["host"]:
            return text, who, "remote" if age < LOCK_STALE_S else "ended"
        if owner.get("boot") != self.me["boot"]:
            return text, who, "ended"  # the host rebooted since
        if owner["pid"] == self.me["pid"]:
            return text, who, "ours"
        alive, start = process_start(owner["pid"])
        return text, who, "live" if alive and start == owner.get("start") else "ended"

    def start(self):
        """Write the owner into the lock (again: the first write fails on a full disk, and the folder's clean-up that
        comes before this call frees the space) and start the heartbeat."""
        self.path.write_text(json.dumps(self.me))
        threading.Thread(target=lock_heartbeat, args=(self.path, self.stop), daemon=True).start()


ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")
STATE_DICT_KEYS = ("encoder", "teacher", "target_encoder", "model", "state_dict", "student", "module", "net")
STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.", "student.", "teacher.", "model.")


def strip_prefixes(state):
    """Remove wrapper prefixes (module., _orig_mod., backbone., encoder., ...) however they are stacked."""
    out = {}
    for k, v in state.items():
        while k.startswith(STRIP_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def find_encoder_state(ckpt):
    """The ViT encoder state dict inside a checkpoint of this project or a public one (MAE, DINO, iBOT, timm): the
    ViT keys only (decoders, heads, mask tokens and fc_norm dropped)."""
    candidates = [ckpt] + [ckpt[k] for k in STATE_DICT_KEYS if isinstance(ckpt.get(k), dict)]
    for cand in candidates:
        state = strip_prefixes({k: v for k, v in cand.items() if torch.is_tensor(v)})
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
    """Rebuild the encoder of any checkpoint: this project's format (encoder + encoder_args) or a public ViT with the
    common key names (architecture inferred from the shapes; `num_heads` overrides the inferred head count, which
    shapes cannot tell). Strict: every encoder key must match."""
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


# ---------------------------------------------------------------------------------------------------- 9. optimizer
def param_groups(model, weight_decay, no_decay):
    """AdamW groups: weight decay on every trainable parameter except those where no_decay(name, param) is True.
    Each method passes its own official code's rule (a small predicate next to its optimizer line)."""
    decay, skip = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (skip if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": skip, "weight_decay": 0.0}]


def build_adamw(model, weight_decay, lr, no_decay, betas=(0.9, 0.95)):
    """AdamW (MAE betas) over param_groups. fused=True: one kernel for all parameters, the same update as the for-each
    version up to rounding (about 3x faster on CPU for ViT-B: 687 vs 2041 ms per step, and faster on CUDA)."""
    return torch.optim.AdamW(param_groups(model, weight_decay, no_decay), lr=lr, betas=betas, fused=True)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------- 10. logging and MFU
class NonFiniteGuard:
    """Stops training on a NaN / inf loss, and lets every process see a stop request (SIGTERM / SIGUSR1, see
    `stop_signal`) after the same step, without a host sync per step: step t's two flags (loss not finite, stop
    asked) are combined over the processes (with `dist`: an asynchronous all-reduce MAX), copied to pinned memory
    asynchronously and read at step t + 1 (or at `flush`, before every checkpoint). Every process then raises at the
    same step, or finds `stop` True after the same step (a single process finds its own request at once)."""
    def __init__(self, dist=None):
        self.dist, self.pending, self.stop = dist, None, False

    def check(self, loss, step):
        asked = stop_signal() is not None
        flags = torch.stack([~torch.isfinite(loss.detach()).all(), torch.full((), asked, device=loss.device)]).float()
        work = event = None
        if self.dist is not None and self.dist.world > 1:
            work = torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX, async_op=True)
        else:
            self.stop = self.stop or asked
        if flags.device.type == "cuda":
            if work is not None:  # NCCL: the copy below waits for the all-reduce on the device, the host does not
                work.wait()
                work = None
            host = torch.empty(2, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flags = host
        previous, self.pending = self.pending, (flags, work, event, step)
        if previous is not None:
            self._raise_if_bad(*previous)

    def flush(self):
        if self.pending is not None:
            self._raise_if_bad(*self.pending)
            self.pending = None

    def _raise_if_bad(self, flags, work, event, step):
        if work is not None:
            work.wait()  # gloo: step t's all-reduce, done in the background meanwhile
        if event is not None:
            event.synchronize()  # waits for step t only, while step t + 1 is already queued
        bad, stop = flags.tolist()
        self.stop = self.stop or stop > 0
        if bad > 0:
            raise FloatingPointError(f"non-finite loss at step {step}; training stopped, the checkpoint on disk is "
                                     f"the last good one")


class StepLogger:
    """Rank 0 progress and logs. Metrics are summed as device tensors and read (one host sync) every `every` steps,
    when the progress bar (on a terminal; else a plain line: `start_progress`) shows their means with images/s, the
    data-loading share of the time and MFU (when `flops_per_image` is set and the device's peak is known).
    `epoch_summary` appends a JSON line per epoch to log.jsonl and prints it as a line of its own."""
    def __init__(self, dist, output_dir, every=20, total_steps=None):
        self.dist, self.every, self.total_steps = dist, every, total_steps
        self.log_path = Path(output_dir) / "log.jsonl"
        self.bad_seen, self.bad_in_epoch, self.bad_read, self.samples_read = set(), 0, 0, 0
        self.flops_per_image, self.peak = None, device_peak_flops(dist.device)
        self.progress = self.bar = None  # made at the first step, which may follow a resume
        self.start_epoch()

    def start_epoch(self):
        self.sums, self.count, self.images, self.data_time = {}, 0, 0, 0.0
        self.bad_in_epoch, self.t0 = 0, time.perf_counter()
        self.interval_images, self.interval_data, self.t_interval = 0, 0.0, self.t0

    def rates(self, images, data_time, seconds):
        """images/s over all processes, share of the time spent waiting for data, and MFU per device."""
        out = {"images_per_s": images * self.dist.world / max(seconds, 1e-9), "data_share": data_time / max(seconds, 1e-9)}
        if self.flops_per_image and self.peak:
            out["mfu"] = self.flops_per_image * out["images_per_s"] / self.dist.world / self.peak
        return out

    def note_bad(self, bad, dataset):
        """bad: CPU tensor [B] of indices of unreadable files in the batch (-1 where fine); reports each file once.
        Stops the run (DataError) when more than BAD_SHARE of the samples this process read since start-up, once they
        are at least BAD_MIN_SAMPLES, were unreadable: such data needs fixing, not training (a whole unreadable class
        already stops SeededDataset)."""
        self.samples_read += len(bad)
        for i in bad[bad >= 0].tolist():
            self.bad_in_epoch, self.bad_read = self.bad_in_epoch + 1, self.bad_read + 1
            if i not in self.bad_seen:
                self.bad_seen.add(i)
                self.write(f"warning: skipped unreadable image {dataset.path(i)}", file=sys.stderr)
        if self.samples_read >= BAD_MIN_SAMPLES and self.bad_read > BAD_SHARE * self.samples_read:
            raise DataError(f"{self.bad_read} of the {self.samples_read} images read so far were unreadable (more "
                            f"than {BAD_SHARE:.0%}); fix or remove the files reported above")

    def update(self, step, metrics, images, data_time):
        """metrics: dict of 0-d tensors (kept on device) or floats; logs every `every` steps. step: steps done."""
        for k, v in metrics.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count, self.images, self.data_time = self.count + 1, self.images + images, self.data_time + data_time
        self.interval_images, self.interval_data = self.interval_images + images, self.interval_data + data_time
        if self.progress is None and self.dist.is_main and self.total_steps:
            self.start_progress(step)
        if self.progress is not None:
            if self.bar is not None:
                self.bar.update(1)
            if step % self.every == 0:  # the only host sync of the loop: once per log interval
                shown = self.means()  # and schedule values (floats: lr, momentum) as they are now, not their means
                shown.update({k: float(v) for k, v in metrics.items() if not torch.is_tensor(v)})
                now = time.perf_counter()
                shown.update(self.rates(self.interval_images, self.interval_data, now - self.t_interval))
                self.interval_images, self.interval_data, self.t_interval = 0, 0.0, now
                self.show(step, {"loss": shown.pop("loss"), **shown} if "loss" in shown else shown, now)

    def start_progress(self, step):
        """A tqdm bar (on stderr) when stdout and stderr are both a terminal; else, as in a file or under a job
        scheduler, a plain line on stdout every `every` steps (a bar there is a stream of carriage returns)."""
        self.progress = (time.perf_counter(), step - 1)  # (when, steps done) at the first step of this process
        if all(getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr)):
            from tqdm import tqdm
            self.bar = tqdm(total=self.total_steps, initial=step - 1, dynamic_ncols=True, mininterval=1.0)

    def show(self, step, shown, now):
        """The running means in the bar, or a line `step 120/1920 loss=... lr=... images_per_s=... eta=0:05:12`."""
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            return
        t0, first = self.progress
        eta = int((now - t0) / max(step - first, 1) * (self.total_steps - step))
        print(f"step {step}/{self.total_steps} " + " ".join(f"{k}={v:.4g}" for k, v in shown.items()) +
              f" eta={eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}", flush=True)

    def write(self, line, file=None):
        """Print a whole line, on a line of its own also while the progress bar is shown."""
        if self.bar is not None:
            self.bar.write(line, file=file or sys.stdout)
            (file or sys.stdout).flush()
        else:
            print(line, file=file or sys.stdout, flush=True)

    def means(self, all_ranks=False):
        """Means since the epoch started (over all processes with all_ranks: a collective, every rank must call)."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        sums = torch.stack([self.sums[k].to(self.dist.device) for k in keys]) / max(self.count, 1)
        if all_ranks:
            self.dist.all_reduce_mean(sums)
        return dict(zip(keys, sums.tolist()))

    def epoch_summary(self, epoch, **extra):
        elapsed = time.perf_counter() - self.t0
        row = {"epoch": epoch, **self.means(all_ranks=True), **self.rates(self.images, self.data_time, elapsed),
               "data_time_s": self.data_time, "step_time_s": elapsed - self.data_time, "epoch_time_s": elapsed,
               "bad_images": self.bad_in_epoch, **extra}
        if self.dist.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        self.start_epoch()
        return row

    def close(self):
        if self.bar is not None:
            self.bar.close()


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                   "A10G": 70e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}  # dense


def device_peak_flops(device):
    """Dense bf16 peak FLOP/s of a CUDA device, looked up by name; None on CPU or for an unknown device."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def attention_flops(q_shape, k_shape, v_shape, *_, out_shape=None, **__):
    """Fused attention forward, Q [B, H, N, d], K [B, H, M, d], V [B, H, M, d_v]:
    S = Q K^T (2 B H N M d) and O = softmax(S) V (2 B H N M d_v); the softmax is not counted (like torch)."""
    b, h, n, d = q_shape
    m, d_v = k_shape[2], v_shape[3]
    return 2 * b * h * n * m * (d + d_v)


def attention_backward_flops(grad_shape, q_shape, k_shape, v_shape, *_, out_shape=None, **__):
    """Fused attention backward, counted as torch counts its CUDA flash / memory-efficient kernels: S = Q K^T
    recomputed (2 B H N M d), dP = dO V^T and dV = P^T dO (2 x 2 B H N M d_v), dQ = dS K and dK = dS^T Q
    (2 x 2 B H N M d)."""
    b, h, n, d = q_shape
    m, d_v = k_shape[2], v_shape[3]
    return 2 * b * h * n * m * (3 * d + 2 * d_v)


def count_flops(fn):
    """FLOPs of calling fn() (forward and backward if fn does both), counted by torch's FlopCounterMode:
    2 FLOPs per multiply-add of matmuls, convolutions and attention (not norms, softmax, GELU or additions).

    Why the extra formulas: torch has FLOP formulas for the CUDA attention kernels (flash, memory-efficient, cuDNN)
    but not for the fused CPU kernel that F.scaled_dot_product_attention runs on CPU, which it counts as 0 (ViT-B/16
    forward: 33.7 instead of 35.1 GFLOP). Only that CPU op is added, and only where torch has no formula of its own;
    each attention call dispatches exactly one of these ops, so CUDA counts are unchanged and nothing counts twice."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry
    cpu_ops = {"_scaled_dot_product_flash_attention_for_cpu": attention_flops,
               "_scaled_dot_product_flash_attention_for_cpu_backward": attention_backward_flops}
    extra = {op: f for op, f in ((getattr(torch.ops.aten, n, None), f) for n, f in cpu_ops.items())
             if op is not None and op not in flop_registry}
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------ 11. arguments and errors
class UserError(Exception):
    """A problem with the user's input (paths, flags, files): printed as one line, exit code 2, no traceback."""


class DataError(UserError):
    """Too many unreadable images to go on. Raised in a loader worker, it reaches the main process re-created by the
    DataLoader from a message that ends with the worker's traceback: only its last line, the message, is kept."""
    def __init__(self, msg):
        if "\nOriginal Traceback" in msg:
            msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(msg)


EXIT_USER_ERROR, EXIT_NON_FINITE, EXIT_REQUEUE = 2, 3, 75  # 75: EX_TEMPFAIL of sysexits.h, "try again later"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what SLURM and Kubernetes send some time before a kill
_stop_signal = [None]


class Requeue(Exception):
    """Training stopped on a stop request after its checkpoint was written: exit code EXIT_REQUEUE, run it again."""


def stop_signal():
    """The stop signal (SIGTERM / SIGUSR1) that this process received since run_main started, or None."""
    return _stop_signal[0]


def _note_stop_signal(signum, frame):  # only noted: the loop saves after the current optimizer step, then exits
    _stop_signal[0] = signum


def run_main(main, parser):
    """Start-up of every script: parse the flags, set the precision flags, catch SIGTERM / SIGUSR1 (the training loop
    then saves after the current optimizer step and stops), run `main(args)`. One line and an exit code, no
    traceback: 2 for a user error, 3 for a non-finite loss, 75 (EXIT_REQUEUE) for a stop request after its checkpoint;
    under torchrun every process exits so (torchrun's own exit code is 1 then: see the README, Long runs)."""
    args = parser.parse_args()
    if int(os.environ.get("RANK", 0)) == 0:  # the log's first line: the whole configuration of the run
        print(resolved_command(parser, args), flush=True)
    set_precision_flags()
    _stop_signal[0] = None
    previous = {s: signal.signal(s, _note_stop_signal) for s in STOP_SIGNALS}
    try:
        main(args)
    except (UserError, FloatingPointError, Requeue) as e:
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", [])):  # end the progress bar's line first
            bar.close()
        print(f"{'stopped' if isinstance(e, Requeue) else 'error'}: {e}", file=sys.stderr)
        sys.exit(EXIT_REQUEUE if isinstance(e, Requeue) else EXIT_USER_ERROR if isinstance(e, UserError) else
                 EXIT_NON_FINITE)
    finally:
        _stop_signal[0] = None
        # Under torchrun, a process that exits with an error code makes torchrun SIGTERM the others, which may be
        # exiting with the same code: they ignore it (SIG_IGN also holds through Python's shutdown) to keep theirs.
        several = int(os.environ.get("WORLD_SIZE", 1)) > 1
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if several else handler)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every flag's default after its help text: '(default: off)' for a switch, nothing for a required
    flag, and for an unset default (None or '') the help text's own words where it says 'default', else 'none'."""
    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is None or action.default == "":
            return text if "default" in text else text + " (default: none)"
        if action.nargs == 0:  # a switch
            return text + (" (default: on)" if action.default == action.const else " (default: off)")
        if isinstance(action.default, (list, tuple)):  # as on the command line: --nb-knn 10 20
            return f"{text} (default: {' '.join(map(str, action.default))})"
        return super()._get_help_string(action)

    def _split_lines(self, text, width):  # as argparse, but a flag such as --warmup-epochs stays on one line
        import textwrap
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with every default in --help (HelpFormatter, also for sub-commands: add_parser makes this class) and
    named recipes: `--recipe NAME` reads the flags recipes[NAME] before the command line's, so that a flag given on
    the command line wins over the recipe, also where it repeats the parser's default. The first recipe is the
    default and should be the parser's own defaults (the papers' recipe, no flags)."""
    def __init__(self, *args, recipes=None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.recipes = dict(recipes or {})
        if self.recipes:
            shown = "; ".join(f"{name}: {flags or 'the defaults below'}" for name, flags in self.recipes.items())
            self.add_argument("--recipe", choices=list(self.recipes), default=next(iter(self.recipes)),
                              help=f"a named set of flags, read before the command line's (which win): {shown}")

    def parse_known_args(self, args=None, namespace=None):
        if self.recipes:  # (a sub-command's parser is called here with its own part of the command line)
            args = sys.argv[1:] if args is None else list(args)
            find = argparse.ArgumentParser(prog=self.prog, add_help=False)  # --recipe only: no error for the others
            find.add_argument("--recipe", choices=list(self.recipes), default=next(iter(self.recipes)))
            args = self.recipes[find.parse_known_args(args)[0].recipe].split() + args
        return super().parse_known_args(args, namespace)


def resolved_command(parser, args):
    """The run's whole configuration as one command line, `prog (recipe NAME): --flag value ...`: every flag with its
    value after the recipe and the defaults (switches only when on; flags that are unset or empty left out)."""
    words = []
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if isinstance(action, argparse._SubParsersAction):  # e.g. `semmae.py parts`: that sub-command's flags
            return resolved_command(action.choices[value], args)
        if not action.option_strings or action.dest == "recipe" or value is None or value == "":
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:
            words += [flag] if value == action.const else []
        else:
            words += [flag, *(shlex.quote(str(v)) for v in (value if isinstance(value, list) else [value]))]
    recipe = f" (recipe {args.recipe})" if getattr(args, "recipe", None) else ""
    return f"{parser.prog}{recipe}: {' '.join(words)}"


def add_common_args(parser, method="run"):
    """Flags shared by the three pretraining scripts (output in runs/<method>); each script sets its paper's defaults
    with set_defaults."""
    a = parser.add_argument
    a("--data", required=True, help="ImageNet-style folder with train/<class>/*.jpg, or 'synthetic' (no download)")
    a("--output-dir", default=f"runs/{method}", help="checkpoints, log.jsonl; a run resumes from its checkpoint here")
    a("--model", default="base", help=f"ViT preset: {', '.join(VIT_PRESETS)}")
    a("--patch-size", type=int, default=None, help="override the preset's patch size (default: the preset's)")
    a("--input-size", type=int, default=224, help="encoder image size")
    a("--epochs", type=int, default=800, help="training epochs")
    a("--warmup-epochs", type=float, default=40, help="linear lr warmup, in (fractional) epochs")
    a("--batch-size", type=int, default=64, help="per process and micro-step")
    a("--accum", type=int, default=1, help="gradient accumulation steps; effective batch = batch x procs x accum")
    a("--blr", type=float, default=1.5e-4, help="base lr: lr = blr * effective batch / 256")
    a("--lr", type=float, default=None, help="absolute lr (overrides --blr; default: from --blr)")
    a("--weight-decay", type=float, default=0.05, help="AdamW weight decay (none on the parameters each script "
                                                       "exempts)")
    a("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="data loading processes per process")
    a("--seed", type=int, default=0, help="seed of the initial weights, data order, augmentation and masks")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when there is a GPU")
    a("--compile", action="store_true", help="torch.compile the model (checkpoint keys stay clean)")
    a("--save-every", type=int, default=0, help="also checkpoint every N optimizer steps (0: at epoch ends only)")
    a("--keep-every", type=int, default=0, help="keep a copy of the checkpoint every N epochs (0: only the latest)")
    a("--log-every", type=int, default=20, help="running means every N optimizer steps: in the progress bar on a "
                                                "terminal, else one line each")
    a("--resume", default="", help="checkpoint that seeds a new run; once output-dir has its own checkpoint.pth, "
                                   "the run continues from that one")
    a("--max-steps", type=int, default=0, help="stop after this many optimizer steps in total (0: no limit)")
    a("--synthetic-size", type=int, default=2048, help="number of training images of --data synthetic")
    return parser


def add_bench_args(parser):
    """--bench / --profile of the pretraining scripts (see `benchmark`)."""
    parser.add_argument("--bench", action="store_true", help="time the training step on random tensors, then exit")
    parser.add_argument("--bench-steps", type=int, default=10, help="timed steps of --bench (after 2 warm-up steps)")
    parser.add_argument("--profile", action="store_true", help="with --bench: where the time of a step goes")
    return parser


def check_common_args(args):
    for name in ("epochs", "batch_size", "accum", "log_every", "synthetic_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.patch_size is not None and args.patch_size < 1:
        raise UserError("--patch-size must be at least 1")
    if not 0 <= args.warmup_epochs <= args.epochs:  # also refuses nan
        raise UserError("--warmup-epochs must be between 0 and --epochs")
    if args.num_workers < 0 or args.save_every < 0 or args.max_steps < 0 or args.keep_every < 0:
        raise UserError("--num-workers, --save-every, --max-steps and --keep-every must be non-negative")
    check_lr_and_device(args)


def check_lr_and_device(args):
    """Flags that pretraining and eval_probe.py share: finite positive --blr / --lr, finite non-negative
    --weight-decay, and --device cuda only where there is a GPU."""
    for name in ("blr", "lr"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{name} must be a finite positive number, got {value}")
    if args.weight_decay is not None and not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise UserError(f"--weight-decay must be a finite non-negative number, got {args.weight_decay}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA GPU (use --device cpu or auto)")


# -------------------------------------------------------------------------------------------- 12. the training run
FREE_FLAGS = {  # flags that a resume may change: they do not change what is trained (see TrainRun.check_resume)
    "recipe",  # its flags are compared one by one
    "output_dir", "resume", "num_workers", "log_every", "save_every", "keep_every", "device", "compile", "max_steps",
    "bench", "bench_steps", "profile", "bench_baseline", "vis", "vis_images", "preview", "out",
    "batch_size", "accum",  # the effective batch (processes x batch x accum) is compared instead
    "data",  # a dataset that moved: its images (count and names) are compared instead
    "eval_every", "output", "nb_knn", "temperature", "loo", "cached",  # eval_probe.py: evaluation only
}


def training_changes(saved, now):
    """The flags whose value differs between a checkpoint's arguments and this run's, among those that change what
    is trained (not FREE_FLAGS), as '--flag old -> new'. Flags that one of the two runs does not have are skipped."""
    return [f"--{k.replace('_', '-')} {saved[k]} -> {v}" for k, v in now.items()
            if k in saved and k not in FREE_FLAGS and saved[k] != v]


class TrainRun:
    """One pretraining run: where it is (epoch, global step, optimizer steps of the epoch done; saved in every
    checkpoint and restored by `resume`) and the plumbing that the loop in each method file calls, in this order:
    `resume`, `wrap`, then per epoch `epoch_batches` and `steps`, per step `lr`, `next_batch` / `step_random` /
    `no_sync` for each micro-batch, `step_done`, `preempted` (then `save` and `exit_for_requeue`), and `save` /
    `end_epoch`. It acts only when called, apart from the output folder's lock, taken at the start (OutputLock)."""
    def __init__(self, args, method, dataset):
        self.args, self.method, self.dataset = args, method, dataset
        self.dist = Dist(args.device)
        self.device = self.dist.device
        self.out, self.lock = Path(args.output_dir), None
        self.all_processes(lambda: check_output_dir(self.out, self.claim) if self.dist.is_main else None)
        a, d = args, self.dist
        self.sampler = ResumableSampler(len(dataset), a.batch_size, d.world, d.rank, a.accum, a.seed)
        self.loader = make_loader(dataset, a.batch_size, a.num_workers, self.sampler)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = self.steps_per_epoch * a.epochs
        self.effective_batch = a.batch_size * d.world * a.accum
        self.peak_lr = a.lr if a.lr is not None else a.blr * self.effective_batch / 256
        self.epoch = self.step = self.epoch_step = 0  # epoch_step: optimizer steps of the current epoch already done
        self.current_lr, self.data_time, self.images, self.saved_at = 0.0, 0.0, None, None
        self.guard = NonFiniteGuard(d)
        self.logger = StepLogger(d, self.out, a.log_every, self.total_steps)
        d.print(f"{method}: {len(dataset)} images, {self.steps_per_epoch} steps/epoch, effective batch "
                f"{self.effective_batch}, lr {self.peak_lr:.3g}, device {self.device}, {d.world} process(es)")

    def all_processes(self, fn):
        """fn() on every process -> the list of every process's result. A UserError on any process is raised on all
        of them (naming the process), so that they stop together with one clear message instead of hanging in the
        next collective. Used at start-up, resume and save."""
        if self.dist.world == 1:
            return [fn()]
        failure = None
        try:
            mine = (fn(), None)
        except Exception as e:  # a UserError, or a bug (raised as it is here): the others must not wait for this one
            failure, mine = e, (None, str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
        every = [None] * self.dist.world
        torch_dist.all_gather_object(every, mine)
        for rank, (_, error) in enumerate(every):
            if error is not None:
                if failure is not None and not isinstance(failure, UserError):
                    raise failure
                raise UserError(f"process {rank}: {error}")
        return [result for result, _ in every]

    def claim(self, folder):
        """Process 0, inside check_output_dir: lock the output folder (OutputLock) before anything is removed, then
        remove only what a save killed half-way left (.checkpoint*.tmp*)."""
        self.lock = OutputLock(folder)
        for stale in folder.glob(".checkpoint*.tmp*"):
            stale.unlink(missing_ok=True)
        self.lock.start()

    def image_names(self):
        """The training images as a resume compares them: their count and a hash of their names (class folder / file;
        not the path above it, so that a dataset copied elsewhere still matches)."""
        if self.images is None:
            base, digest = getattr(self.dataset, "base", self.dataset), hashlib.sha1()
            for i in range(len(base)):  # as bytes (os.fsencode): on POSIX a name need not be valid UTF-8
                name = "/".join(str(base.path(i)).replace(os.sep, "/").rsplit("/", 2)[-2:])
                digest.update(os.fsencode(name) + b"\n")
            self.images = {"count": len(base), "sha1": digest.hexdigest()}
        return self.images

    def resume(self, model, optimizer):
        """Continue from output-dir/checkpoint.pth when there is one, else from --resume, which so only seeds a new run
        (a requeued command naming another run's checkpoint continues its own): weights (teachers included), optimizer
        state and position. Process 0 picks the file; every process loads it and must find the same position (else a
        clear error: a process that sees another output folder); `check_resume` refuses other settings."""
        path = self.all_processes(self.checkpoint_to_resume)[0]
        if path is None:
            return
        loaded = {}

        def load():
            if not self.dist.is_main and not Path(path).is_file():
                raise UserError(f"cannot read {path}, from which process 0 resumes: every process must see process "
                                f"0's output folder (a shared file system)")
            loaded["ckpt"] = load_training_checkpoint(path, self.method)
            position = self.check_resume(loaded["ckpt"], path)
            check_finite_weights(loaded["ckpt"]["model"], path)
            return position
        positions = self.all_processes(load)
        for rank, position in enumerate(positions):
            if position != positions[0]:
                raise UserError(f"process {rank} reads {path} at (epoch, step) {position[:2]}, process 0 at "
                                f"{positions[0][:2]}: every process must see process 0's output folder")
        ckpt = loaded["ckpt"]
        load_state(model, ckpt["model"], "the model", path)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{path}: the optimizer state does not match this model ({e})") from None
        self.epoch, self.step, self.epoch_step = positions[0]
        self.dist.print(f"resumed from {path}: epoch {self.epoch}, step {self.step}")

    def checkpoint_to_resume(self):
        """Process 0: output-dir/checkpoint.pth when there is one, else --resume, else None (a new run)."""
        if not self.dist.is_main:
            return None
        own, seed = self.out / "checkpoint.pth", self.args.resume
        if own.is_file():
            if seed and Path(seed).resolve() != own.resolve():
                print(f"{own} exists: continuing this run from it (--resume {seed} only seeds a new run)", flush=True)
            return str(own)
        return seed or None

    def check_resume(self, ckpt, path):
        """(epoch, step, optimizer steps of the epoch done) of a checkpoint, once it is clear that this run may go on
        from it: the same flags where they change what is trained (training_changes), the same images, the same
        effective batch. The layout (processes x batch x accum) may change: the position is stored in samples of the
        epoch's order, which every layout of one effective batch reads alike (ResumableSampler, StepRandom).
        Checkpoints that stored `chunk` instead (micro-batches of their own --accum) are converted."""
        a, saved = self.args, ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
        missing = [k for k in ("epoch", "step") if k not in ckpt]
        if "samples" not in ckpt and "chunk" not in ckpt:
            missing.append("samples")
        if missing:
            raise UserError(f"{path} has no {', '.join(missing)}: not a complete training checkpoint")
        changes = training_changes(saved, vars(a))
        batch = ckpt.get("effective_batch", self.effective_batch)
        if batch != self.effective_batch:
            changes.append(f"effective batch {batch} -> {self.effective_batch} (processes x --batch-size x --accum)")
        images = ckpt.get("images", self.image_names())
        if images != self.image_names():
            changes.append(f"training images {images['count']} -> {self.images['count']}" +
                           (" (other names)" if images["count"] == self.images["count"] else ""))
        if changes:
            raise UserError(f"{path} was trained with other settings: {', '.join(changes)}; continue it with its own "
                            f"settings, or start a new run in another --output-dir")
        if "samples" in ckpt:
            return ckpt["epoch"], ckpt["step"], ckpt["samples"] // self.effective_batch
        # older: `chunk` micro-batches of its own --accum done, and no record of its number of processes
        epoch_step, rest = divmod(ckpt["chunk"], saved.get("accum", 1))
        same = saved.get("batch_size", a.batch_size) == a.batch_size and saved.get("accum", a.accum) == a.accum
        if rest or not same or ckpt["step"] != ckpt["epoch"] * self.steps_per_epoch + epoch_step:
            raise UserError(f"{path} counts its position in micro-batches (an older version): resume it once with its "
                            f"original --batch-size, --accum and number of processes")
        return ckpt["epoch"], ckpt["step"], epoch_step

    def wrap(self, model):
        """The model to call in the loop: torch.compile'd (--compile), then DDP-wrapped on several processes."""
        wrapped = torch.compile(model) if self.args.compile else model  # compile before the DDP wrap
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=ids)
        return wrapped

    def epoch_batches(self):
        """Iterator over this process's micro-batches of the current epoch, from the saved position on."""
        self.sampler.epoch, self.sampler.start_chunk = self.epoch, self.epoch_step * self.args.accum
        return iter(self.loader)

    def steps(self):
        """The global numbers of the optimizer steps left in the current epoch, ending early at --max-steps."""
        end = self.step + self.steps_per_epoch - self.epoch_step
        if self.args.max_steps:
            end = min(end, max(self.args.max_steps, self.step))
        return range(self.step, end)

    def lr(self, step, start_frac=0.0, end_frac=0.0):
        """Learning rate of optimizer step `step`: warmup + half-cosine over fractional epochs."""
        a = self.args
        self.current_lr = warmup_cosine(step / self.steps_per_epoch, a.epochs, a.warmup_epochs, self.peak_lr,
                                        start_frac, end_frac)
        return self.current_lr

    def next_batch(self, batches):
        """The next micro-batch's tensors on the device; unreadable files are reported, the wait for data timed."""
        t0 = time.perf_counter()
        *tensors, bad = next(batches)
        self.logger.note_bad(bad, self.dataset.base)
        tensors = [t.to(self.device, non_blocking=True) for t in tensors]
        self.data_time += time.perf_counter() - t0
        return tensors

    def step_random(self, step, micro):
        """The model-side randomness of micro-batch `micro` of optimizer step `step` (see StepRandom)."""
        a, d = self.args, self.dist
        return StepRandom.for_micro_step(a.seed, step, micro, a.batch_size, d.world, d.rank, a.accum, self.device)

    def no_sync(self, ddp_model, micro):
        """Skip DDP's gradient all-reduce on all but the last accumulation micro-step."""
        if self.dist.world > 1 and micro < self.args.accum - 1:
            return ddp_model.no_sync()
        return contextlib.nullcontext()

    def step_done(self, step, loss, metrics=None):
        """After optimizer step `step`: the position advances, the loss is checked (one step late, so without a host
        sync; a non-finite loss stops the run) and the progress bar updated."""
        self.guard.check(loss, step)
        self.step, self.epoch_step = step + 1, self.epoch_step + 1
        logged = {"loss": loss, "lr": self.current_lr, **(metrics or {})}
        self.logger.update(self.step, logged, self.args.batch_size * self.args.accum, self.data_time)
        self.data_time = 0.0

    def stopped_in_epoch(self):
        """True when --max-steps ended the epoch's steps before its end."""
        return self.epoch_step < self.steps_per_epoch

    def end_epoch(self, **extra):
        """The epoch is complete: the position moves to the next epoch's start; one summary line in log.jsonl (with
        `extra`, e.g. an evaluation's numbers)."""
        self.epoch, self.epoch_step = self.epoch + 1, 0
        self.logger.epoch_summary(self.epoch - 1, lr=self.current_lr, **extra)

    def preempted(self):
        """True once any process got SIGTERM or SIGUSR1 (noted by run_main), on every process after the same optimizer
        step (NonFiniteGuard agrees on it one step late, without a host sync): the loop then saves this step and calls
        `exit_for_requeue`."""
        return self.guard.stop

    def exit_for_requeue(self):
        """After the checkpoint of a stop request: every process stops with exit code EXIT_REQUEUE (75, run_main)."""
        self.logger.close()
        if self.lock is not None:
            self.lock.release()
        why = signal.Signals(stop_signal()).name if stop_signal() else "a stop signal to another process"
        raise Requeue(f"{why} after step {self.step - 1}; {self.out / 'checkpoint.pth'} holds it: run the same command "
                      f"to continue")

    def save(self, model, optimizer, encoder):
        """Write output-dir/checkpoint.pth atomically (rank 0): model, optimizer, position (epoch, step, samples of the
        epoch's order done), effective batch, images, arguments and the exported `encoder`; at an epoch's start also
        checkpoint-NNNN.pth every --keep-every epochs. Every process returns once it is written, or raises rank 0's
        error (a full disk). Never after a non-finite loss or with non-finite weights: that stops the run and keeps the
        last good checkpoint."""
        self.guard.flush()
        if self.saved_at == (self.epoch, self.step):  # e.g. --max-steps on an epoch's end: saved by its epoch end
            return
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()  # one host read
        if not finite:
            raise FloatingPointError(f"non-finite parameters after step {self.step - 1}; training stopped, the "
                                     f"checkpoint on disk is the last good one")

        def write():
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": self.epoch,
                     "samples": self.epoch_step * self.effective_batch, "step": self.step,
                     "effective_batch": self.effective_batch, "images": self.image_names(), "args": vars(self.args),
                     **encoder_export(encoder, self.method)}
            save_checkpoint(self.out / "checkpoint.pth", state)
            keep = self.args.keep_every
            if keep and self.epoch_step == 0 and self.epoch % keep == 0:
                save_checkpoint(self.out / f"checkpoint-{self.epoch:04d}.pth", state)
        self.all_processes(lambda: write() if self.dist.is_main else None)
        self.saved_at = (self.epoch, self.step)

    def finish(self):
        """After the loop: close the progress bar, wait for every process, unlock the output folder."""
        self.logger.close()
        self.dist.barrier()
        if self.lock is not None:
            self.lock.release()

    def measure_flops(self, model, *inputs):
        """Count the FLOPs of one forward + backward of model(inputs[0], rng, *inputs[1:]) per image (inputs: a small
        batch), so that the log shows MFU. Only where MFU can be computed (CUDA, known peak): it costs a step."""
        if self.logger.peak is None:
            return None
        batch = inputs[0].shape[0]
        rng = StepRandom(self.args.seed, -1, self.device, slice(0, batch), batch)
        with autocast(self.device):
            flops = count_flops(lambda: model(inputs[0], rng, *inputs[1:])[0].backward())
        model.zero_grad(set_to_none=True)
        self.logger.flops_per_image = flops / batch
        return self.logger.flops_per_image


# ------------------------------------------------------------------------------------------------- 13. benchmark
def timed(fn, device):
    """Wall time of one call of fn() in seconds (CUDA-synchronised) and the peak CUDA memory in GiB (None on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return seconds, torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def bench_report(name, seconds, batch, flops_per_image, device, memory=None):
    """One line (and a dict) with ms/step, images/s, GFLOP/image and MFU against the device's dense bf16 peak."""
    peak = device_peak_flops(device)
    row = {"bench": name, "device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
           "batch": batch, "ms_per_step": 1e3 * seconds, "images_per_s": batch / seconds,
           "gflop_per_image": flops_per_image / 1e9,
           "mfu": flops_per_image * batch / seconds / peak if peak else None, "peak_mem_gib": memory}
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if v is not None),
          flush=True)
    return row


PROFILE_LABELS = ("masking", "encoder", "teacher", "decoder", "loss", "backward", "optimizer", "ema")


@contextlib.contextmanager
def profile_labels(labels):
    """Label the parts of a model for the profiler from the outside, so that the model code carries no profiler
    calls: labels {label: (owner, attribute)} wraps owner.attribute (a method of a model, a sub-module's forward, a
    function of a script module) in record_function(label) while the context is open."""
    from torch.profiler import record_function
    saved = []
    for label, (owner, attr) in labels.items():
        def labelled(*a, _fn=getattr(owner, attr), _label=label, **kw):
            with record_function(_label):
                return _fn(*a, **kw)
        saved.append((owner, attr, vars(owner).get(attr)))
        setattr(owner, attr, labelled)
    try:
        yield
    finally:
        for owner, attr, old in reversed(saved):
            if old is None:
                delattr(owner, attr)  # a method of the class again
            else:
                setattr(owner, attr, old)


def profile_step(step_fn, device, labels, steps=3):
    """ms per step under each PROFILE_LABELS label (device time on CUDA, CPU time otherwise), printed and returned."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile_labels(labels), profile(activities=activities) as prof:
        for _ in range(steps):
            step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = {e.key: e for e in prof.key_averages()}
    total_key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    out = {k: getattr(events[k], total_key) / 1e3 / steps for k in PROFILE_LABELS if k in events}
    print("  profile (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()), flush=True)
    return out


def benchmark(cases, device, steps=10, compile=False, profile=False, seed=0):
    """--bench of every script: times the real optimizer step of each case on tensors already on the device (no data
    loader) after warm-up; several cases run interleaved step by step in one process, so that a busy machine slows
    them alike, and the median step is reported. FLOPs per image are counted on the eager model.
    cases: {name: (model, inputs, optimizer, after_step or None, labels)}, model(inputs[0], rng, *inputs[1:]) ->
    (loss, _); labels: the parts of the step for --profile (see profile_labels), which adds 'backward', 'optimizer'
    and 'ema' around those parts of the step."""
    from torch.profiler import record_function
    compiled = {n: (torch.compile(c[0]) if compile else c[0]) for n, c in cases.items()}

    def forward_backward(model, inputs):
        batch = inputs[0].shape[0]
        rng = StepRandom(seed, 0, device, slice(0, batch), batch)  # the same draws every step: timing only
        with autocast(device):
            loss, _ = model(inputs[0], rng, *inputs[1:])
        with record_function("backward"):
            loss.backward()

    def make_step(name):
        model, inputs, optimizer, after_step, _ = cases[name]

        def step():
            forward_backward(compiled[name], inputs)
            with record_function("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                with record_function("ema"):
                    after_step()
        return step

    flops_per_image, times, memory = {}, {n: [] for n in cases}, {}
    step_fns = {n: make_step(n) for n in cases}
    for name, (model, inputs, optimizer, _, _) in cases.items():
        flops_per_image[name] = count_flops(lambda: forward_backward(model, inputs)) / inputs[0].shape[0]
        optimizer.zero_grad(set_to_none=True)
        for _ in range(2):  # warm-up (allocator, autotuning, compilation)
            step_fns[name]()
    for _ in range(steps):
        for name in cases:
            seconds, memory[name] = timed(step_fns[name], device)
            times[name].append(seconds)
    rows = {}
    for name, (_, inputs, _, _, labels) in cases.items():
        median = sorted(times[name])[len(times[name]) // 2]
        rows[name] = bench_report(name, median, inputs[0].shape[0], flops_per_image[name], device, memory[name])
        if profile:
            rows[name]["profile_ms"] = profile_step(step_fns[name], device, labels)
    return rows


def make_jpeg_folder(root, count, seed=0):
    """`count` ImageNet-like JPEGs (about 500 x 375, quality 90, smooth content plus grain) in root/<class>/."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    shapes = SyntheticShapes(96, count, seed)
    for i in range(count):
        w, h = 400 + int(torch.randint(200, (), generator=g)), 300 + int(torch.randint(150, (), generator=g))
        img = F.interpolate(shapes.load(i)[0][None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
        img = (img + 12 * torch.randn(3, h, w, generator=g)).clamp(0, 255).to(torch.uint8)
        folder = Path(root) / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.jpg", quality=90)


def bench_loader(root, workers=(1, 2), batch=64, size=224, batches=8):
    """images/s of the training pipeline (JPEG decode + RandomResizedCrop + flip + normalise) per worker count."""
    ds = SeededDataset(ImageFolder(root), image_transform(pretrain_transform(size)))
    for n in workers:
        sampler = ResumableSampler(len(ds), batch)
        loader = make_loader(ds, batch, n, sampler)
        it = iter(loader)
        next(it)  # start-up (worker processes, first batch) is not timed
        t0, count = time.perf_counter(), 0
        for _ in range(min(batches, len(loader) - 1)):
            count += next(it)[0].shape[0]
        rate = count / (time.perf_counter() - t0)
        print(f"workers={n} images_per_s={rate:.1f} per_worker={rate / max(n, 1):.1f}", flush=True)
        del it, loader


if __name__ == "__main__":
    import tempfile
    parser = argparse.ArgumentParser(description="Data-loader benchmark: `python common.py bench-loader`")
    parser.add_argument("command", choices=["bench-loader"])
    parser.add_argument("--folder", default="", help="an existing image folder root/<class>/*.jpg (default: generate)")
    parser.add_argument("--images", type=int, default=1024, help="JPEGs to generate")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to try")
    parser.add_argument("--batch-size", type=int, default=64)
    cli = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not cli.folder:
            make_jpeg_folder(tmp, cli.images)
        bench_loader(cli.folder or tmp, [int(w) for w in cli.workers.split(",")], cli.batch_size,
                     batches=cli.images // cli.batch_size - 1)
