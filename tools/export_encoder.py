"""Write the encoder of a checkpoint in the layout of MAE's released pretrain checkpoints (mae_pretrain_vit_base.pth),
so that the detection and segmentation code that loads MAE's file loads ours the same way:

    python tools/export_encoder.py --ckpt runs/pcae/checkpoint.pth --out pcae_vit_base.pth

MAE's file holds one top-level key, 'model', whose value is the encoder's state dict alone (no decoder, no mask
token, no head), with timm's VisionTransformer names in the order of its state_dict; for ViT-B/16 (D = 768):

    cls_token [1, 1, D], pos_embed [1, 197, D] (the fixed 2-D sin-cos table, cls row zero),
    patch_embed.proj.weight [D, 3, 16, 16], patch_embed.proj.bias [D],
    blocks.{0..11}.norm1.weight / .bias [D], .attn.qkv.weight [3D, D] / .bias [3D], .attn.proj.weight [D, D],
                   .attn.proj.bias [D], .norm2.weight / .bias [D], .mlp.fc1.weight [4D, D] / .bias [4D],
                   .mlp.fc2.weight [D, 4D] / .bias [D],
    norm.weight, norm.bias [D]                                                          (150 tensors, all float32)

Our ViT uses these names (common.ViT), so the export is the encoder's state dict in float32 under 'model'. The input is
any checkpoint that eval_utils.load_vit reads: this project's (its exported `encoder`) or a public ViT. The commands that
take the file into detectron2's ViTDet and mmsegmentation are in docs/transfer.md.
"""
import math, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import ArgumentParser, UserError, run_main  # noqa: E402  (after the path is set)
from eval_utils import load_vit  # noqa: E402
from train_utils import save_checkpoint  # noqa: E402

MAE_PRETRAIN_SIZE = 224  # MAE's checkpoints, and the `pretrain_img_size` of detectron2's ViT, are 224 px


def mae_layout(vit):
    """{'model': state dict} of the encoder `vit` in MAE's released layout: every tensor float32, contiguous and
    detached, in the encoder's state_dict order (module parameters, then buffers, then sub-modules: cls_token,
    pos_embed, patch_embed, blocks, norm, as timm's VisionTransformer and MAE's model)."""
    return {"model": {k: v.detach().float().contiguous().clone() for k, v in vit.state_dict().items()}}


def export(ckpt, out, num_heads=None):
    """Read the encoder of `ckpt` (eval_utils.load_vit), write it to `out` in MAE's layout -> the encoder."""
    vit = load_vit(ckpt, num_heads=num_heads)
    save_checkpoint(out, mae_layout(vit))
    return vit


def main(args):
    if Path(args.out).resolve() == Path(args.ckpt).resolve():
        raise UserError("--out must not be the input checkpoint (it would be overwritten by the encoder alone)")
    vit = export(args.ckpt, args.out, args.num_heads)
    c = vit.config
    numbers = sum(v.numel() for v in vit.state_dict().values())
    print(f"wrote {args.out}: ViT width {c['embed_dim']}, depth {c['depth']}, {c['img_size']} px in "
          f"{c['patch_size']} px patches, {len(vit.state_dict())} tensors, {numbers / 1e6:.2f} M numbers, in MAE's "
          f"layout {{'model': ...}}", flush=True)
    if c["img_size"] != MAE_PRETRAIN_SIZE:
        grid = c["img_size"] // c["patch_size"]
        print(f"note: pos_embed is a {grid}x{grid} grid ({c['img_size']} px); MAE's is 14x14 (224 px): for ViTDet set "
              f"model.backbone.net.pretrain_img_size={c['img_size']}", file=sys.stderr, flush=True)
    if (c["embed_dim"], c["depth"], c["patch_size"]) != (768, 12, 16):
        print("note: not a ViT-B/16: use the ViTDet / mmsegmentation configs of this width and depth",
              file=sys.stderr, flush=True)
    if not math.isclose(c["mlp_ratio"], 4.0):
        print(f"note: MLP ratio {c['mlp_ratio']:g}, not MAE's 4: set mlp_ratio in the downstream config",
              file=sys.stderr, flush=True)
    return vit


def build_parser():
    p = ArgumentParser(prog="tools/export_encoder.py", description="Write a checkpoint's ViT encoder in the layout of "
                                                                   "MAE's mae_pretrain_vit_*.pth (for ViTDet, "
                                                                   "mmsegmentation)")
    p.add_argument("--ckpt", required=True, help="checkpoint of semmae.py / latent_mim.py / pcae.py / finetune.py, or "
                                                 "a public ViT checkpoint")
    p.add_argument("--out", required=True, help="the file to write, e.g. pcae_vit_base.pth")
    p.add_argument("--num-heads", type=int, default=None, help="override the head count inferred for public "
                                                               "checkpoints (not stored in MAE's layout)")
    return p


if __name__ == "__main__":
    run_main(main, build_parser())
