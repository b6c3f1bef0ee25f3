"""PCAE: Progressively Compressed Auto-Encoder (Li, Wang, Zhang et al., "Progressively Compressed Auto-Encoder for
Self-supervised Representation Learning", ICLR 2023, OpenReview 8T4qmZbTkW7), a faithful reimplementation.

A student ViT f_theta sees the visible patches M.x; an EMA teacher f_bar sees the MASKED patches (1-M).x and, between
its blocks, discards the tokens most similar to the mean token (the paper's ranking S(x) and compression T(x; k)); a
decoder g_phi gets the student's tokens plus a mask token omega + position p for each patch the teacher KEPT and
predicts the teacher's features there. The paper's objective:

    max_{theta, phi, omega}  E_x  M{ f_bar[(1-M).x; k],  g_phi{ h[f_theta(M.x), omega + p] } }

with M the cosine similarity. Only ~10 % of the image is reconstructed and the teacher costs ~36 % of a full pass,
which is why a PCAE step is cheaper than a MAE-style step with the same encoder and decoder
(`--bench --bench-baseline`). Where the paper leaves details open, the authors' public re-implementation
(github.com/caddyless/PCAE) is followed, without its bugs (README).

    python pcae.py --recipe demo --data synthetic                                 # CPU demo
    torchrun --nproc_per_node=8 pcae.py --data /imagenet                           # the public recipe
"""
import copy, math, sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import (ArgumentParser, UserError, add_bench_args, add_common_args, add_decoder_args, check_common_args,
                 run_main)
from common import (MAEDecoder, SeededDataset, StepRandom, build_adamw, build_dataset, build_vit, ema_momentum,
                    ema_update, eval_transform, gather_tokens, image_transform, patchify, pretrain_transform,
                    random_masking, set_lr, standardize_tokens, unpatchify)
from figures import denormalize, figure_line, sample_across_classes, save_figure
from train_utils import TrainRun, autocast, load_state, load_training_checkpoint, pick_device


# ----------------------------------------------------------------------------------------- the paper's equations
def similarity_scores(x):
    """The score inside the paper's S(x) = rank(M(x, sum_j x^j / N_i)):  s_i = cos(x_hat_i, m),
    x_hat_i = x_i / ||x_i||,  m = (1/N_i) sum_j x_hat_j.

    x [B, n, D] -> [B, n]. Computed in fp32 so that bf16 rounding does not reorder near-ties. (The public code takes
    the dot product with the un-normalised m; dividing by ||m|| is one positive constant per image, same ranking.)"""
    x_hat = F.normalize(x.float(), dim=-1)  # [B, n, D]
    m = F.normalize(x_hat.mean(dim=1, keepdim=True), dim=-1)  # [B, 1, D]
    return (x_hat * m).sum(-1)  # [B, n]


def kept_count(n, keep_ratio):
    """floor(N_i * k), computed as the public code does (models_mae.py, forward_teacher: `int(n * keep_ratio)` on
    Python floats), including its rounding: 100 * 0.29 = 28.999999999999996 keeps 28."""
    return int(n * keep_ratio)


def compress_tokens(x, ids, keep_ratio, random=False, noise=None):
    """The paper's T(x; k) = gather[x, S(x) < floor(N_i * k)],  S(x) = rank(s) ascending.
    x [B, n, D], ids [B, n] -> (kept [B, floor(n k), D], their ids [B, floor(n k)]).

    Keeps the tokens LEAST similar to the mean (the redundant ones, close to the mean, are dropped) together with
    their absolute patch ids, so ids stay valid through any number of stages. random=True is the paper's "RD"
    ablation: a uniform random subset, ranked by `noise` [B, n] (the step's rng.rand(n); required, so that a drop is
    reproducible)."""
    if random and noise is None:
        raise ValueError("compress_tokens(random=True) needs its noise [B, n] (e.g. rng.rand(n))")
    score = noise if random else similarity_scores(x)
    order = score.argsort(dim=1)[:, :kept_count(x.shape[1], keep_ratio)]  # [B, K] positions in x, least similar first
    return gather_tokens(x, order), torch.gather(ids, 1, order)


