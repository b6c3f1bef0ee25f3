"""The benchmark of every training script's --bench (and --profile), the FLOP counting behind its GFLOP/image and
the logs' MFU, and the data-loader benchmark:

    python tools/bench.py bench-loader [--folder DIR] [--images N] [--workers 1,2] [--batch-size 64] [--device cuda]
"""
import argparse, contextlib, itertools, statistics, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules, also when run as a script
from common import (ImageFolder, ResumableSampler, SeededDataset, StepRandom, SyntheticShapes,  # noqa: E402
                    image_transform, make_loader, pretrain_transform)
from cli import UserError  # noqa: E402
from train_log import number_text  # noqa: E402
from train_utils import autocast  # noqa: E402


# ------------------------------------------------------------------------------------------- FLOPs and device peaks
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                   "A10G": 70e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}  # dense


def device_peak_flops(device):
    """Dense bf16 peak FLOP/s of a CUDA device, looked up by name; None on CPU or for an unknown device."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def attention_flops(q_shape, k_shape, v_shape, *_, out_shape=None, **__):
    """Fused attention forward, Q [B, H, N, d], K [B, H, M, d], V [B, H, M, d_v]:
    S = Q K^T (2 B H N M d) and O = softmax(S) V (2 B H N M d_v); the softmax is not counted (like torch)."""
    b, h, n, d = q_shape
    return 2 * b * h * n * k_shape[2] * (d + v_shape[3])


def attention_backward_flops(grad_shape, q_shape, k_shape, v_shape, *_, out_shape=None, **__):
    """Fused attention backward, counted as torch counts its CUDA flash / memory-efficient kernels: S = Q K^T
    recomputed (2 B H N M d), dP = dO V^T and dV = P^T dO (2 x 2 B H N M d_v), dQ = dS K and dK = dS^T Q
    (2 x 2 B H N M d)."""
    b, h, n, d = q_shape
    return 2 * b * h * n * k_shape[2] * (3 * d + 2 * v_shape[3])


def count_flops(fn):
    """FLOPs of calling fn() (forward and backward if fn does both), counted by torch's FlopCounterMode:
    2 FLOPs per multiply-add of matmuls, convolutions and attention (not norms, softmax, GELU or additions).
    torch has formulas for the CUDA attention kernels but counts the fused CPU kernel of
    F.scaled_dot_product_attention as 0 (ViT-B/16 forward: 33.7 instead of 35.1 GFLOP): only that CPU op is added,
    where torch has no formula of its own, so CUDA counts are unchanged and nothing counts twice."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry
    cpu_ops = {"_scaled_dot_product_flash_attention_for_cpu": attention_flops,
               "_scaled_dot_product_flash_attention_for_cpu_backward": attention_backward_flops}
    extra = {op: f for op, f in ((getattr(torch.ops.aten, n, None), f) for n, f in cpu_ops.items())
             if op is not None and op not in flop_registry}
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------------------ --bench
def timed(fn, device):
    """Wall time of one call of fn() in seconds (CUDA-synchronised) and the peak CUDA memory in GiB (None on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return seconds, torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def bench_report(name, seconds, batch, flops_per_image, device, memory=None):
    """One line (and a dict) with ms/step, images/s, GFLOP/image and MFU against the device's dense bf16 peak."""
    peak = device_peak_flops(device)
    row = {"bench": name, "device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
           "batch": batch, "ms_per_step": 1e3 * seconds, "images_per_s": batch / seconds,
           "gflop_per_image": flops_per_image / 1e9,
           "mfu": flops_per_image * batch / seconds / peak if peak else None, "peak_mem_gib": memory}
    print(" ".join(f"{k}={number_text(v)}" for k, v in row.items() if v is not None), flush=True)  # no 3.282e+04
    return row


PROFILE_LABELS = ("masking", "encoder", "teacher", "decoder", "loss", "backward", "optimizer", "ema")


@contextlib.contextmanager
def profile_labels(labels):
    """Label the parts of a model for the profiler from the outside, so that the model code carries no profiler
    calls: labels {label: (owner, attribute)} wraps owner.attribute (a method of a model, a sub-module's forward, a
    function of a script module) in record_function(label) while the context is open."""
    from torch.profiler import record_function
    saved = []
    for label, (owner, attr) in labels.items():
        def labelled(*a, _fn=getattr(owner, attr), _label=label, **kw):
            with record_function(_label):
                return _fn(*a, **kw)
        saved.append((owner, attr, vars(owner).get(attr)))
        setattr(owner, attr, labelled)
    try:
        yield
    finally:
        for owner, attr, old in reversed(saved):
            if old is None:
                delattr(owner, attr)  # a method of the class again
            else:
                setattr(owner, attr, old)


