"""Shared test set-up: the project root on sys.path, single-threaded torch, the tiny run every script test uses,
and small helpers. Test modules import the helpers from here (`from conftest import ...`), never from each other."""
import importlib
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# One thread, as the subprocesses the tests start (OMP_NUM_THREADS=1): runs that are compared bit for bit must sum
# in the same order, and small ops on a busy machine are much faster without OpenMP's spinning threads.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

import common  # noqa: E402  (after the path is set)
import train_utils  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts subprocesses, torchrun or torch.compile; "
                                       "`pytest -m 'not slow'` runs the fast suite")


@pytest.fixture
def root():
    return ROOT


def step_rng(batch, step=0, seed=0):
    """The StepRandom of one whole optimizer-step batch (one process, no accumulation) on the CPU."""
    return common.StepRandom(seed, step, torch.device("cpu"), slice(0, batch), batch)


# ------------------------------------------------------------------------------ the tiny run of every script
TINY = ["--data", "synthetic", "--model", "micro", "--input-size", "32", "--synthetic-size", "48", "--epochs", "2",
        "--warmup-epochs", "1", "--num-workers", "0", "--log-every", "1", "--batch-size", "4", "--accum", "1"]
DECODER = ["--decoder-dim", "32", "--decoder-heads", "2", "--decoder-depth", "1"]
SCRIPTS = {  # name -> (module, sub-command, flags)
    "latent_mim": ("latent_mim", [], ["--gap", "2", "--proj-dim", "64", *DECODER]),
    "pcae": ("pcae", [], DECODER),
    "semmae": ("semmae", ["pretrain"], DECODER + ["--parts", "{parts}"]),
    "semmae-parts": ("semmae", ["parts"], ["--teacher", "random", "--num-parts", "3", "--dec-channels", "32",
                                           "--out", "{out}/parts.pt"]),
}


def write_parts_file(path):
    """A SemMAE parts file for the 48 synthetic training images (4 x 4 patch grid, 3 parts)."""
    ids = torch.randint(3, (48, 4, 4), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    train_utils.save_checkpoint(path, {"method": "semmae-parts", "part_ids": ids, "grid": [4, 4], "num_parts": 3,
                                  "paths": [f"synthetic:0:{i}" for i in range(48)], "image_size": 32})
    return path


@pytest.fixture
def parts_file(tmp_path):
    return write_parts_file(tmp_path / "parts.pt")


def argv(name, out, parts, *extra, data="synthetic"):
    """The command-line arguments of the tiny run of script `name` writing to `out`."""
    module, sub, flags = SCRIPTS[name]
    flags = [f.format(parts=parts, out=out) for f in flags]
    tiny = [data if f == "synthetic" else f for f in TINY]
    return [*sub, *tiny, *flags, "--output-dir", str(out), *extra]


def run_inprocess(name, out, parts, *extra):
    """Run the tiny run in this process; returns the checkpoint it wrote."""
    module = importlib.import_module(SCRIPTS[name][0])
    module.main(module.build_parser().parse_args(argv(name, out, parts, *extra)))
    return train_utils.load_checkpoint(out / "checkpoint.pth")


def assert_same_state(a, b):
    """Two training checkpoints at the same position with bit-identical weights (teachers included) and optimizer
    state: what a resume on the same layout (processes x batch x accum) must give, on any CPU."""
    assert (a["step"], a["epoch"], a["samples"]) == (b["step"], b["epoch"], b["samples"])  # samples of the epoch
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key
    states_a, states_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert states_a.keys() == states_b.keys()
    for pid in states_a:
        for key, value in states_a[pid].items():
            assert torch.equal(states_b[pid][key], value), (pid, key)


def zero_gradient_elements(name, value):
    """Mask of the elements of parameter `name` whose gradient is zero in exact arithmetic, so that in floating point
    it is rounding noise, which Adam's normalisation turns into steps of up to lr: the attention key biases (adding
    q . b_k to all logits of a query leaves its softmax unchanged; the middle third of a fused qkv bias, the first half
    of a kv bias) and the biases of convolutions followed by an instance norm (which subtracts every channel's mean:
    SemMAE stage A's synthesis layers)."""
    mask = torch.zeros(value.shape, dtype=torch.bool)
    n = value.shape[0] if value.ndim else 0
    if name.endswith("attn.qkv.bias"):
        mask[n // 3:2 * n // 3] = True
    elif name.endswith("kv_proj.bias"):
        mask[:n // 2] = True
    elif re.search(r"synthesis\.\d+\.conv\.bias$", name):
        mask[:] = True
    return mask


def assert_equivalent_runs(a, b):
    """Two runs that read the same samples and draws in another layout (processes x batch x accum): their gradients
    agree up to the order of float sums, so their weights differ by rounding noise that Adam amplifies. Tolerances
    derived from the run (S = optimizer steps x peak lr, the furthest an element can move):
    - every element: |a - b| <= 2 c S, with c = (1 - b1) / sqrt(1 - b2) / sqrt(1 - b1^2 / b2) >= |m_hat / sqrt(v_hat)|
      (Cauchy-Schwarz on Adam's moment sums), the most that two runs whose updates had opposite signs can differ;
    - over the elements with a gradient (zero_gradient_elements excluded), RMS(a - b) <= 1e-2 S: noise flips the
      sign of a few small gradients, and Adam's first step is lr sign(g), so single elements may differ by 2 lr, but
      the RMS stays small (measured on 2 CPU cores: at most 1.3e-4 S), while a run that read other samples or draws
      differs by about S."""
    assert (a["step"], a["epoch"], a["samples"]) == (b["step"], b["epoch"], b["samples"])
    args, group = a["args"], a["optimizer"]["param_groups"][0]
    peak = args["lr"] if args.get("lr") is not None else args["blr"] * a["effective_batch"] / 256
    steps = a["step"]
    b1, b2 = group["betas"]
    c = (1 - b1) / math.sqrt(1 - b2) / math.sqrt(1 - b1 ** 2 / b2)
    S = steps * peak
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        if not value.is_floating_point():
            assert torch.equal(b["model"][key], value), key
            continue
        diff = (b["model"][key] - value).abs()
        assert diff.max() <= 2 * c * S, (key, diff.max() / S)
        signal = diff[~zero_gradient_elements(key, value)]
        if signal.numel():
            assert signal.pow(2).mean().sqrt() <= 1e-2 * S, (key, signal.pow(2).mean().sqrt() / S)
    states_a, states_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert states_a.keys() == states_b.keys()
    for pid in states_a:  # Adam's moments are averages of gradients: rounding noise stays far below 1e-5
        for key, value in states_a[pid].items():
            assert torch.allclose(states_b[pid][key].float(), value.float(), atol=1e-5, rtol=0), (pid, key)


def script_cmd(name):
    return [str(ROOT / f"{SCRIPTS[name][0]}.py")]


def subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
