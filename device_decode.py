"""--decode device: the loader workers read JPEG bytes and draw each sample's augmentation; the training process
decodes the whole micro-batch on the device (torchvision.io.decode_jpeg: nvJPEG on CUDA, libjpeg-turbo on the CPU)
and crops, resizes, flips and normalises it there.

Why: a CPU worker decodes and crops about 135-165 ImageNet-sized JPEGs/s at 224 px (docs/performance.md), while one
H100-class GPU trains a ViT-B/16 MAE step at thousands of images/s; decoding on the device moves the heavy part off
the CPU. The CPU path (common.SeededDataset with the same transform) stays the reference:
- the same random draws: a worker seeds torch's default CPU generator with the sample's seed, as SeededDataset
  does, and makes the same calls in the same order as the CPU transform (the crop's own parameter draw, then the
  flip object itself on a 2-pixel image), so each sample gets the box and flip that the CPU path gives it;
- the same pixel kernels: the decoded uint8 image goes through torchvision.transforms.v2.functional's resized_crop
  (bicubic, antialias) and horizontal_flip, then the transform's own ToDtype / Normalize; on the CPU libjpeg-turbo
  decodes as Pillow does, so the device path is bit-identical to the CPU path there; nvJPEG's IDCT and chroma
  upsampling may differ from libjpeg's by small amounts (tools/bench.py bench-loader prints the difference on the device);
- the same handling of bad files: anything that is not a plain baseline-or-progressive JPEG in L or RGB ending with
  its EOI marker (PNG, BMP, CMYK JPEGs, truncated files, FIFOs, unreadable headers) is finished in the worker by the
  CPU path itself (same seed: bit-identical, with its replacement within the class, `bad` index and DataError);
  an image whose header was fine but that the device decoder refuses (a corrupt body) is finished by the CPU path
  in the training process.
Fine-tuning's RandAugment + RandomErasing run on the device per image, from the generator state the worker had
after drawing the crop and flip (it travels in the payload): the same draws as the CPU path, so the result is a pure
function of (seed, sample), and bit-identical to the CPU path when the device is the CPU.
SemMAE's part ids (semmae.joint_transform) are computed in the worker from the box it drew: the map is tiny.
"""
import io, os, stat, warnings

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TVF

from cli import UserError
from common import ImageFolder, SeededDataset, SyntheticShapes, image_transform, seeded_draws

JPEG_MAGIC, JPEG_EOI = b"\xff\xd8\xff", b"\xff\xd9"  # start of image + first marker; end of image
DEVICE_MODES = ("L", "RGB")  # Pillow modes of the JPEGs the device decodes (CMYK goes the CPU path: nvJPEG has no
                             # CMYK-to-RGB conversion that matches Pillow's)
FLIP_PROBE = torch.tensor([[[1, 0]]], dtype=torch.uint8)  # [1, 1, 2]: the flip transform run on it shows its draw


def check_device_decode(data):
    """--decode device needs image files: refuse --data synthetic in one line."""
    if data == "synthetic":
        raise UserError("--decode device reads JPEG files; --data synthetic has none (use --decode cpu)")


def read_jpeg(path):
    """(bytes of the file, (height, width)) when `path` is a JPEG that the device can decode: a regular file (opened
    non-blocking, as common.read_image does, so a FIFO is refused, not waited on) that starts with the JPEG magic
    bytes, ends with the EOI marker (a truncated file lacks it; nvJPEG might decode it without complaint where
    Pillow refuses it) and whose header Pillow reads as a JPEG of mode L or RGB (only the header is parsed). Else
    None: the worker then runs the CPU path, which raises read_image's error for a bad file."""
    from PIL import Image
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            data = f.read()
        if data[:3] != JPEG_MAGIC or data[-2:] != JPEG_EOI:
            return None
        with Image.open(io.BytesIO(data)) as img:  # header only (and Pillow's decompression-bomb check)
            if img.format != "JPEG" or img.mode not in DEVICE_MODES:
                return None
            return data, (img.height, img.width)
    except Exception:  # anything: the CPU path decides, with read_image's message
        return None