def profile_step(step_fn, device, labels, steps=3):
    """ms per step under each PROFILE_LABELS label (device time on CUDA, CPU time otherwise), printed and returned."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile_labels(labels), profile(activities=activities) as prof:
        for _ in range(steps):
            step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = {e.key: e for e in prof.key_averages()}
    total_key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    out = {k: getattr(events[k], total_key) / 1e3 / steps for k in PROFILE_LABELS if k in events}
    print("  profile (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()), flush=True)
    return out


def benchmark(cases, device, steps=10, compile=False, profile=False, seed=0):
    """--bench of every script: times the real optimizer step of each case on tensors already on the device (no data
    loader) after warm-up; several cases run interleaved step by step in one process, so that a busy machine slows
    them alike, and the median step is reported. FLOPs per image are counted on the eager model.
    cases: {name: (model, inputs, optimizer, after_step or None, labels)}, model(inputs[0], rng, *inputs[1:]) ->
    (loss, _); labels: the parts of the step for --profile (see profile_labels), which adds 'backward', 'optimizer'
    and 'ema' around those parts of the step."""
    from torch.profiler import record_function
    compiled = {n: (torch.compile(c[0]) if compile else c[0]) for n, c in cases.items()}

    def forward_backward(model, inputs):
        batch = inputs[0].shape[0]
        rng = StepRandom(seed, 0, device, slice(0, batch), batch)  # the same draws every step: timing only
        with autocast(device):
            loss, _ = model(inputs[0], rng, *inputs[1:])
        with record_function("backward"):
            loss.backward()

    def make_step(name):
        model, inputs, optimizer, after_step, _ = cases[name]

        def step():
            forward_backward(compiled[name], inputs)
            with record_function("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                with record_function("ema"):
                    after_step()
        return step

    flops_per_image, times, memory = {}, {n: [] for n in cases}, {}
    step_fns = {n: make_step(n) for n in cases}
    for name, (model, inputs, optimizer, _, _) in cases.items():
        flops_per_image[name] = count_flops(lambda: forward_backward(model, inputs)) / inputs[0].shape[0]
        optimizer.zero_grad(set_to_none=True)
        for _ in range(2):  # warm-up (allocator, autotuning, compilation)
            step_fns[name]()
    for _ in range(steps):
        for name in cases:
            seconds, memory[name] = timed(step_fns[name], device)
            times[name].append(seconds)
    rows = {}
    for name, (_, inputs, _, _, labels) in cases.items():
        median = sorted(times[name])[len(times[name]) // 2]
        rows[name] = bench_report(name, median, inputs[0].shape[0], flops_per_image[name], device, memory[name])
        if profile:
            rows[name]["profile_ms"] = profile_step(step_fns[name], device, labels)
    return rows


# ------------------------------------------------------------------------------------------------ the data loader
def make_jpeg_folder(root, count, seed=0):
    """`count` ImageNet-like JPEGs (about 500 x 375, quality 90, smooth content plus grain) in root/<class>/."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    shapes = SyntheticShapes(96, count, seed)
    for i in range(count):
        w, h = 400 + int(torch.randint(200, (), generator=g)), 300 + int(torch.randint(150, (), generator=g))
        img = F.interpolate(shapes.load(i)[0][None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
        img = (img + 12 * torch.randn(3, h, w, generator=g)).clamp(0, 255).to(torch.uint8)
        folder = Path(root) / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.jpg", quality=90)


def drain(it, count):
    """Take `count` items of an iterator, keeping none (a benchmark's memory is that of one batch at a time)."""
    for _ in range(count):
        next(it)


def bench_decode(root, workers=(1, 2), batch=64, size=224, device="cpu", batches=8, repeats=3):
    """images/s of the CPU path (SeededDataset: decode + crop + flip + normalise in the workers), of the device
    path (the workers read bytes and draw; the decoder decodes, crops and normalises on `device`) and of its workers
    alone ('payload': what they can feed a decoder), per worker count, the paths alternating, `repeats` times, the
    first batch of each loader untimed; then the decoder alone on payloads read in advance ('decoder', workers=0),
    with on CUDA the peak memory torch allocated while decoding one batch after another, in GiB (nvJPEG's own
    buffers are not counted); and the mean and max |device - cpu| over one batch (normalised units: 0 on the CPU,
    nvJPEG's difference on CUDA). One line per measurement, then the medians."""
    from device_decode import DecodeDataset, DeviceDecoder
    device = torch.device(device)
    folder = ImageFolder(root)
    cpu = SeededDataset(folder, image_transform(pretrain_transform(size)))
    dataset = DecodeDataset(folder, pretrain_transform(size), cpu)
    decoder = DeviceDecoder(dataset, device)
    count = min(batches, len(folder) // batch - 1)
    if count < 1:
        raise UserError(f"{root} has {len(folder)} images: bench_decode needs at least 2 batches of {batch}")

    def rate(path, n):
        loader = make_loader(cpu if path == "cpu" else dataset, batch, n, ResumableSampler(len(folder), batch))
        it = decoder.batches(iter(loader)) if path == "device" else iter(loader)
        next(it)  # start-up (worker processes, first batch) not timed
        seconds, _ = timed(lambda: drain(it, count), device)
        del it, loader
        return count * batch / seconds

    print(f"bench_decode: {len(folder)} images, {count} timed batches of {batch} per loader, torch threads "
          f"{torch.get_num_threads()} in this process (the decoder's CPU work runs here)", flush=True)
    rows = {}
    for r in range(repeats):
        for n in workers:
            for path in ("cpu", "device", "payload"):
                rows.setdefault((path, n), []).append(rate(path, n))
                print(f"repeat={r} path={path} workers={n} batch={batch} size={size} device={device} "
                      f"images_per_s={rows[path, n][-1]:.1f}", flush=True)
    payloads = list(itertools.islice(make_loader(dataset, batch, 0, ResumableSampler(len(folder), batch)), count + 1))
    first = decoder(payloads[0])[0].cpu()  # also the warm-up (nvJPEG's set-up on CUDA)
    keys = zip(payloads[0]["index"].tolist(), payloads[0]["seed"].tolist())
    diff = (first - torch.stack([cpu[key][0] for key in keys])).abs()  # against the CPU path, normalised units
    print(f"difference device-cpu batch={batch} mean_abs={diff.mean():.4g} max_abs={diff.max():.4g}", flush=True)
    memory = None
    for r in range(repeats):
        seconds, memory = timed(lambda: drain(map(decoder, payloads[1:]), count), device)
        rows.setdefault(("decoder", 0), []).append(count * batch / seconds)
        print(f"repeat={r} path=decoder workers=0 batch={batch} size={size} device={device} "
              f"images_per_s={rows['decoder', 0][-1]:.1f}" + (f" peak_mem_gib={memory:.3f}" if memory else ""),
              flush=True)
    medians = {key: statistics.median(v) for key, v in rows.items()}
    for (path, n), value in medians.items():
        print(f"median path={path} workers={n} batch={batch} images_per_s={value:.1f}", flush=True)
    return {"images_per_s": {f"{p}/{n}": v for (p, n), v in medians.items()}, "peak_mem_gib": memory,
            "mean_abs_diff": float(diff.mean()), "images": len(folder), "batches": count}


if __name__ == "__main__":
    import tempfile
    from train_utils import pick_device
    parser = argparse.ArgumentParser(description="Data-loader benchmark, both paths (--decode cpu and device): "
                                                 "`python tools/bench.py bench-loader`")
    parser.add_argument("command", choices=["bench-loader"])
    parser.add_argument("--folder", default="", help="an existing image folder root/<class>/*.jpg (default: generate)")
    parser.add_argument("--images", type=int, default=1024, help="JPEGs to generate")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to try")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every measurement (the median is printed)")
    parser.add_argument("--device", default="auto", help="where the device path decodes (auto: the GPU if any)")
    cli = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not cli.folder:
            make_jpeg_folder(tmp, cli.images)
        bench_decode(cli.folder or tmp, [int(w) for w in cli.workers.split(",")], cli.batch_size,
                     device=pick_device(cli.device), batches=cli.images // cli.batch_size - 1, repeats=cli.repeats)
