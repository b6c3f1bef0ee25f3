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


@pytest.fixture
def root():
    return ROOT