class Geometry:
    """The random geometry of a CPU-path transform v2.Compose([ToImage(), crop, RandomHorizontalFlip(), *rest]):
    `draw(height, width)` makes the draws that the transform makes for an image of that size, in its order, from the
    default generator as seeded: the crop box (v2.RandomResizedCrop's own parameter draw, or `box(height, width)` for
    another crop, e.g. eval_probe's TF-style crop: functools.partial(tf_crop_params, scale=..., ratio=...)), then
    the flip (the flip transform itself, run on a 2-pixel image). `rest` is applied on the device: to the whole
    stacked batch when it is only ToDtype / Normalize (per-pixel: the same values as image by image), else image by
    image from the generator state after the flip (RandAugment, RandomErasing: their draws stay those of the CPU)."""
    def __init__(self, transform, box=None):
        steps = list(getattr(transform, "transforms", ()))
        if len(steps) < 3 or not isinstance(steps[0], v2.ToImage) or not isinstance(steps[2], v2.RandomHorizontalFlip):
            raise ValueError("the device path reproduces v2.Compose([ToImage(), crop, RandomHorizontalFlip(), ...])")
        self.crop, self.flip, rest = steps[1], steps[2], steps[3:]
        box = box or getattr(self.crop, "box", None)  # e.g. eval_probe's TF-style crop draws its box this way
        if box is None and not isinstance(self.crop, v2.RandomResizedCrop):
            raise ValueError(f"pass box=(height, width) -> (top, left, h, w) for the crop {type(self.crop).__name__}")
        self.box = box
        size = self.crop.size
        self.size = [size, size] if isinstance(size, int) else list(size)  # [S_h, S_w] (v2 stores [S, S])
        self.interpolation = getattr(self.crop, "interpolation", v2.InterpolationMode.BICUBIC)
        self.antialias = getattr(self.crop, "antialias", True)
        self.per_pixel = all(isinstance(t, (v2.ToDtype, v2.Normalize)) for t in rest)
        self.rest = v2.Compose(rest)

    def draw(self, height, width):
        """-> ((top, left, h, w), flipped) of an image of height x width, drawn as the CPU transform draws them."""
        if self.box is not None:
            box = tuple(int(v) for v in self.box(height, width))
        else:  # the crop's own draw; named _get_params before torchvision 0.21
            make_params = getattr(self.crop, "make_params", None) or getattr(self.crop, "_get_params")
            p = make_params([torch.empty(()).expand(3, height, width)])  # its size is all the draw reads
            box = (p["top"], p["left"], p["height"], p["width"])
        return box, bool(self.flip(FLIP_PROBE)[0, 0, 0] == 0)

    def apply(self, img, box, flipped):
        """uint8 image [3, H, W] (any device) -> uint8 crop [3, S_h, S_w]: the CPU transform's kernels."""
        img = TVF.resized_crop(img, *box, size=self.size, interpolation=self.interpolation, antialias=self.antialias)
        return TVF.horizontal_flip(img) if flipped else img


def part_ids_for_box(part_map, height, width, box, flipped, size, patch, num_parts):
    """SemMAE's per-patch part ids [L] for a sample whose image is height x width, cropped to `box` and resized to
    `size` ([S, S]), flipped or not: the steps of semmae.joint_transform on the part map [h, w] (resized nearest-exact
    to the image, the same crop (v2's kernel for a Mask: nearest) and flip, then the majority part of each patch:
    the argmax of its pixels' votes, ties to the lowest id)."""
    full = F.interpolate(part_map[None, None].float(), size=(height, width), mode="nearest-exact")[0, 0]  # [H, W]
    mask = TVF.resized_crop(tv_tensors.Mask(full.to(torch.uint8)), *box, size=size,
                            interpolation=v2.InterpolationMode.BICUBIC, antialias=True)  # as the transform calls it
    mask = TVF.horizontal_flip(mask) if flipped else mask
    votes = F.one_hot(mask.as_subclass(torch.Tensor).long(), num_parts).permute(2, 0, 1).float()  # [K, S, S]
    return F.avg_pool2d(votes, patch).argmax(0).flatten()  # [L]


