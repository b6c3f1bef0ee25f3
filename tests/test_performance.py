"""Performance plumbing: --bench rows and FLOP counts, MFU arithmetic, the device peak table, no host sync in the hot
loop, --compile with clean checkpoint keys, the loader benchmark."""
import contextlib
import functools
import importlib
import traceback
from pathlib import Path

import pytest
import torch

import common
import eval_utils
import train_log
import train_utils
from tools import bench
from conftest import SCRIPTS, argv

BENCH = {  # script -> bench flags on the micro preset
    "latent_mim": ["--gap", "2", "--proj-dim", "64", "--decoder-dim", "32", "--decoder-heads", "2"],
    "pcae": ["--decoder-dim", "32", "--decoder-heads", "2", "--bench-baseline"],
    "semmae": ["--decoder-dim", "32", "--decoder-heads", "2"],
}


def bench_args(name, *extra):
    sub = ["pretrain"] if name == "semmae" else []
    return [*sub, "--data", "synthetic", "--model", "micro", "--input-size", "32", "--batch-size", "4", "--bench",
            "--bench-steps", "2", "--profile", *BENCH[name], *extra]


@pytest.mark.parametrize("name", list(BENCH))
def test_bench_reports_time_flops_and_profile(name, capsys):
    module = importlib.import_module(name)
    rows = module.main(module.build_parser().parse_args(bench_args(name)))
    rows = rows if isinstance(rows, dict) and "pcae" in rows else {name: rows}
    for row in rows.values():
        assert row["batch"] == 4 and row["ms_per_step"] > 0
        assert row["images_per_s"] == pytest.approx(4 / (row["ms_per_step"] / 1e3))
        assert row["mfu"] is None and row["peak_mem_gib"] is None  # CPU: no peak to compare with
        profile = row["profile_ms"]
        assert {"encoder", "decoder", "backward", "optimizer", "masking", "loss"} <= set(profile)
        assert all(v >= 0 for v in profile.values())
    if name in ("latent_mim", "pcae"):
        assert {"teacher", "ema"} <= set(rows[name]["profile_ms"])
    out = capsys.readouterr().out
    assert "gflop_per_image=" in out and "profile (ms/step):" in out


def test_training_flops_are_about_three_forwards():
    """The bench counts forward + backward with FlopCounterMode; the rule 'training = 3 x forward' checks it."""
    import semmae
    torch.manual_seed(0)
    model = semmae.SemMAE(common.build_vit("small", img_size=64), num_parts=1, decoder_dim=128, decoder_depth=2, decoder_heads=4)
    imgs = torch.randn(2, 3, 64, 64)
    rng = common.StepRandom(0, 0, torch.device("cpu"), slice(0, 2), 2)
    forward = bench.count_flops(lambda: model(imgs, rng))
    train = bench.count_flops(lambda: model(imgs, rng)[0].backward())
    # backward = 2 x forward, except that no gradient flows into the images (the patch embedding's input)
    assert 2.9 * forward < train < 3.0 * forward


def test_vit_base_forward_flops_count_attention_on_cpu():
    """Closed form of the ViT-B/16 forward at 224 px (N = 197 tokens, D = 768), on the real CPU kernels (torch counts
    the fused CPU attention op as 0 on its own): per block 2 x (12 N D^2 + 2 N^2 D), i.e. qkv 6 N D^2, proj 2 N D^2,
    MLP 16 N D^2, Q K^T and P V 2 N^2 D each; plus the patch embedding 2 x 196 x (16 x 16 x 3) x 768. Not counted:
    the final LayerNorm (the encoder has no head), norms, softmax, GELU, residual additions."""
    vit = common.build_vit("base").eval()
    n, d = 197, 768
    attention = 12 * 2 * (2 * n * n * d)
    closed_form = 12 * 2 * (12 * n * d * d + 2 * n * n * d) + 2 * 196 * (16 * 16 * 3) * 768
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad():
        flops = bench.count_flops(lambda: vit(torch.zeros(1, 3, 224, 224)))
        with FlopCounterMode(display=False) as plain:  # torch alone: everything but the attention
            vit(torch.zeros(1, 3, 224, 224))
    assert flops == closed_form == 35_126_120_448
    assert plain.get_total_flops() == closed_form - attention  # what the bench printed before (33.7 GFLOP)


