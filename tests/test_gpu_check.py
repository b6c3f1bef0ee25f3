"""tools/gpu_check.py, the one command of the GPU checks, run in its quick CPU mode: it must stop a run with SIGTERM,
resume it, read the checkpoint with eval_probe and write its summary."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env


@pytest.mark.slow
def test_gpu_check_quick_mode_on_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--quick", "--device", "cpu", "--steps", "40",
           "--parts", "smoke,loader", "--modes", "pcae", "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    smoke = results["smoke"]["pcae"]
    assert smoke["sigterm_exit"] == 75 and 20 <= smoke["stopped_at"] < 40  # stopped past the middle, saved its step
    assert smoke["resumed"] and smoke["final_step"] == 40 and smoke["exit"] == 0
    assert smoke["last_loss"] < smoke["first_loss"] and smoke["knn20_top1"] is not None
    paths = {f"{p} workers={n}" for p in ("cpu", "device", "payload") for n in (0, 1)} | {"decoder workers=0"}
    assert set(results["loader"]) == paths | {"peak_mem_gib", "mean_abs_diff"} and results["failures"] == []
    assert results["loader"]["mean_abs_diff"] == 0.0  # on the CPU both input paths give the same pixels
    summary = (tmp_path / "summary.md").read_text()
    assert "| pcae | 75 |" in summary and summary.rstrip().endswith("failures: 0")
    assert "$ " in (tmp_path / "gpu_check.log").read_text()  # every command is logged with its output
