"""Shared test set-up: the project root on sys.path, single-threaded torch, the tiny run every script test uses,
and small helpers. Test modules import the helpers from here (`from conftest import ...`), never from each other."""
import importlib
import os
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
    common.save_checkpoint(path, {"method": "semmae-parts", "part_ids": ids, "grid": [4, 4], "num_parts": 3,
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
    return common.load_checkpoint(out / "checkpoint.pth")


def assert_same_state(a, b, atol):
    """Two training checkpoints at the same position with the same weights (teachers included) and optimizer state."""
    assert (a["step"], a["epoch"], a["samples"]) == (b["step"], b["epoch"], b["samples"])  # samples of the epoch
    for key, value in a["model"].items():
        assert torch.allclose(b["model"][key], value, atol=atol, rtol=0), key
    states_a, states_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert states_a.keys() == states_b.keys()
    for pid in states_a:
        for key, value in states_a[pid].items():
            assert torch.allclose(states_b[pid][key].float(), value.float(), atol=atol, rtol=0), (pid, key)


def script_cmd(name):
    return [str(ROOT / f"{SCRIPTS[name][0]}.py")]


def subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
