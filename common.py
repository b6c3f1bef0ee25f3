"""What a reader of the papers needs beside a method file, and nothing of the run's plumbing (train_utils.py):

   1. position embeddings           MAE's fixed 2-D sin-cos table (integer grid positions, all three methods)
   2. the ViT                       pre-LN blocks, stochastic depth, the encoder with the common parameter names
   3. patches, masks, randomness    patchify, gather, random masking, per-token standardisation, StepRandom
   4. the MAE-style decoder         mask tokens at the ids to predict (SemMAE, PCAE, Latent MIM's 'self' decoder)
   5. schedules, EMA, optimizer     warmup + half-cosine, momentum schedule, teacher <- EMA of the student, AdamW
   6. data                          ImageFolder, synthetic shapes, transforms, seeded samples, resumable order

Reproducibility (kill/resume and DDP == one process): the data order of epoch e is a permutation seeded by
(seed, e), of which optimizer step s, micro-step a and rank r always read the same slice (`ResumableSampler`); each
sample's augmentation is seeded by (seed, epoch, index); masks, jitter and drop path come from `StepRandom`, drawn for
the whole step's batch from a generator seeded by (seed, step). Bad arguments raise ValueError with the message a
user needs (the scripts show it as one line).
"""
import contextlib, math, os, sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


# ------------------------------------------------------------------------------------------ 1. position embeddings
def get_1d_sincos_pos_embed(embed_dim, pos):
    """omega_d = 1 / 10000^(d / (D/2)), d = 0..D/2-1;  emb(pos) = [sin(pos * omega), cos(pos * omega)]  -> [M, D]"""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0))
    out = pos.reshape(-1).double()[:, None] * omega[None]  # [M, D/2]
    return torch.cat([out.sin(), out.cos()], dim=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """MAE's fixed table [g*g (+1), D], row-major, at integer positions 0..g-1 for all three methods (the official
    Latent MIM code spaces them k g / (g - 1)); the first D/2 channels encode the column, the rest the row; cls 0."""
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
    """x through a stack of Blocks, their stochastic depth drawn from `rng` (the step's StepRandom) in ONE draw before
    the loop: a generator call in every block would break torch.compile's graph there."""
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
    """ViT encoder with the common parameter names (timm / MAE / DINO / iBOT) and fixed 2-D sin-cos positions, in
    pieces: methods embed any subset of patches, run the blocks one at a time and apply the final norm themselves."""
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 drop_path_rate=0.0):
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"--patch-size must be at least 1, got {patch_size}")
        if img_size < 1 or img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by the patch size {patch_size} (--input-size, "
                             f"--patch-size)")
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the width {embed_dim}")
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
        """Encode patches given as pixels [B, N, p*p*3] (`patchify` order, possibly jittered crops) at grid positions
        ids [B, N] -> [B, 1+N, D] normalised tokens, cls first; rng: stochastic depth (see run_blocks)."""
        x = self.prepend_cls(self.add_pos(self.embed_pixels(pixels), ids))  # [B, 1+N, D]
        return self.norm(self.forward_blocks(x, rng))

    def forward(self, imgs, ids=None):
        """[B, 3, H, W] -> [B, 1+N, D] normalised tokens (cls first) of patches ids (or all)."""
        return self.norm(self.forward_blocks(self.embed(imgs, ids)))


def preset_patch_size(model, patch_size=None):
    """The patch size of a preset (or the override)."""
    if model not in VIT_PRESETS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(VIT_PRESETS)}")
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
    """Model-side randomness of one optimizer step (masks, jitter, drop path): every draw is made for the whole step's
    batch from a generator seeded by (seed, step) and this process / micro-step keeps its rows, whatever the number
    of processes, the accumulation or a resume. rows=None: draws of exactly the given shape (figures, tests)."""
    def __init__(self, seed, step, device, rows=None, global_batch=None):
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(mix_seed(seed, step))
        self.device, self.rows, self.global_batch = device, rows, global_batch
        if StepRandom._take is StepRandom._draw and "torch._dynamo" in sys.modules:  # torch.compile is in use:
            StepRandom._take = torch.compiler.disable(StepRandom._draw)  # draw eagerly, keep the graph around it

    @classmethod
    def for_micro_step(cls, seed, step, micro, batch, world, rank, accum, device):
        start = (micro * world + rank) * batch  # matches ResumableSampler's order
        return cls(seed, step, device, slice(start, start + batch), batch * world * accum)

    def _draw(self, draw, shape):
        if self.rows is None:  # local use: shape includes the batch
            return draw(shape)
        return draw((self.global_batch, *shape))[self.rows]

    _take = _draw  # compiler.disable(_draw) once torch.compile has loaded dynamo: the decorator imports it (seconds)

    def rand(self, *shape):
        """Uniform [0, 1) of shape [B, *shape] (or `shape` itself for a local StepRandom)."""
        return self._take(lambda s: torch.rand(s, generator=self.gen, device=self.device), shape)

    def randint(self, high, *shape):
        return self._take(lambda s: torch.randint(high, s, generator=self.gen, device=self.device), shape)