def test_attention_flops_forward_backward_as_torch_counts_cuda():
    """One fused CPU attention call, forward + backward, B = 2, H = 3, N = 7 queries, M = 5 keys, d = 8: forward
    2 B H N M (d + d) = 6 720, backward 2 B H N M (3 d + 2 d) = 16 800 (torch's CUDA formulas, which count the
    recomputed scores); under the math backend torch counts the forward bmms itself and the total is the same."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count
    q, k, v = (torch.randn(2, 3, s, 8, requires_grad=True) for s in (7, 5, 5))
    forward = bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    both = bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward())
    assert (forward, both - forward) == (6_720, 16_800)
    assert both == sdpa_flop_count(q.shape, k.shape, v.shape) + sdpa_backward_flop_count(q.shape, q.shape, k.shape,
                                                                                          v.shape)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():  # attention as two bmms, counted by torch: no double count
        assert bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) == 6_720


def test_mfu_and_rates_arithmetic(tmp_path):
    dist = train_utils.Dist("cpu")
    dist.world = 2  # two processes of which this is one
    logger = train_log.StepLogger(dist, tmp_path)
    logger.flops_per_image, logger.peak = 1e9, 1e12
    rates = logger.rates(images=100, data_time=0.25, seconds=1.0)
    assert rates["images_per_s"] == 200  # 100 per process x 2 processes
    assert rates["data_share"] == 0.25
    assert rates["mfu"] == pytest.approx(1e9 * 100 / 1e12)  # per device: its FLOP/s over its peak
    row = bench.bench_report("x", seconds=0.5, batch=10, flops_per_image=2e9, device=torch.device("cpu"))
    assert row["images_per_s"] == 20 and row["ms_per_step"] == 500 and row["gflop_per_image"] == 2


def test_no_peak_no_mfu(monkeypatch):
    """MFU only where the device's peak is known: none on CPU, none for a GPU the table does not name."""
    assert bench.device_peak_flops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert bench.device_peak_flops(torch.device("cuda", 0)) is None


# ---------------------------------------------------------------------------------------- no host sync per step
SYNCING = [(torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch.Tensor, "cpu"), (torch.Tensor, "numpy"),
           (torch.Tensor, "__bool__"), (torch.Tensor, "__float__"), (torch.Tensor, "__int__"),
           (torch.Tensor, "nonzero"), (torch, "nonzero"), (torch, "unique"), (torch, "masked_select"),
           (torch.nn.functional, "one_hot")]
DATA_PIPELINE = {"load", "__getitem__", "__iter__"}  # CPU work of the loader (in worker processes on a real run)
ALLOWED = {  # project functions that may read a tensor on the host during training, and why that is no device sync
    "steps",  # once per epoch: the DataLoader draws its base seed on the CPU
    "note_bad",  # the loader's CPU tensor of unreadable-file flags
    "_raise_if_bad",  # the pinned host copy of the previous step's finiteness flag
    "means",  # the log interval / epoch end
    "agree_stop",  # the epoch end: one agreed stop flag for what no step's flags cover
    "save",  # checkpoint time
}