def cosine_loss(pred, target):
    """The paper's objective with M = cosine, as a loss: L = 1 - E_{b, j} cos(g_phi(...)_{b, j}, t_{b, j}), over the
    batch and the teacher's kept tokens."""
    return 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


def parse_drop_after(text, depth):
    """Teacher blocks after which T(x; k) is applied. 'auto' -> the public code's default drop_case 0 with 3 stages,
    [depth // 3 * i for i < 3] (0,4,8 for 12 blocks, 0,8,16 for ViT-L); 'none' -> no dropping; else comma-separated
    block indices (0-based). The paper's drop cases 1-5 are drawn in a figure, not given as indices (README)."""
    text = text.replace(" ", "").lower()
    if text == "auto":
        return [depth // 3 * i for i in range(3)]
    try:
        return [int(v) for v in text.split(",") if v not in ("", "none")]
    except ValueError:
        raise ValueError(f"--drop-after must be comma-separated block indices, got {text!r}") from None


def token_counts(num_masked, drop_after, keep_ratio):
    """Teacher tokens before the first drop and after each one: 147 -> 73 -> 36 -> 18 for ViT-B/16, 224 px, 0.75."""
    counts = [num_masked]
    for _ in drop_after:
        counts.append(kept_count(counts[-1], keep_ratio))
    return counts


# ------------------------------------------------------------------------------------------------------- the model
class PCAE(nn.Module):
    """Student ViT + decoder (trained) and EMA teacher ViT (requires_grad False, in the state dict for exact resume)."""
    def __init__(self, student, mask_ratio=0.75, keep_ratio=0.5, drop_after=(0, 4, 8), random_drop=False,
                 decoder_dim=512, decoder_depth=8, decoder_heads=16, decoder_drop_path=0.0):
        super().__init__()
        self.student, self.patch_size = student, student.patch_size
        self.mask_ratio, self.keep_ratio, self.random_drop = mask_ratio, keep_ratio, random_drop
        self.drop_after = sorted(set(drop_after))
        self.num_patches = student.num_patches
        self.num_visible = int(self.num_patches * (1 - mask_ratio))  # MAE's count: 49 of 196 at 0.75
        depth = len(student.blocks)
        if not 0 < mask_ratio < 1:
            raise ValueError(f"--mask-ratio must be in (0, 1), got {mask_ratio}")
        if not 0 < keep_ratio <= 1 or not 0 <= decoder_drop_path < 1:
            raise ValueError(f"--keep-ratio must be in (0, 1] and --drop-path in [0, 1), got {keep_ratio}, "
                             f"{decoder_drop_path}")
        if len(self.drop_after) != len(drop_after) or any(not 0 <= i < depth for i in drop_after):
            raise ValueError(f"--drop-after needs distinct block indices in [0, {depth - 1}], got {list(drop_after)}")
        counts = token_counts(self.num_patches - self.num_visible, self.drop_after, keep_ratio)
        if self.num_visible < 1 or counts[-1] < 1:
            raise ValueError(f"no tokens left: {self.num_visible} visible, teacher tokens "
                             f"{' -> '.join(map(str, counts))}; raise --input-size / --keep-ratio or use fewer "
                             f"--drop-after stages")
        # Teacher = an exact copy of the student at init in every mode (the public code forgot it on one process).
        self.teacher = copy.deepcopy(student)
        for p in self.teacher.parameters():
            p.requires_grad = False
        for blk in self.teacher.blocks:
            blk.drop_path = 0.0  # the public teacher is built with drop_path=0; it only runs under no_grad
        # Decoder g_phi (MAE layout), built after the teacher copy (initial weights depend on the order). Its output
        # width is the TEACHER width, not p*p*3 as in the public code; stochastic depth is constant over its blocks,
        # as in the public code (linear over the encoder's).
        self.decoder = MAEDecoder(student.embed_dim, student.grid_size, out_dim=student.embed_dim,
                                  decoder_dim=decoder_dim, decoder_depth=decoder_depth, decoder_heads=decoder_heads,
                                  drop_path=decoder_drop_path)

    def mask(self, rng):
        """Random per-image split M: visible ids [B, V] (student), masked ids [B, L-V] (teacher)."""
        return random_masking(rng.rand(self.num_patches), self.num_visible)

    @torch.no_grad()
    def teacher_forward(self, patches, mask_ids, rng):
        """f_bar[(1-M).x; k]: teacher on the masked patches only, compressed by T(x; k) after each block in
        drop_after. patches [B, L, p*p*3] -> (targets [B, K, D] standardised, kept ids [B, K], ids after each stage).
        No cls token: only patch tokens are ranked and predicted (public code). rng: the noise of --random-drop."""
        t = self.teacher
        x = t.add_pos(t.embed_pixels(gather_tokens(patches, mask_ids)), mask_ids)  # [B, N_m, D]
        ids, stages = mask_ids, []
        for i, blk in enumerate(t.blocks):
            x = blk(x)
            if i in self.drop_after:  # on the residual stream after block i, before the final norm
                noise = rng.rand(x.shape[1]) if self.random_drop else None  # [B, n]
                x, ids = compress_tokens(x, ids, self.keep_ratio, self.random_drop, noise)  # [B, floor(n k), D]
                stages.append(ids)
        # Targets: the final-norm features of the kept tokens, standardised per token (t - mean) / sqrt(var + 1e-6)
        # with the unbiased variance, as the public code. The cosine loss does not see the per-token scale.
        return standardize_tokens(t.norm(x)), ids, stages

    def encode(self, patches, vis_ids, rng):
        """f_theta(M.x): student on the visible patches, cls first -> [B, 1+V, D]."""
        return self.student.forward_pixels(gather_tokens(patches, vis_ids), vis_ids, rng)

    def forward(self, imgs, rng):
        """Training step: imgs [B, 3, H, W], rng StepRandom -> (loss, metrics)."""
        patches = patchify(imgs, self.patch_size)  # [B, L, p*p*3]
        vis_ids, mask_ids = self.mask(rng)  # [B, V], [B, L-V]
        target, kept_ids, _ = self.teacher_forward(patches, mask_ids, rng)  # [B, K, D], [B, K]
        latent = self.encode(patches, vis_ids, rng)  # [B, 1+V, D]
        # g_phi{h[f_theta(M.x), omega + p]}: one mask token omega at the position p of each patch the teacher kept
        pred = self.decoder(latent, vis_ids, kept_ids, rng)  # [B, K, D]
        return cosine_loss(pred, target), {}

    def forward_mae_style(self, imgs, rng, proj=None):
        """Benchmark baseline: the same encoder and decoder, no teacher, the decoder predicts ALL L-V masked patches
        (147 for ViT-B/16) with the same cosine loss against per-patch targets of the same width: MAE's normalised
        pixels (through a fixed projection `proj` [p*p*3, D] when p*p*3 != D)."""
        patches = patchify(imgs, self.patch_size)
        vis_ids, mask_ids = self.mask(rng)
        latent = self.encode(patches, vis_ids, rng)
        pred = self.decoder(latent, vis_ids, mask_ids, rng)  # [B, L-V, D]
        target = gather_tokens(patches, mask_ids)  # [B, L-V, p*p*3]
        return cosine_loss(pred, standardize_tokens(target if proj is None else target @ proj)), {}

    @torch.no_grad()
    def update_teacher(self, momentum):
        """theta_bar <- m theta_bar + (1 - m) theta, once per optimizer step (not per accumulation micro-step)."""
        ema_update(self.teacher, self.student, momentum)


def build_model(args):
    student = build_vit(args.model, patch_size=args.patch_size, img_size=args.input_size, drop_path_rate=args.drop_path)
    return PCAE(student, mask_ratio=args.mask_ratio, keep_ratio=args.keep_ratio,
                drop_after=parse_drop_after(args.drop_after, student.config["depth"]), random_drop=args.random_drop,
                decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads,
                decoder_drop_path=args.drop_path)


# ------------------------------------------------------------------------------------------------------ the CLI
RECIPES = {  # --recipe NAME: these flags, then the command line's (which win)
    "imagenet": "",  # the public code's ImageNet recipe: the defaults below
    # the synthetic demo: micro ViT at 64 px (8 x 8 patches: the teacher keeps 48 masked -> 24 -> 12 -> 6 targets),
    # 2 048 images, 30 epochs, no stochastic depth for a 4-block encoder (docs/pcae.md: its probe against random init)
    "demo": "--model micro --input-size 64 --synthetic-size 2048 --batch-size 32 --lr 1e-3 --epochs 30 "
            "--warmup-epochs 2 --drop-path 0 --num-workers 0 --decoder-dim 64 --decoder-depth 2 --decoder-heads 4",
}


def build_parser():
    parser = add_common_args(ArgumentParser(prog="pcae.py", description="PCAE pretraining (ICLR 2023)",
                                            recipes=RECIPES), "pcae")
    a = parser.add_argument
    a("--mask-ratio", type=float, default=0.75, help="fraction of patches hidden from the student")
    a("--keep-ratio", type=float, default=0.5, help="k: fraction of the teacher's tokens kept at each drop")
    a("--drop-after", default="auto", help="teacher blocks (0-based) after which tokens are dropped: indices like "
                                            "0,4,8, 'none', or 'auto' = [depth // 3 * i for i < 3] (0,4,8 for ViT-B: "
                                            "the public code's default drop_case 0)")
    a("--random-drop", action="store_true", help="RD ablation: drop a uniform random subset instead of ranking")
    add_decoder_args(parser, depth=8)
    a("--drop-path", type=float, default=0.25, help="student stochastic depth (linear in encoder, constant in decoder)")
    a("--momentum", type=float, default=0.9999, help="teacher momentum at step 0, rising to 1 on a cosine")
    a("--vis", default="", metavar="PATH", help="write a PNG of the masks and the teacher's kept patches, then exit")
    a("--vis-images", type=int, default=6, help="rows (images) of the --vis figure")
    add_bench_args(parser)
    a("--bench-baseline", action="store_true",
      help="implies --bench: also time a MAE-style step (same encoder and decoder, all masked patches decoded)")
    parser.free_on_resume("vis", "vis_images", "bench_baseline")
    # Public code (caddyless/PCAE main_pretrain.py): ViT-B/16, 400 epochs, 40 warmup, batch 64 per GPU, blr 1.5e-4.
    parser.set_defaults(model="base", epochs=400, warmup_epochs=40, blr=1.5e-4, weight_decay=0.05, batch_size=64)
    return parser


def check_args(args):
    """The flags the model cannot check itself (it checks the ratios, drop stages and token counts)."""
    check_common_args(args)
    if args.vis_images < 1 or not 0.0 <= args.momentum <= 1.0:
        raise UserError("--vis-images must be at least 1 and --momentum in [0, 1]")


def no_weight_decay(name, param):
    """MAE's optimizer groups, which the public PCAE code uses (main_pretrain.py: timm 0.5.4 add_weight_decay, no skip
    list, on the student + decoder): no weight decay on biases and 1-D norm weights; every other parameter, the cls
    and mask tokens included, is decayed. Position embeddings are buffers here (frozen parameters there) and the
    teacher's parameters (requires_grad False; a separate model there) are in no group."""
    return param.ndim <= 1 or name.endswith(".bias")


def main(args):
    check_args(args)
    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = build_model(args)  # checks its flags, before TrainRun makes the output folder
    if args.vis:
        return visualize(args, model)
    if args.bench or args.bench_baseline:
        return bench(args, model)
    transform = image_transform(pretrain_transform(args.input_size))
    dataset = SeededDataset(build_dataset(args.data, "train", size=args.input_size, length=args.synthetic_size,
                                          seed=args.seed), transform)
    run = TrainRun(args, "pcae", dataset)
    model.to(run.device)
    optimizer = build_adamw(model, args.weight_decay, run.peak_lr, no_weight_decay)
    run.resume(model, optimizer, model.student)  # exported: MAE-style methods fine-tune the online network
    ddp_model = run.wrap(model)
    run.measure_flops(model, torch.zeros(2, 3, args.input_size, args.input_size, device=run.device))  # for MFU
    for epoch in range(run.epoch, args.epochs):
        for step in run.steps():
            set_lr(optimizer, run.lr(step))
            step_loss = 0.0
            for micro in range(args.accum):
                imgs, _ = run.next_batch()
                with run.no_sync(ddp_model, micro), autocast(run.device):
                    loss = ddp_model(imgs, run.step_random(step, micro))[0]  # (loss, no metrics)
                (loss / args.accum).backward()
                step_loss += loss.detach() / args.accum
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # EMA after the optimizer step only (the public code also ran it on accumulation micro-steps).
            model.update_teacher(ema_momentum(step, run.total_steps, args.momentum))
            run.step_done(step, step_loss)
        if run.end_epoch():  # saves; True once --max-steps is reached
            break
    run.finish()


# ------------------------------------------------------------------------------------------------------- benchmark
def bench(args, model):
    """Times the real optimizer step (forward, backward, AdamW, EMA) on random tensors already on the device; with
    --bench-baseline also a MAE-style step (same model, all masked tokens decoded, no teacher), in the same process,
    interleaved with the PCAE steps."""
    from tools.bench import benchmark
    device = pick_device(args.device)
    model = model.to(device).train()
    optimizer = build_adamw(model, args.weight_decay, 1e-4, no_weight_decay)
    imgs = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    labels = {"masking": (model, "mask"), "encoder": (model, "encode"), "decoder": (model.decoder, "forward"),
              "loss": (sys.modules[__name__], "cosine_loss")}  # the parts of a step for --profile
    cases = {"pcae": (model, [imgs], optimizer, lambda: model.update_teacher(args.momentum),
                      {**labels, "teacher": (model, "teacher_forward")})}
    if args.bench_baseline:
        width, pix = model.student.embed_dim, model.patch_size ** 2 * 3
        proj = None if pix == width else torch.randn(pix, width, device=device) / math.sqrt(pix)
        cases["mae-style"] = (model.forward_mae_style, [imgs, proj], optimizer, None, labels)
    rows = benchmark(cases, device, args.bench_steps, args.compile, args.profile, args.seed)
    if args.bench_baseline:
        p, m = rows["pcae"], rows["mae-style"]
        print(f"pcae / mae-style: time ratio {p['ms_per_step'] / m['ms_per_step']:.3f}, "
              f"FLOP ratio {p['gflop_per_image'] / m['gflop_per_image']:.3f}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------- visualisation
@torch.no_grad()
def visualize(args, model):
    """PNG, one row per image: image | student's visible patches | teacher input (masked patches) | teacher's kept
    patches after each drop stage. Uses the checkpoint of --resume or --output-dir when there is one. The images come
    from different classes (sample_across_classes)."""
    device = pick_device(args.device)
    model = model.to(device).eval()
    path = Path(args.resume) if args.resume else Path(args.output_dir) / "checkpoint.pth"
    if args.resume or path.is_file():
        load_state(model, load_training_checkpoint(path, "pcae")["model"], "the model", path)
        print(f"visualising the teacher of {path}")
    else:
        print("no checkpoint: visualising a randomly initialised teacher")
    data = SeededDataset(build_dataset(args.data, "train", size=args.input_size, length=args.synthetic_size,
                                       seed=args.seed), image_transform(eval_transform(args.input_size)))
    picks = sample_across_classes(data.base, args.vis_images, args.seed)
    n = len(picks)
    imgs = torch.stack([data[i][0] for i in picks]).to(device)  # [n, 3, H, W]
    rng = StepRandom(args.seed, 0, device, slice(0, n), n)
    patches = patchify(imgs, model.patch_size)
    vis_ids, mask_ids = model.mask(rng)
    _, _, stages = model.teacher_forward(patches, mask_ids, rng)
    pixels = denormalize(imgs)  # [n, 3, H, W] in [0, 1], CPU
    columns = [pixels]
    for ids in [vis_ids, mask_ids, *stages]:
        shown = torch.zeros(n, model.num_patches).scatter_(1, ids.cpu(), 1.0)  # [n, L]
        shown = unpatchify(shown[:, :, None].expand(-1, -1, patches.shape[2]), model.patch_size)  # [n, 3, H, W]
        columns.append(pixels * shown + 0.5 * (1 - shown))  # hidden patches grey
    blocks = [f"after block {b}" for b in model.drop_after]
    size = save_figure(torch.stack(columns, 1).flatten(0, 1), args.vis, columns=len(columns), padding=2,
                       labels=["image", "visible", "teacher input", *blocks])
    print(figure_line(args.vis, size, n, ["image", "the student's visible patches", "the teacher's input (the masked "
                                          "patches)", *[f"the teacher's tokens kept {b}" for b in blocks]]))
    return args.vis


if __name__ == "__main__":
    run_main(main, build_parser())
