"""Training images: decoded once into a uint8 tensor (N, 3, S, S), then batched on the device.

Sources
  synthetic  procedurally generated face-like images, deterministic from a seed (the built-in default);
  celeba     torchvision's CelebA (aligned 178x218 images, download=False), cropped as the DDIM paper's
             CelebA model was: the 128x128 box with top-left corner (row 57, col 25), i.e. centred on
             (x=89, y=121), then resized to S x S;
  folder     any folder of images (recursively, symlinked folders included), centre-cropped to a square
             and resized to S x S.
Images are decoded as they are displayed (turned by their EXIF orientation). Decoded images are cached as
a .pt file (written atomically) with the names of the files skipped as unreadable, so decoding happens once
per dataset and a cached load warns about the same files.
Batches: a per-epoch permutation and flip mask drawn from (seed, epoch), so the data order is a pure
function of (seed, epoch, step) and resumes exactly; pixels scaled to [-1, 1] on the device.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from dream.errors import DreamError
from dream.files import atomic_file

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
CELEBA_CROP = (57, 25, 128, 128)  # top, left, height, width in the aligned 178x218 CelebA image
SYNTHETIC_CHUNK = 256  # images drawn per generator seed: image i depends on (seed, i) only
DECODE_VERSION = 3  # part of the image caches' key: raised whenever decoding changes what a file becomes
SKIPPED_SHOWN = 5  # skipped files named in the warning; the rest are counted


# ----------------------------------------------------------------------------------------------
# the built-in synthetic faces
def _soft_ellipse(xx, yy, cx, cy, rx, ry):
    """Anti-aliased mask of the ellipse ((x-cx)/rx)^2 + ((y-cy)/ry)^2 <= 1 (coordinates in [0, 1]),
    with an edge about one pixel wide; values in [0, 1]."""
    pixels = xx.shape[-1]
    d = torch.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    return torch.sigmoid((1 - d) * torch.minimum(rx, ry) * pixels * 2)


def _paint(image, mask, color):
    return image * (1 - mask) + mask * color


def synthetic_faces(count: int, seed: int = 0, size: int = 64) -> torch.Tensor:
    """`count` face-like uint8 images (count, 3, size, size): background gradient, hair, face oval,
    eyes with pupils, brows, nose and mouth, all with random geometry and colours."""
    if count < 1:
        raise DreamError(f"synthetic image count must be positive, got {count}")
    chunks = []
    for chunk in range(math.ceil(count / SYNTHETIC_CHUNK)):
        n = min(SYNTHETIC_CHUNK, count - chunk * SYNTHETIC_CHUNK)
        g = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
        chunks.append(_synthetic_chunk(g, SYNTHETIC_CHUNK, size)[:n])
    return torch.cat(chunks)


def _synthetic_chunk(g: torch.Generator, n: int, size: int) -> torch.Tensor:
    def uniform(lo, hi, channels=1):  # (n, channels, 1, 1)
        return lo + (hi - lo) * torch.rand(n, channels, 1, 1, generator=g)

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # pixel centres in [0, 1]
    yy, xx = coords[None, None, :, None], coords[None, None, None, :]
    top, bottom = uniform(0, 1, 3), uniform(0, 1, 3)
    image = top + (bottom - top) * yy  # vertical gradient, broadcast to (n, 3, size, size) by the painting
    cx, cy = uniform(0.44, 0.56), uniform(0.48, 0.58)
    rx, ry = uniform(0.22, 0.29), uniform(0.28, 0.36)
    skin = torch.tensor([0.93, 0.75, 0.62])[None, :, None, None] * uniform(0.45, 1.05) + uniform(-0.05, 0.05, 3)
    hair = uniform(0.02, 0.55) * torch.tensor([1.0, 0.8, 0.55])[None, :, None, None] + uniform(0, 0.1, 3)
    hair_mask = _soft_ellipse(xx, yy, cx, cy - uniform(0.03, 0.09), rx * uniform(1.1, 1.3), ry * uniform(1.0, 1.15))
    image = _paint(image, hair_mask, hair)
    image = _paint(image, _soft_ellipse(xx, yy, cx, cy, rx, ry), skin)
    eye_y, eye_dx = cy - ry * uniform(0.1, 0.3), rx * uniform(0.35, 0.5)
    eye_r = rx * uniform(0.12, 0.18)
    iris = uniform(0.05, 0.5, 3)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        image = _paint(image, _soft_ellipse(xx, yy, ex, eye_y, eye_r * 1.5, eye_r), torch.ones(1, 3, 1, 1) * 0.95)
        image = _paint(image, _soft_ellipse(xx, yy, ex, eye_y, eye_r * 0.7, eye_r * 0.7), iris)
        brow = _soft_ellipse(xx, yy, ex, eye_y - eye_r * uniform(1.8, 2.6), eye_r * 1.8, eye_r * 0.45)
        image = _paint(image, brow, hair * 0.8)
    nose = _soft_ellipse(xx, yy, cx, cy + ry * 0.12, rx * 0.1, ry * 0.14)
    image = _paint(image, nose * 0.5, skin * 0.75)
    mouth_w, mouth_h = rx * uniform(0.3, 0.55), ry * uniform(0.05, 0.12)
    lips = torch.tensor([0.75, 0.25, 0.3])[None, :, None, None] * uniform(0.7, 1.1)
    image = _paint(image, _soft_ellipse(xx, yy, cx, cy + ry * uniform(0.42, 0.55), mouth_w, mouth_h), lips)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# decoding real images
def _crop_resize(image, size: int, crop_box=None):
    import torchvision.transforms.functional as TF

    if crop_box is None:
        side = min(image.size)
        image = TF.center_crop(image, [side, side])
    else:
        image = TF.crop(image, *crop_box)
    image = TF.resize(image, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.pil_to_tensor(image)


class _DecodeFiles(torch.utils.data.Dataset):
    """(ok, uint8 image) per file; ok is False for a file that does not decode."""

    def __init__(self, paths, size, crop_box=None):
        self.paths, self.size, self.crop_box = paths, size, crop_box

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        # Pillow's warnings (palette transparency, odd EXIF, ...) say nothing the user can act on: a file
        # either decodes or is named in the one skip warning. Filtered here, as this may run in a worker.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with Image.open(self.paths[i]) as image:
                    return True, _crop_resize(as_rgb(upright(image)), self.size, self.crop_box)
            except Exception:  # noqa: BLE001  - any decode failure marks the file corrupt
                return False, torch.zeros(3, self.size, self.size, dtype=torch.uint8)


def upright(image):
    """A PIL image as it is displayed: turned or mirrored by its EXIF Orientation tag. An image whose
    pixels decode but whose EXIF block is damaged keeps its stored orientation instead of failing."""
    from PIL import ImageOps

    image.load()  # a failure here is the pixels': the file is corrupt
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001  - only the orientation is lost
        return image


def as_rgb(image):
    """An 8-bit RGB copy of a PIL image. 16-bit greyscale (modes I;16*, and I as PNG decodes them) is scaled
    by 1/257 to 0..255 first: PIL's own conversion clips it at 255, turning most images white."""
    from PIL import Image

    if image.mode == "I" or image.mode.startswith("I;16"):
        import numpy as np

        levels = np.asarray(image).astype(np.float64).clip(0, 65535)
        image = Image.fromarray(np.rint(levels / 257).astype(np.uint8), mode="L")
    return image.convert("RGB")