# ------------------------------------------------------------------------------------------- 4. MAE-style decoder
class MAEDecoder(nn.Module):
    """MAE's decoder on the encoder tokens [cls, visible] and the ids of the patches to predict: embed, append one
    mask token per query, add fixed sin-cos positions (cls at zero, every token at its own patch: attention is
    permutation-equivariant, so this replaces MAE's unshuffle), run the blocks, norm, map the queries to `out_dim`.
    make_block: the block constructor (Latent MIM's cross-attention decoder brings its own)."""
    def __init__(self, enc_dim, grid_size, out_dim, decoder_dim=512, decoder_depth=8, decoder_heads=16, drop_path=0.0,
                 mask_token_std=0.02, make_block=None):
        super().__init__()
        if min(decoder_depth, decoder_heads) < 1 or decoder_dim % decoder_heads or decoder_dim % 4:
            raise ValueError(f"--decoder-depth and --decoder-heads must be at least 1 and --decoder-dim divisible by 4 "
                             f"and by --decoder-heads, got {decoder_depth}, {decoder_heads}, {decoder_dim}")
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


# ----------------------------------------------------------------------------- 5. schedules, EMA and optimizer
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


def param_groups(model, weight_decay, no_decay):
    """AdamW groups: weight decay on every trainable parameter except those where no_decay(name, param) is True.
    Each method passes its own official code's rule (a small predicate next to its optimizer line)."""
    decay, skip = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (skip if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": skip, "weight_decay": 0.0}]


def build_adamw(model, weight_decay, lr, no_decay, betas=(0.9, 0.95)):
    """AdamW (MAE betas) over param_groups; fused: one kernel for all parameters (about 3x faster on CPU for ViT-B)."""
    return torch.optim.AdamW(param_groups(model, weight_decay, no_decay), lr=lr, betas=betas, fused=True)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------------------------------------- 6. data
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's list
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # Pillow's modes of 16-bit greyscale PNG / TIFF
MAX_READ_TRIES = 10  # a sample's image and the next ones of its class tried before the run stops (SeededDataset)


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


def read_image(path):
    """The RGB PIL image of the regular file `path`; 16-bit greyscale (HIGH_BIT_MODES) is scaled to 8 bits,
    v -> round(v / 257), before the RGB conversion, which would clip it. Every failure is an OSError naming the file:
    not a regular file (a FIFO is opened non-blocking and refused), unreadable, truncated, not an image, or above
    Pillow's decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS: raise it at the top of the script to read it)."""
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


def is_folder(entry):  # False for a link loop, whose is_dir raises
    try:
        return entry.is_dir()
    except OSError:
        return False


def entry_kind(entry):
    """'image' for a regular file (or a link to one) with an extension in IMG_EXTENSIONS, else what ImageFolder
    skips: 'sub-folder', the extension, 'not a regular file' (FIFOs, devices, broken links) or 'unreadable entry' (a
    link loop, a vanished file: an entry's own error never stops the scan). is_dir / is_file follow links."""
    try:
        if not entry.name.lower().endswith(IMG_EXTENSIONS):
            return "sub-folder" if entry.is_dir() else os.path.splitext(entry.name)[1].lower() or "no extension"
        return "image" if entry.is_file() else "not a regular file"
    except OSError:
        return "unreadable entry"


class ImageFolder:
    """root/<class>/<image> with clear errors for a missing path, no class folders, an unreadable or empty class
    folder. Read: the regular files (or links to them) in a class folder with an extension in IMG_EXTENSIONS, as
    torchvision's ImageFolder (which also searches sub-folders); everything else is skipped, counted in `skipped`
    (see entry_kind) and reported in one line. `load(i)` -> (PIL RGB image, label), or OSError (see read_image);
    `class_range(i)` -> (start, end): the samples of i's class, among which SeededDataset finds a replacement."""
    def __init__(self, root):
        from collections import Counter
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"data directory not found: {root}")
        self.classes = sorted(d.name for d in os.scandir(root) if is_folder(d) and not d.name.startswith("."))
        if not self.classes:
            raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
        self.samples, self.ranges, skipped = [], [], Counter()
        read = f"read are regular files with the extensions {' '.join(IMG_EXTENSIONS)}"
        for label, name in enumerate(self.classes):
            files, others = [], sum(skipped.values())
            try:
                entries = list(os.scandir(root / name))
            except OSError as e:
                raise ValueError(f"cannot read class folder {root / name} ({e.strerror or e})") from None
            for entry in entries:
                kind = entry_kind(entry)
                if kind == "image":
                    files.append(entry.path)
                else:
                    skipped[kind] += 1
            if not files:
                others = sum(skipped.values()) - others
                raise ValueError(f"class folder {root / name} contains no images"
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


SYNTHETIC_CLASSES = ("disk", "square", "triangle", "ring", "cross", "h-stripes", "v-stripes", "d-stripes",
                     "checkerboard", "dots")


class SyntheticShapes:
    """Labelled images, a pure function of (seed, index): a shape or texture class (SYNTHETIC_CLASSES) at a random
    place and scale in random colours (no class information), so a probe reads structure. load(i) -> (uint8, label)."""
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
        raise ValueError(f"data directory not found: {root}")
    if not (root / split).is_dir():
        raise ValueError(f"{root} has no '{split}' folder (expected {root}/{split}/<class>/<image>)")
    return ImageFolder(root / split)


class DataError(ValueError):
    """Too many unreadable images to go on. From a loader worker it arrives with the worker's traceback appended:
    only the message is kept."""
    def __init__(self, msg):
        if "\nOriginal Traceback" in msg:
            msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(msg)


class SeededDataset(torch.utils.data.Dataset):
    """A dataset with `load(i)`, transformed: index i (evaluation) or (i, seed) from ResumableSampler, whose seed
    alone then draws the augmentation. An unreadable image is replaced by the next readable one of its class (the
    label stays right, the choice is deterministic) and reported in `bad` (its index, else -1). When it and the next
    MAX_READ_TRIES - 1 of its class fail: DataError, or with `defer_errors` (several processes) an image of the next
    class and bad = -2 - i, so that all processes stop together. Returns (*transformed sample, bad)."""
    def __init__(self, base, transform, defer_errors=False):
        self.base, self.transform, self.defer_errors = base, transform, defer_errors
        self.class_range = getattr(base, "class_range", lambda i: (0, len(self.base)))

    def __len__(self):
        return len(self.base)

    def load(self, i, tries=MAX_READ_TRIES):
        """(sample, bad) of image i, or of the next readable image of its class."""
        lo, hi = self.class_range(i)
        tries = min(tries, hi - lo)
        for attempt in range(tries):
            try:
                return self.base.load(lo + (i - lo + attempt) % (hi - lo)), -1 if attempt == 0 else i
            except OSError as e:
                error = e
        what = (f"none of the {tries} images of the class of {self.base.path(i)} can be read" if tries == hi - lo
                else f"neither {self.base.path(i)} nor the next {tries - 1} images of its class can be read")
        raise DataError(f"{what} (last: {error}); fix or remove the unreadable files")

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        try:
            sample, bad = self.load(i)
        except DataError:
            if not self.defer_errors:
                raise
            (sample, _), bad = self.load(self.class_range(i)[1] % len(self.base), tries=len(self.base)), -2 - i
        with seeded_draws(seed) if seed is not None else contextlib.nullcontext():
            return (*self.transform(*sample), bad)


@contextlib.contextmanager
def seeded_draws(seed):
    """torch's default CPU generator, which the transforms draw from, seeded with `seed` inside the block; outside a
    loader worker its state before the block comes back after it, so the main process's other draws are unchanged."""
    saved = None if torch.utils.data.get_worker_info() is not None else torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved)


class image_transform:
    """Adapt an image transform to the (image, label) samples of SeededDataset (`image`: the transform itself)."""
    def __init__(self, transform):
        self.image = transform

    def __call__(self, img, label):  # -> (transformed image, label)
        return self.image(img), label


class ResumableSampler(torch.utils.data.Sampler):
    """Epoch-seeded permutation in global batches: step s, micro-step a and rank r read perm[((s * accum + a) * world
    + r) * batch :][:batch]; yields (index, augmentation seed). Set `epoch` and `start_chunk` (micro-batches done)."""
    def __init__(self, length, batch, world=1, rank=0, accum=1, seed=0, shuffle=True):
        self.length, self.batch, self.world, self.rank, self.accum = length, batch, world, rank, accum
        self.seed, self.shuffle, self.epoch, self.start_chunk = seed, shuffle, 0, 0
        self.steps_per_epoch = length // (batch * world * accum)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {length} images, fewer than one global batch "
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