@contextlib.contextmanager
def record_host_reads(root, monkeypatch):
    """While the training loop runs (from the first TrainRun.steps to TrainRun.finish: not set-up or what follows),
    record the innermost project function of every call of a syncing tensor method or op."""
    calls, training = [], [False]
    steps, finish = train_utils.TrainRun.steps, train_utils.TrainRun.finish

    def start(self):
        training[0] = True
        return steps(self)

    def stop(self):
        training[0] = False
        return finish(self)
    monkeypatch.setattr(train_utils.TrainRun, "steps", start)
    monkeypatch.setattr(train_utils.TrainRun, "finish", stop)

    def wrap(fn):
        @functools.wraps(fn)
        def recorder(*args, **kwargs):
            if training[0]:
                names = [f.name for f in traceback.extract_stack()[:-1] if Path(f.filename).parent == root]
                if names and not DATA_PIPELINE & set(names):
                    calls.append(names[-1])
            return fn(*args, **kwargs)
        return recorder
    for owner, name in SYNCING:
        monkeypatch.setattr(owner, name, wrap(getattr(owner, name)))
    yield calls
    monkeypatch.undo()


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_no_host_sync_in_the_hot_loop(name, tmp_path, parts_file, root, monkeypatch):
    module = importlib.import_module(SCRIPTS[name][0])
    args = module.build_parser().parse_args(argv(name, tmp_path, parts_file, "--log-every", "1000"))
    with record_host_reads(root, monkeypatch) as calls:
        module.main(args)  # 2 epochs of 12 steps
    assert calls, "the recorder saw nothing: it would not catch a sync either"
    offenders = sorted(set(calls) - ALLOWED)
    assert not offenders, f"host reads in {offenders} (model forward or training loop)"


# ------------------------------------------------------------------------------------------------------ compile
@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_compile_runs_and_keeps_checkpoint_keys_clean(name, tmp_path, parts_file, monkeypatch):
    # dynamo traces the real model; the eager backend skips inductor's C++ build (minutes on CPU; see the README)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    module = importlib.import_module(SCRIPTS[name][0])
    module.main(module.build_parser().parse_args(argv(name, tmp_path, parts_file, "--compile", "--max-steps", "2")))
    ckpt = train_utils.load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["step"] == 2
    assert not [k for k in [*ckpt["model"], *ckpt["encoder"]] if "_orig_mod" in k or k.startswith("module.")]
    assert eval_utils.load_vit(tmp_path / "checkpoint.pth").config["embed_dim"] == 64


# ------------------------------------------------------------------------------------------------ loader bench
def test_loader_benchmark_on_generated_jpegs(tmp_path, capsys):
    bench.make_jpeg_folder(tmp_path, 12)
    files = sorted(tmp_path.glob("*/*.jpg"))
    assert len(files) == 12 and all(f.stat().st_size > 20_000 for f in files)  # real-sized JPEGs, not thumbnails
    from PIL import Image
    with Image.open(files[0]) as img:
        assert 400 <= img.size[0] < 600 and 300 <= img.size[1] < 450
    from tools.bench import bench_decode
    result = bench_decode(tmp_path, workers=(0,), batch=4, size=64, batches=1, repeats=1)
    rates = result["images_per_s"]
    assert set(rates) == {"cpu/0", "device/0", "payload/0", "decoder/0"} and min(rates.values()) > 0
    assert result["mean_abs_diff"] == 0.0  # on the CPU the device path gives the CPU path's pixels
    assert "median path=device workers=0 batch=4 images_per_s=" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------ start-up
@pytest.mark.slow
def test_importing_the_scripts_leaves_dynamo_unloaded_until_torch_compile(root):
    """StepRandom's torch.compiler.disable (which imports torch._dynamo, seconds of start-up) is applied by the first
    StepRandom made after torch.compile has loaded dynamo, not when common.py is imported; a compiled draw then runs
    eagerly outside the graph and gives the eager values. (eval_probe and finetune import torchvision, whose ops
    import torch._dynamo.utils: they load dynamo anyway, as every run does once it builds its transforms.)"""
    import subprocess
    import sys
    code = ("import sys, torch, common, latent_mim, pcae, semmae\n"  # eval_probe, finetune: torchvision (below)
            "before = 'torch._dynamo' in sys.modules\n"
            "rng = common.StepRandom(0, 3, torch.device('cpu'), slice(2, 4), 6)\n"
            "eager = rng.rand(5)\n"
            "f = torch.compile(lambda x, r: x + r.rand(5), backend='eager')\n"
            "compiled = f(torch.zeros(2, 5), common.StepRandom(0, 3, torch.device('cpu'), slice(2, 4), 6))\n"
            "print(before, common.StepRandom._take is common.StepRandom._draw, torch.equal(compiled, eager))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False", "True"]
