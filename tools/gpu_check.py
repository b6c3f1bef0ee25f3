"""One command for the GPU checks of every script, with full logs in files and a summary table printed last.

    python tools/gpu_check.py --parts smoke,bench,loader            # ViT-B/16 at 224 px on the GPU (bf16)
    python tools/gpu_check.py --parts compile                       # --compile runs and benches (minutes of inductor)
    python tools/gpu_check.py --quick --device cpu                  # the same checks on a micro ViT, on the CPU

Parts:
- smoke: per training mode (latent_mim, pcae, semmae pretrain with a random parts file, semmae parts): a run is stopped
  by SIGTERM once its checkpoint is past the middle (exit 75 expected), then the same command resumes it to the end;
  the loss must be finite and fall; `eval_probe.py --mode knn` reads the checkpoint on the same device.
- compile: the same tiny run eager and with --compile: the first steps' losses must agree to bf16 tolerance, the
  checkpoint keys must be clean; then --bench --compile for every step.
- bench: --bench (eager) for every training step at the papers' per-GPU batch (or --bench-batch): images/s, MFU
  against the device's dense bf16 peak, peak memory.
- loader: `tools/bench.py bench-loader`, both input paths (--decode cpu / device) with 1, 8 and 16 workers.
Writes OUT/gpu_check.log (every command and its output), OUT/results.json and OUT/summary.md (OUT: --out, else $OUT,
else gpu_check_out). Exit code 0 when every check passed, 1 otherwise.
"""
import argparse, json, math, os, re, shlex, signal, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="smoke,bench,loader", help="comma-separated: smoke, compile, bench, loader")
    p.add_argument("--quick", action="store_true", help="micro ViT, 32 px, few steps (checks the script on a CPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of a smoke run")
    p.add_argument("--bench-steps", type=int, default=10)
    p.add_argument("--bench-batch", type=int, default=0, help="per-GPU batch of --bench (0: each paper's)")
    p.add_argument("--workers", default="1,8,16", help="loader worker counts")
    p.add_argument("--modes", default="latent_mim,pcae,semmae,semmae-parts", help="training modes of smoke / compile")
    return p.parse_args()


