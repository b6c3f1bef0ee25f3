"""tools/export_encoder.py: the exported file has exactly the keys (in order), shapes and dtype of MAE's released
ViT-B/16 pretrain checkpoint, mae_pretrain_vit_base.pth, written out below from outside facts (timm's
VisionTransformer names, MAE's models_mae.py and main_finetune.py), and it reads back through eval_utils.load_vit."""
import importlib.util

import pytest
import torch

from common import build_vit
from eval_utils import load_vit
from train_utils import encoder_export, load_checkpoint, save_checkpoint
from conftest import ROOT

spec = importlib.util.spec_from_file_location("export_encoder", ROOT / "tools" / "export_encoder.py")
export_encoder = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_encoder)


def mae_keys(D=768, depth=12, patch=16, grid=14):
    """The keys and shapes of MAE's mae_pretrain_vit_base.pth (the defaults: ViT-B/16 at 224 px), in order. The file
    is {'model': {...}} with the encoder only (MAE's issues #3 / #8: the decoder is in the separate *_full.pth files):
    the keys of timm's VisionTransformer without its head (MAE's main_finetune.py loads it into that model and asserts
    that only head, and fc_norm with global pooling, are missing), in timm's state_dict order: the model's own
    parameters (cls_token, pos_embed), then patch_embed, blocks, norm. Other sizes: the same names and rules."""
    keys = [("cls_token", [1, 1, D]), ("pos_embed", [1, 1 + grid * grid, D]),  # ViT-B/16: 197 = 1 + (224 / 16)^2
            ("patch_embed.proj.weight", [D, 3, patch, patch]), ("patch_embed.proj.bias", [D])]
    for i in range(depth):
        keys += [(f"blocks.{i}.norm1.weight", [D]), (f"blocks.{i}.norm1.bias", [D]),
                 (f"blocks.{i}.attn.qkv.weight", [3 * D, D]), (f"blocks.{i}.attn.qkv.bias", [3 * D]),
                 (f"blocks.{i}.attn.proj.weight", [D, D]), (f"blocks.{i}.attn.proj.bias", [D]),
                 (f"blocks.{i}.norm2.weight", [D]), (f"blocks.{i}.norm2.bias", [D]),
                 (f"blocks.{i}.mlp.fc1.weight", [4 * D, D]), (f"blocks.{i}.mlp.fc1.bias", [4 * D]),
                 (f"blocks.{i}.mlp.fc2.weight", [D, 4 * D]), (f"blocks.{i}.mlp.fc2.bias", [D])]
    return keys + [("norm.weight", [D]), ("norm.bias", [D])]


@pytest.mark.slow  # about 15 s: two ViT-B builds and three 330 MB files written and read
def test_vit_base_export_has_maes_exact_layout_and_reads_back(tmp_path):
    torch.manual_seed(0)
    vit = build_vit("base")
    ours = tmp_path / "checkpoint.pth"
    save_checkpoint(ours, {"model": {"decoder.weight": torch.zeros(2)}, **encoder_export(vit, "pcae")})
    out = tmp_path / "mae_layout.pth"
    export_encoder.main(export_encoder.build_parser().parse_args(["--ckpt", str(ours), "--out", str(out)]))
    ckpt = load_checkpoint(out)
    assert list(ckpt) == ["model"]
    expected = mae_keys()
    assert len(expected) == 150
    assert [(k, list(v.shape)) for k, v in ckpt["model"].items()] == expected
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())
    # timm's vit_base_patch16_224 has 86,567,656 parameters; without its 1000-class head (768 x 1000 + 1000):
    assert sum(v.numel() for v in ckpt["model"].values()) == 86_567_656 - 769_000
    back = load_vit(out)  # a public checkpoint for load_vit: architecture from the shapes, 12 heads from the preset
    assert back.config == vit.config
    original = vit.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in back.state_dict().items())


def test_any_checkpoint_load_vit_reads_is_exported(tmp_path):
    """A public-style file (state_dict under 'state_dict', DDP's 'module.' prefix, a head) of a micro ViT (width 64,
    depth 4, 8 px patches, 32 px: a 4 x 4 grid) exports to MAE's layout at that size, with the encoder's values."""
    torch.manual_seed(1)
    vit = build_vit("micro", img_size=32)
    public = {"state_dict": {**{f"module.{k}": v for k, v in vit.state_dict().items()},
                             "module.head.weight": torch.zeros(10, 64)}}
    save_checkpoint(tmp_path / "public.pth", public)
    exported = export_encoder.export(tmp_path / "public.pth", tmp_path / "out.pth")
    model = load_checkpoint(tmp_path / "out.pth")["model"]
    assert [(k, list(v.shape)) for k, v in model.items()] == mae_keys(D=64, depth=4, patch=8, grid=4)
    assert exported.config == vit.config
    assert all(torch.equal(model[k], v) for k, v in vit.state_dict().items())


def test_errors_are_one_line(tmp_path):
    parse = export_encoder.build_parser().parse_args
    with pytest.raises(ValueError, match="checkpoint not found"):
        export_encoder.main(parse(["--ckpt", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o.pth")]))
    save_checkpoint(tmp_path / "c.pth", encoder_export(build_vit("micro", img_size=32), "pcae"))
    with pytest.raises(ValueError, match="--out must not be the input checkpoint"):
        export_encoder.main(parse(["--ckpt", str(tmp_path / "c.pth"), "--out", str(tmp_path / "c.pth")]))
    save_checkpoint(tmp_path / "none.pth", {"model": {"decoder.weight": torch.zeros(3)}})
    with pytest.raises(ValueError, match="contains no ViT encoder"):
        export_encoder.main(parse(["--ckpt", str(tmp_path / "none.pth"), "--out", str(tmp_path / "o.pth")]))