def decode_files(paths: list[Path], size: int, crop_box=None, what: str = "images",
                 workers: int | None = None) -> tuple[torch.Tensor, list[Path]]:
    """(decoded images, files skipped): isolated corrupt files are left out and returned for the caller to
    name (skip_message); a set where no file decodes is an error."""
    from tqdm.auto import tqdm

    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    loader = torch.utils.data.DataLoader(_DecodeFiles(paths, size, crop_box), batch_size=64,
                                         num_workers=workers if len(paths) > 256 else 0)
    images, decoded = [], []
    for ok, batch in tqdm(loader, desc=f"decoding {what}", disable=len(paths) < 2048, leave=False):
        images.append(batch[ok])
        decoded.extend(ok.tolist())  # the loader keeps the files' order
    skipped = [path for path, ok in zip(paths, decoded) if not ok]
    if len(skipped) == len(paths):
        raise DreamError(f"none of the {len(paths)} files in {what} could be read as an image")
    return torch.cat(images), skipped


def skip_message(skipped: Sequence[str | Path], total: int, what: str, root: Path | None = None) -> str:
    """One line naming the first SKIPPED_SHOWN skipped files (relative to `root` where they lie under it)."""
    def name(path) -> str:
        path = Path(path)
        try:
            text = str(path.relative_to(root)) if root is not None else str(path)
        except ValueError:
            text = str(path)
        return text if text.isprintable() else ascii(text)  # a newline in a name must not break the line

    names = ", ".join(name(path) for path in skipped[:SKIPPED_SHOWN])
    more = f" and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
    return f"skipped {len(skipped)} of {total} files in {what} that could not be read as images: {names}{more}"