class DecodeDataset(torch.utils.data.Dataset):
    """The loader workers' side of --decode device, indexed like SeededDataset by (i, seed) from the sampler.
    folder: the ImageFolder; transform: the CPU path's image transform (see Geometry; e.g. pretrain_transform(224));
    cpu: the CPU path's SeededDataset (default SeededDataset(folder, image_transform(transform))): it finishes every
    sample the device cannot take, so it must use the same transform (SemMAE: SeededDataset(WithParts(folder, ids),
    joint_transform(S, patch, K)) with transform=pretrain_transform(S), the image part of joint_transform);
    box: see Geometry; parts: (part ids [N, h, w], patch, num_parts) for SemMAE.
    Returns a payload dict (collated by the DataLoader's default collate; the variable-length fields are bytes, which
    it keeps as lists): jpeg (the file's bytes, b"" when the worker finished the sample), done (the finished float32
    image's bytes, else b""), size [2] (H, W), box [4], flip, label, index, seed, bad (as SeededDataset's), parts [L]
    (SemMAE), rng (the generator state after the flip, when the rest of the transform draws)."""
    def __init__(self, folder, transform, cpu=None, box=None, parts=None):
        if not isinstance(folder, ImageFolder):
            raise UserError("--decode device reads JPEG files from an image folder (use --decode cpu for other data)")
        self.folder, self.geometry, self.parts = folder, Geometry(transform, box), parts
        self.cpu = cpu if cpu is not None else SeededDataset(folder, image_transform(transform))
        self.base = self.cpu.base  # what TrainRun reports unreadable files by and hashes the image names of
        if len(self.cpu) != len(folder):
            raise ValueError("cpu must be the CPU path's dataset of the same folder")
        self.rng_bytes = 0 if self.geometry.per_pixel else torch.get_rng_state().numel()

    @classmethod
    def of(cls, seeded):
        """The device path of a CPU path's SeededDataset: an ImageFolder with image_transform(T) (T read back from
        its `image`), or SemMAE's WithParts(folder, ids) with joint_transform (its `image`, `patch`, `num_parts`)."""
        base, transform = seeded.base, seeded.transform
        if isinstance(base, SyntheticShapes):
            check_device_decode("synthetic")
        if not isinstance(getattr(transform, "image", None), v2.Compose):
            raise UserError("--decode device reproduces image transforms of the form v2.Compose([ToImage(), crop, "
                            "RandomHorizontalFlip(), ...]); use --decode cpu here")
        if hasattr(base, "part_ids"):
            return cls(base.base, transform.image, seeded, parts=(base.part_ids, transform.patch, transform.num_parts))
        return cls(base, transform.image, seeded)

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, key):
        i, seed = key
        jpeg = read_jpeg(self.folder.path(i))
        if jpeg is None:
            return self.finished(i, seed)
        data, (height, width) = jpeg
        g, rng = self.geometry, torch.zeros(self.rng_bytes, dtype=torch.uint8)
        with seeded_draws(seed):
            box, flipped = g.draw(height, width)
            if self.rng_bytes:
                rng = torch.get_rng_state()
        out = dict(jpeg=data, done=b"", size=torch.tensor([height, width]), box=torch.tensor(box), flip=flipped,
                   label=self.folder.samples[i][1], index=i, seed=seed, bad=-1, rng=rng)
        if self.parts is not None:
            ids, patch, num_parts = self.parts
            out["parts"] = part_ids_for_box(ids[i], height, width, box, flipped, g.size, patch, num_parts)
        return out

    def finished(self, i, seed):
        """The payload of a sample that the CPU path finishes in the worker (same seed: bit-identical)."""
        img, *ids, label, bad = self.cpu[(i, seed)]
        out = dict(jpeg=b"", done=img.as_subclass(torch.Tensor).float().contiguous().numpy().tobytes(),
                   size=torch.zeros(2, dtype=torch.long), box=torch.zeros(4, dtype=torch.long), flip=False,
                   label=label, index=i, seed=seed, bad=bad, rng=torch.zeros(self.rng_bytes, dtype=torch.uint8))
        if self.parts is not None:
            out["parts"] = ids[0]
        return out