class Checker:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "gpu_check.log", "a")
        self.results = {"smoke": {}, "compile": {}, "bench": {}, "loader": {}, "failures": []}
        q = args.quick
        self.size = 32 if q else 224
        self.model = ["--model", "micro", "--input-size", "32"] if q else []  # the scripts' defaults: ViT-B/16, 224 px
        self.small_decoder = ["--decoder-dim", "32", "--decoder-heads", "2", "--decoder-depth", "1"] if q else []
        self.data = ["--data", "synthetic", "--synthetic-size", "96" if q else "1024", "--num-workers",
                     "0" if q else "8", "--device", args.device]

    def run(self, cmd, background=None, timeout=600):
        """A script of the project with its output appended to the log; returns (exit code, output). background: a
        file for the output, and the process is returned at once."""
        line = " ".join(shlex.quote(c) for c in cmd)
        self.log.write(f"\n$ {line}\n")
        self.log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if background is not None:
            return subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=open(background, "w"),
                                    stderr=subprocess.STDOUT, text=True)
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # kill it, report it, and go on to the summary
            proc.kill()
            out = proc.communicate()[0] + f"\n[killed after {timeout} s]\n"
            self.fail(f"{line[:80]}: over {timeout} s")
        self.log.write(out)
        self.log.write(f"[exit {proc.returncode}]\n")
        self.log.flush()
        return proc.returncode, out

    def fail(self, what):
        self.results["failures"].append(what)
        print(f"FAIL {what}", flush=True)

    # ------------------------------------------------------------------------------------------------ smoke
    def training_modes(self, parts_file):
        lm_quick = ["--gap", "2", "--proj-dim", "64"] if self.args.quick else []
        modes = {
            "latent_mim": ["latent_mim.py", *lm_quick, *self.small_decoder],
            "pcae": ["pcae.py", *self.small_decoder],
            "semmae": ["semmae.py", "pretrain", "--parts", str(parts_file), *self.small_decoder],
            "semmae-parts": ["semmae.py", "parts", "--teacher", "random", "--num-parts", "4",
                             *(["--dec-channels", "32"] if self.args.quick else [])],
        }
        return {name: modes[name] for name in self.args.modes.split(",")}

    def write_parts_file(self):
        """Random part ids for the synthetic training images at the patch grid of the model (4 parts)."""
        import torch
        import train_utils
        grid = self.size // (8 if self.args.quick else 16)
        n = int(self.data[self.data.index("--synthetic-size") + 1])
        path = self.out / "parts.pt"
        ids = torch.randint(4, (n, grid, grid), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
        train_utils.save_checkpoint(path, {"method": "semmae-parts", "part_ids": ids, "grid": [grid, grid],
                                           "num_parts": 4, "paths": [f"synthetic:0:{i}" for i in range(n)],
                                           "image_size": self.size})
        return path

    @staticmethod
    def step_losses(output):
        return [float(m) for m in re.findall(r"^step \d+/\d+ .*?\bloss=([-+0-9.eE]+|nan|inf)", output, re.M)]

    def smoke(self):
        import train_utils
        parts = self.write_parts_file()
        steps = self.args.steps
        for name, script in self.training_modes(parts).items():
            folder = self.out / f"smoke-{name}"
            cmd = [*script, *self.model, *self.data, "--batch-size", "8" if self.args.quick else "32", "--accum", "1",
                   "--epochs", "100", "--warmup-epochs", "1", "--lr", "5e-4", "--log-every", "2",
                   "--save-every", str(max(steps // 4, 1)),
                   "--max-steps", str(steps), "--output-dir", str(folder)]
            if name == "semmae-parts":
                cmd += ["--out", str(folder / "parts.pt")]
            row, ckpt, first_log = {}, folder / "checkpoint.pth", self.out / f"smoke-{name}.out"
            proc = self.run(cmd, background=first_log)
            deadline = time.time() + 600
            while proc.poll() is None and time.time() < deadline:  # SIGTERM once the run is past the middle
                done = [int(s) for s in re.findall(r"^step (\d+)/", first_log.read_text(), re.M)]
                if done and done[-1] >= steps // 2:
                    proc.send_signal(signal.SIGTERM)
                    break
                time.sleep(0.02)
            if proc.poll() is None and time.time() >= deadline:
                proc.kill()
            proc.wait()
            first = first_log.read_text()
            first_log.unlink()
            self.log.write(first + f"[exit {proc.returncode}]\n")
            row["sigterm_exit"] = proc.returncode
            if proc.returncode != 75:  # -15: the signal came after the run (too fast for --steps) or before run_main
                self.fail(f"smoke {name}: SIGTERM gave exit {proc.returncode}, expected 75 (raise --steps if the run "
                          f"had already ended)")
            stopped_at = train_utils.load_checkpoint(ckpt)["step"] if ckpt.exists() else None
            rc, second = self.run(cmd)  # the same command again: resumes and finishes
            final = train_utils.load_checkpoint(ckpt) if ckpt.exists() else {}
            losses = self.step_losses(first) + self.step_losses(second)
            row.update(stopped_at=stopped_at, resumed=f"resumed from {ckpt}" in second, final_step=final.get("step"),
                       exit=rc, first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                       images_per_s=_last(second, "images_per_s"), mfu=_last(second, "mfu"))
            if rc != 0 or final.get("step") != steps or not row["resumed"]:
                self.fail(f"smoke {name}: resume ended with exit {rc} at step {final.get('step')}")
            if not losses or not all(math.isfinite(v) for v in losses) or losses[-1] >= losses[0]:
                self.fail(f"smoke {name}: loss not finite and falling ({row['first_loss']} -> {row['last_loss']})")
            if name != "semmae-parts":  # the exported encoder on the same device
                rc, probe = self.run(["eval_probe.py", "--ckpt", str(ckpt), "--data", "synthetic", "--mode", "knn",
                                      "--synthetic-size", "512", "--batch-size", "64", "--num-workers",
                                      self.data[self.data.index("--num-workers") + 1], "--device", self.args.device,
                                      "--output", str(folder / "probe.jsonl")])
                row["knn20_top1"] = _last(probe, "20-NN: top-1", sep=" ")
                if rc != 0:
                    self.fail(f"smoke {name}: eval_probe exit {rc}")
            self.results["smoke"][name] = row
            print(f"smoke {name}: {row}", flush=True)

    # ---------------------------------------------------------------------------------------------- compile
    def compile(self):
        import train_utils
        for name, script in self.training_modes(self.write_parts_file()).items():
            if name == "semmae-parts":
                continue
            losses = {}
            for mode in ("eager", "compile"):
                folder = self.out / f"compile-{name}-{mode}"
                cmd = [*script, *self.model, *self.data, "--batch-size", "8" if self.args.quick else "32",
                       "--epochs", "100", "--lr", "5e-4", "--log-every", "1", "--max-steps", "5",
                       "--output-dir", str(folder), *(["--compile"] if mode == "compile" else [])]
                rc, out = self.run(cmd, timeout=900)
                losses[mode] = self.step_losses(out)
                if rc != 0:
                    self.fail(f"compile {name} {mode}: exit {rc}")
            ckpt = train_utils.load_checkpoint(self.out / f"compile-{name}-compile" / "checkpoint.pth")
            dirty = [k for k in [*ckpt["model"], *ckpt["encoder"]] if "_orig_mod" in k or k.startswith("module.")]
            pairs = list(zip(losses["eager"], losses["compile"]))
            worst = max((abs(a - b) / max(abs(a), 1e-6) for a, b in pairs), default=None)
            row = {"steps_compared": len(pairs), "max_rel_diff": worst, "clean_keys": not dirty}
            if not pairs or worst > 0.05 or dirty:
                self.fail(f"compile {name}: {row}")
            self.results["compile"][name] = row
            print(f"compile {name}: {row}", flush=True)
        self.bench(compiled=True)

    # ------------------------------------------------------------------------------------------------ bench
    def bench(self, compiled=False):
        paper_batch = {"latent_mim": 256, "pcae": 64, "semmae": 64, "semmae-random": 64}  # per GPU in the recipes
        steps = {"latent_mim": ["latent_mim.py"], "pcae": ["pcae.py", "--bench-baseline"],
                 "semmae": ["semmae.py", "pretrain"], "semmae-random": ["semmae.py", "pretrain", "--masking", "random"]}
        for name, script in steps.items():
            batch = self.args.bench_batch or (4 if self.args.quick else paper_batch[name])
            extra = (["--gap", "2", "--proj-dim", "64"] if self.args.quick and name == "latent_mim" else [])
            cmd = [*script, *extra, *self.model, *self.small_decoder, "--data", "synthetic", "--device",
                   self.args.device, "--bench", "--batch-size", str(batch), "--bench-steps",
                   str(self.args.bench_steps), *(["--compile"] if compiled else [])]
            rc, out = self.run(cmd, timeout=900)
            if rc != 0:
                self.fail(f"bench {name}{' compile' if compiled else ''}: exit {rc}")
            for row in re.findall(r"^bench=.*$", out, re.M):
                fields = dict(kv.split("=", 1) for kv in row.split())
                key = fields["bench"] + (" (compile)" if compiled else "")
                self.results["bench"][key] = {k: fields.get(k) for k in ("device", "batch", "ms_per_step",
                                                                         "images_per_s", "gflop_per_image", "mfu",
                                                                         "peak_mem_gib")}
                print(f"bench {key}: {self.results['bench'][key]}", flush=True)

    # ----------------------------------------------------------------------------------------------- loader
    def loader(self):
        workers = "0,1" if self.args.quick else self.args.workers
        rc, out = self.run(["tools/bench.py", "bench-loader", "--images", "64" if self.args.quick else "2048",
                            "--workers", workers, "--batch-size", "16" if self.args.quick else "256", "--repeats",
                            "1", "--device", self.args.device], timeout=900)
        if rc != 0:
            self.fail(f"loader: exit {rc}")
        medians = r"^median path=(\w+) workers=(\d+) batch=\d+ images_per_s=([0-9.]+)"
        for path, n, rate in re.findall(medians, out, re.M):
            self.results["loader"][f"{path} workers={n}"] = float(rate)
        self.results["loader"]["peak_mem_gib"] = _last(out, "peak_mem_gib")
        self.results["loader"]["mean_abs_diff"] = _last(out, "mean_abs")

    # ----------------------------------------------------------------------------------------------- report
    def summary(self):
        import torch
        r, lines = self.results, []
        dev = torch.cuda.get_device_name() if torch.cuda.is_available() and self.args.device != "cpu" else "cpu"
        lines.append(f"device {dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
                     f"{'quick (micro ViT)' if self.args.quick else 'ViT-B/16 224 px'}")
        if r["smoke"]:
            lines += ["", "| smoke | SIGTERM exit | stopped at | resumed | final step | loss first -> last | "
                          "images/s | MFU | 20-NN top-1 |", "|---|---|---|---|---|---|---|---|---|"]
            for name, s in r["smoke"].items():
                lines.append(f"| {name} | {s['sigterm_exit']} | {s['stopped_at']} | {s['resumed']} | {s['final_step']} "
                             f"| {_fmt(s['first_loss'])} -> {_fmt(s['last_loss'])} | {_fmt(s['images_per_s'])} | "
                             f"{_fmt(s['mfu'])} | {_fmt(s.get('knn20_top1'))} |")
        if r["compile"]:
            lines += ["", "| compile | steps compared | max rel. loss diff | clean keys |", "|---|---|---|---|"]
            lines += [f"| {n} | {c['steps_compared']} | {_fmt(c['max_rel_diff'])} | {c['clean_keys']} |"
                      for n, c in r["compile"].items()]
        if r["bench"]:
            lines += ["", "| bench | batch | ms/step | images/s | GFLOP/image | MFU | peak GiB |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {n} | {b['batch']} | {b['ms_per_step']} | {b['images_per_s']} | {b['gflop_per_image']} | "
                      f"{b['mfu']} | {b['peak_mem_gib']} |" for n, b in r["bench"].items()]
        if r["loader"]:
            lines += ["", "loader images/s: " + ", ".join(f"{k} {_fmt(v)}" for k, v in r["loader"].items())]
        lines += ["", f"failures: {len(r['failures'])}" + "".join(f"\n- {f}" for f in r["failures"])]
        text = "\n".join(lines)
        (self.out / "summary.md").write_text(text + "\n")
        (self.out / "results.json").write_text(json.dumps(r, indent=1))
        print("\n" + text, flush=True)


def _last(text, key, sep="="):
    """The last number printed after `key=` (or `key ` with sep=' ') in a command's output, else None."""
    found = re.findall(re.escape(key) + re.escape(sep) + r"\s*([-+0-9.eE]+)", text)
    return float(found[-1]) if found else None


def _fmt(v):
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def main():
    args = parse_args()
    checker = Checker(args)
    for part in args.parts.split(","):
        {"smoke": checker.smoke, "compile": checker.compile, "bench": checker.bench, "loader": checker.loader}[part]()
    checker.summary()
    sys.exit(1 if checker.results["failures"] else 0)


if __name__ == "__main__":
    main()