def list_image_files(root: Path, *, exclude: Sequence[Path] = ()) -> list[Path]:
    """Every image file under `root`, sorted. Symlinked folders are followed, each real folder scanned once
    (a symlink cycle ends, a folder linked twice is not read twice). Files under a folder of `exclude`
    (compared as resolved paths; one that does not exist yet is fine), such as a run folder's sample
    grids, are left out."""
    if not root.exists():
        raise DreamError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DreamError(f"{root} is not a folder of images")
    excluded = [Path(os.path.realpath(Path(folder).expanduser())) for folder in exclude]
    left_out = False

    def is_excluded(path: str) -> bool:
        nonlocal left_out
        hit = any(Path(os.path.realpath(path)).is_relative_to(folder) for folder in excluded)
        left_out = left_out or hit
        return hit

    files = []
    visited = {os.path.realpath(root)}
    if not is_excluded(str(root)):
        for folder, subfolders, names in os.walk(root, followlinks=True):
            kept = []
            for sub in sorted(subfolders):  # sorted: which of two links to one folder is scanned is fixed
                real = os.path.realpath(os.path.join(folder, sub))
                if real not in visited and not is_excluded(real):
                    visited.add(real)
                    kept.append(sub)
            subfolders[:] = kept
            for name in names:
                path = os.path.join(folder, name)
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(path) \
                        and not is_excluded(path):
                    files.append(Path(path))
    if not files:
        outside = f" outside {', '.join(map(str, excluded))}" if left_out else ""
        raise DreamError(f"image folder {root} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                         f"{outside}")
    return sorted(files)


def celeba_files(root: Path, split: str) -> list[Path]:
    try:
        import torchvision
    except ImportError as error:
        raise DreamError(f"--data celeba reads CelebA through torchvision, which does not import here "
                         f"({error}); pip install torchvision matching torch {torch.__version__.split('+')[0]}") from None

    try:
        dataset = torchvision.datasets.CelebA(str(root), split=split, target_type=[], download=False)
    except (RuntimeError, FileNotFoundError, OSError) as error:
        # (torchvision's own message suggests download=True, which its CelebA download rarely survives)
        detail = "" if "download=True" in str(error) else f": {error}"
        raise DreamError(f"CelebA not found under {root} (expected {root}/celeba/img_align_celeba and its "
                         f"list files; download it by hand, then pass the folder above 'celeba'){detail}") from None
    except ValueError as error:
        raise DreamError(f"bad CelebA split {split!r}: {error}") from None
    return [Path(dataset.root) / dataset.base_folder / "img_align_celeba" / name for name in dataset.filename]


def dataset_files(source: str, root: Path, split: str = "train", *,
                  exclude: Sequence[Path] = ()) -> tuple[list[Path], tuple | None, str]:
    """(image files, crop box or None, description) of a CelebA split or an image folder; `exclude`: folders
    an image-folder scan leaves out (see list_image_files; a CelebA split's files are fixed by its list)."""
    if source == "celeba":
        return celeba_files(root, split), CELEBA_CROP, f"CelebA {split} under {root}"
    return list_image_files(root, exclude=exclude), None, str(root)


def files_fingerprint(files: list[Path]) -> str:
    """SHA-1 over every file's path, size and modification time: an image added, removed or rewritten
    changes it (what the decoded-image caches are keyed on)."""
    digest = hashlib.sha1()
    for path in files:
        try:
            stat = path.stat()
        except OSError as error:
            raise DreamError(f"image {path} cannot be read ({error.strerror or error})") from None
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def images_digest(images: torch.Tensor) -> str:
    """SHA-1 of the decoded images' bytes (shape included): equal digests, the same training data."""
    digest = hashlib.sha1(f"{tuple(images.shape)}|{images.dtype}|".encode())
    digest.update(memoryview(images.detach().cpu().contiguous().numpy()).cast("B"))
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# cache and entry point
def default_cache_dir() -> Path:
    return Path(os.environ.get("DREAM_CACHE", Path.home() / ".cache" / "dream"))


def load_images(source: str = "synthetic", root: str | None = None, split: str = "train", size: int = 64,
                count: int = 4096, seed: int = 0, cache_dir: str | Path | None = None, *,
                exclude: Sequence[Path] = ()) -> torch.Tensor:
    """The whole dataset as a uint8 tensor (N, 3, size, size). exclude: folders an image-folder scan leaves
    out, such as the run folder when it lies inside the data folder (its sample grids are no training data)."""
    if source == "synthetic":
        return synthetic_faces(count, seed=seed, size=size)
    if source not in ("celeba", "folder"):
        raise DreamError(f"unknown data source {source!r}; choose synthetic, celeba or folder")
    if not root:
        raise DreamError(f"--data {source} needs --data-root")
    root_path = Path(root).expanduser().resolve()
    files, crop, what = dataset_files(source, root_path, split, exclude=exclude)
    key = hashlib.sha1(f"{source}|{root_path}|{split}|{size}|{DECODE_VERSION}|{files_fingerprint(files)}".encode())
    cache = Path(cache_dir or default_cache_dir()) / f"{source}-{size}px-{key.hexdigest()[:16]}.pt"
    cached = _read_cache(cache) if cache.exists() else None
    if cached is not None:
        images, skipped = cached
    else:
        images, skipped_paths = decode_files(files, size, crop, what)
        skipped = [str(path) for path in skipped_paths]
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(cache) as f:
                torch.save({"images": images, "skipped": skipped}, f)
        except OSError as error:
            warnings.warn(f"could not write the image cache {cache}: {error}", stacklevel=2)
    if skipped:  # from the cache too: the files stay skipped until they change
        warnings.warn(skip_message(skipped, len(files), what, root_path), stacklevel=2)
    return images


def _read_cache(cache: Path) -> tuple[torch.Tensor, list[str]] | None:
    """(images, skipped file names) from an image cache, or None (with a warning) when it is unreadable."""
    try:
        data = torch.load(cache, weights_only=True)
        if not (isinstance(data, dict) and isinstance(data.get("images"), torch.Tensor)
                and data["images"].dtype == torch.uint8 and data["images"].ndim == 4
                and isinstance(data.get("skipped"), list) and all(isinstance(s, str) for s in data["skipped"])):
            raise ValueError("not an image cache")
        return data["images"], data["skipped"]
    except Exception:  # noqa: BLE001  - a damaged cache is rebuilt
        warnings.warn(f"image cache {cache} is unreadable; decoding again", stacklevel=3)
        return None


class DeviceBatches:
    """Batches of a uint8 image tensor kept on `device`, scaled to [-1, 1], randomly flipped.

    Epoch e uses the permutation and flip mask drawn from a generator seeded with (seed, e); with
    `world_size` > 1 each rank takes every world_size-th index of the same permutation.
    Only full batches are produced (constant shapes for compiled and graph-captured code)."""

    def __init__(self, images: torch.Tensor, batch_size: int, device, seed: int = 0, flip: bool = True,
                 rank: int = 0, world_size: int = 1):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DreamError("images must be a uint8 tensor (N, C, H, W)")
        per_epoch = images.shape[0] // world_size
        if batch_size < 1 or per_epoch < batch_size:
            raise DreamError(f"batch size {batch_size} needs at least {batch_size * world_size} images; "
                             f"the dataset has {images.shape[0]}")
        self.images = images.to(device)
        self.batch_size, self.device, self.seed, self.flip = batch_size, device, seed, flip
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = per_epoch // batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_order(self, epoch: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.images.shape[0], generator=g)
        flips = torch.rand(self.images.shape[0], generator=g) < 0.5
        return order[self.rank::self.world_size], flips

    def epoch(self, epoch: int, start_batch: int = 0):
        """Yield the batches of `epoch` from batch index `start_batch` on."""
        order, flips = self.epoch_order(epoch)
        for b in range(start_batch, self.batches_per_epoch):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.get(index, flips[index] if self.flip else None)

    def get(self, index: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.images[index.to(self.images.device)].float() / 127.5 - 1
        if flip is not None:
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        return x