def tensor_of_bytes(data, dtype=torch.uint8):
    """A 1-D tensor over immutable bytes without a copy (read only here: the decoder and .to() do not write)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(data, dtype=dtype)


class DeviceDecoder:
    """The training process's side of --decode device. decoder(payload) -> the tuple that the CPU path's loader
    gives, (imgs [B, 3, S, S] float32, labels [B]) or SemMAE's (imgs, part ids [B, L], labels), on `device`, plus
    bad [B] on the CPU. `batches(payloads)` decodes an iterator of payloads, on CUDA one batch ahead on a side
    stream (the decode of batch t + 1 overlaps the step of batch t)."""
    def __init__(self, dataset, device):
        self.dataset, self.geometry, self.device = dataset, dataset.geometry, torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def decode(self, datas):
        """uint8 images [3, H, W] on the device (None where decoding fails), in one decode_jpeg call; the images are
        tried one by one only when the batch fails (one bad image fails the whole call)."""
        with warnings.catch_warnings():  # torchvision 0.29 announces the move of torchvision.io to TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device) if datas else []
            except RuntimeError:
                out = []
                for data in datas:
                    try:
                        out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        out.append(None)
                return out

    def __call__(self, payload):
        g, dev, n, jpegs = self.geometry, self.device, len(payload["jpeg"]), payload["jpeg"]
        on_device = [k for k in range(n) if jpegs[k]]
        images = self.decode([tensor_of_bytes(jpegs[k]) for k in on_device])
        sizes, boxes, flips = payload["size"].tolist(), payload["box"].tolist(), payload["flip"].tolist()
        finished = {k: tensor_of_bytes(payload["done"][k], torch.float32).view(3, *g.size)  # by the worker
                    for k in range(n) if not jpegs[k]}
        redone, crops, cropped = {}, [], []  # redone: {k: the CPU path's sample} for images the device refused
        saved = None if g.per_pixel else torch.get_rng_state()
        try:
            for k, img in zip(on_device, images):
                if img is None or list(img.shape[-2:]) != sizes[k]:
                    redone[k] = self.dataset.cpu[(int(payload["index"][k]), int(payload["seed"][k]))]
                    finished[k] = redone[k][0].as_subclass(torch.Tensor)
                    continue
                crop = g.apply(img, boxes[k], flips[k])  # uint8 [3, S, S]
                if not g.per_pixel:  # RandAugment, erasing: their draws continue from the worker's generator state
                    torch.set_rng_state(payload["rng"][k].clone())  # a row view (storage offset > 0) crashes it
                    crop = g.rest(crop).as_subclass(torch.Tensor)
                crops.append(crop)
                cropped.append(k)
        finally:
            if saved is not None:
                torch.set_rng_state(saved)
        imgs = torch.stack(crops) if crops else None
        if imgs is not None and g.per_pixel:
            imgs = g.rest(imgs).as_subclass(torch.Tensor)  # ToDtype + Normalize on the whole batch [B', 3, S, S]
        if finished:
            full = torch.empty(n, 3, *g.size, device=dev)
            if imgs is not None:
                full[cropped] = imgs
            keys = sorted(finished)
            full[keys] = torch.stack([finished[k] for k in keys]).to(dev)
            imgs = full
        labels, bad, parts = payload["label"], payload["bad"], payload.get("parts")
        if redone:  # a replacement within the class may bring other part ids; the label and bad come with it
            labels, bad, parts = labels.clone(), bad.clone(), None if parts is None else parts.clone()
            for k, (_, *ids, label, bad_k) in redone.items():
                labels[k], bad[k] = label, bad_k
                if parts is not None:
                    parts[k] = ids[0]
        extra = () if parts is None else (parts.to(dev, non_blocking=True),)
        return (imgs, *extra, labels.to(dev, non_blocking=True), bad)

    def batches(self, payloads):
        """Iterator over the decoded micro-batches of an iterator of payloads (e.g. the loader's)."""
        if self.stream is None:
            yield from map(self, payloads)
            return
        ahead = None
        for payload in payloads:
            with torch.cuda.stream(self.stream):  # decoded on the side stream ...
                decoded = self(payload)
            done = torch.cuda.Event()
            done.record(self.stream)
            if ahead is not None:
                yield self.hand_over(*ahead)  # ... while the caller runs the step of the batch before it
            ahead = decoded, done
        if ahead is not None:
            yield self.hand_over(*ahead)

    def hand_over(self, decoded, done):
        """The side stream's tensors made safe to use on the caller's stream."""
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(done)
        for t in decoded:
            if t.device.type == "cuda":
                t.record_stream(stream)  # the allocator must not reuse their memory before the caller's work ends
        return decoded

