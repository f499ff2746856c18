"""Training images: decoded once into a uint8 tensor (N, 3, S, S), then batched on the device.

Sources
  synthetic  procedurally generated face-like images, deterministic from a seed (the built-in default);
  celeba     torchvision's CelebA (aligned 178x218 images, download=False), cropped as the DDIM paper's
             CelebA model was: the 128x128 box with top-left corner (row 57, col 25), i.e. centred on
             (x=89, y=121), then resized to S x S;
  folder     any folder of images (recursively, symlinked folders included, folders dream wrote images
             into left out), centre-cropped to a square and resized to S x S.
Images are decoded as they are displayed (turned by their EXIF orientation). Decoded images are cached as
a .pt file (written atomically) with the names of the files skipped as unreadable, the file count and the
images' SHA-1 (checked on load), so decoding happens once per dataset and a cached load warns about the
same files.
Batches: a per-epoch permutation and flip mask drawn from (seed, epoch), so the data order is a pure
function of (seed, epoch, step) and resumes exactly; pixels scaled to [-1, 1] on the device.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from dream.errors import DreamError
from dream.files import atomic_file

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
CELEBA_CROP = (57, 25, 128, 128)  # top, left, height, width in the aligned 178x218 CelebA image
CELEBA_IMAGE_SIZE = (178, 218)  # width, height of every aligned CelebA image (img_align_celeba)
SYNTHETIC_CHUNK = 256  # images drawn per generator seed: image i depends on (seed, i) only
DECODE_VERSION = 5  # part of the image caches' key: raised whenever decoding changes what a file becomes
DECODERS = ("Pillow", "torchvision")  # their versions are part of the image caches' key too (they decode, resize)
SYNTHETIC_VERSION = 1  # part of the synthetic real set's statistics key: raised whenever synthetic_faces changes
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
def import_torchvision(what: str):
    """torchvision, or a one-line DreamError saying what needs it: a torchvision built for another torch
    fails at import with a RuntimeError ("operator torchvision::nms does not exist"), not an ImportError."""
    try:
        import torchvision
        import torchvision.transforms.functional  # noqa: F401  (the part the decoders use)
    except Exception as error:  # noqa: BLE001
        why = (str(error).splitlines() or [type(error).__name__])[0]
        raise DreamError(f"{what} needs torchvision, which does not import here ({why}); pip install the "
                         f"torchvision release that matches torch {torch.__version__.split('+')[0]}") from None
    return torchvision


def _crop_resize(image, size: int, crop_box=None):
    import torchvision.transforms.functional as TF

    if crop_box is None:
        side = min(image.size)
        image = TF.center_crop(image, [side, side])
    else:
        image = TF.crop(image, *crop_box)
    image = TF.resize(image, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.pil_to_tensor(image)


DECODED, UNREADABLE, WRONG_SIZE = 0, 1, 2  # what _DecodeFiles made of a file


class _DecodeFiles(torch.utils.data.Dataset):
    """(status, uint8 image) per file: DECODED, UNREADABLE (it does not decode) or WRONG_SIZE (a crop box was
    given for images of `image_size`, and this one is another size: the box would crop the wrong region)."""

    def __init__(self, paths, size, crop_box=None, image_size=None):
        self.paths, self.size, self.crop_box, self.image_size = paths, size, crop_box, image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        # Pillow's warnings (palette transparency, odd EXIF, ...) say nothing the user can act on: a file
        # either decodes or is named in the one skip warning. Filtered here, as this may run in a worker.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blank = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
            try:
                with Image.open(self.paths[i]) as image:
                    depth = integer_depth(image)
                    image = upright(image)
                    if self.crop_box is not None and not fits(self.crop_box, image.size, self.image_size):
                        return WRONG_SIZE, blank
                    return DECODED, _crop_resize(as_rgb(image, depth), self.size, self.crop_box)
            except Exception:  # noqa: BLE001  - any decode failure marks the file corrupt
                return UNREADABLE, blank


def fits(box, size, expected=None) -> bool:
    """Whether an image of PIL size (width, height) is `expected` (when given) and holds the (top, left,
    height, width) box."""
    top, left, height, width = box
    inside = top >= 0 and left >= 0 and top + height <= size[1] and left + width <= size[0]
    return inside and (expected is None or tuple(size) == tuple(expected))


def upright(image):
    """A PIL image as it is displayed: turned or mirrored by its EXIF Orientation tag. An image whose
    pixels decode but whose EXIF block is damaged keeps its stored orientation instead of failing."""
    from PIL import ImageOps

    image.load()  # a failure here is the pixels': the file is corrupt
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001  - only the orientation is lost
        return image


def integer_depth(image) -> tuple[int, bool]:
    """(bits, signed) of the samples of a PIL image decoded as integers (modes I, I;16*): a TIFF says so in its
    BitsPerSample and SampleFormat tags (Pillow decodes 32-bit TIFFs, signed or not, as mode I); any other file is
    16-bit unsigned (Pillow decodes 16-bit PNG and PNM greyscale as I;16, or as I in older versions). Read it
    before the image is transposed: the copy has no tags."""
    tags = getattr(image, "tag_v2", None)
    if image.mode == "I" and tags is not None and tags.get(258):
        return int(tags.get(258)[0]), tuple(tags.get(339, (1,)))[0] == 2
    return 16, False


def as_rgb(image, depth: tuple[int, bool] = (16, False)):
    """An 8-bit RGB copy of a PIL image. Integer greyscale (modes I;16*, and I) of `depth` (integer_depth:
    bits, signed) is scaled from 0 .. 2^bits - 1 (signed: 0 .. 2^(bits-1) - 1, negative levels black) to
    0 .. 255: PIL's own conversion clips it at 255, turning most images white. A 32-bit image whose levels all
    lie in 0 .. 65535 (all black as 32-bit: a 16-bit image saved from Pillow's mode I) is scaled as 16-bit.
    Float greyscale (mode F, as float TIFFs decode) whose finite values lie in [0, 1] is scaled by 255 (PIL's
    conversion would round it to black), any other clipped to 0..255; NaN is black, +inf white, -inf black."""
    from PIL import Image

    if image.mode == "I" or image.mode.startswith("I;16") or image.mode == "F":
        import numpy as np

        levels = np.asarray(image)
        if image.mode == "F":
            levels = levels.astype(np.float64)
            finite = levels[np.isfinite(levels)]
            unit = finite.size and 0 <= finite.min() and finite.max() <= 1
            levels = np.nan_to_num(levels, nan=0.0, posinf=1.0 if unit else 255.0, neginf=0.0)
            levels = (levels * 255 if unit else levels).clip(0, 255)
        else:
            bits, signed = depth
            if levels.dtype == np.int32 and bits == 32 and not signed:  # unsigned levels Pillow holds as int32
                levels = levels.view(np.uint32)
            if bits == 32 and levels.size and 0 <= levels.min() and levels.max() <= 65535:
                bits, signed = 16, False  # 16-bit levels in a 32-bit file (Pillow saves mode I so): all black else
            top = 2 ** (bits - signed) - 1  # white; top / 255 is 257 for 16 bits, as exact as the levels
            levels = levels.astype(np.float64).clip(0, top) / (top / 255)
        image = Image.fromarray(np.rint(levels).astype(np.uint8), mode="L")
    return image.convert("RGB")


def _signals_to_the_parent(worker_id: int) -> None:
    """A decoding worker leaves Ctrl-C to its parent (which stops and shuts it down), and exits quietly on
    SIGTERM (exit code 0: its parent's loader does not report a worker killed by a signal, and a parent
    stopping for the same signal terminates its workers with it at exit)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))


def decode_files(paths: list[Path], size: int, crop_box=None, what: str = "images",
                 workers: int | None = None, image_size=None) -> tuple[torch.Tensor, list[Path]]:
    """(decoded images, files skipped): isolated corrupt files are left out and returned for the caller to
    name (skip_message); a set where no file decodes is an error, and so is one image of another size than
    `image_size` (width, height) when a crop box is given for such images."""
    from tqdm.auto import tqdm

    import_torchvision(f"decoding {what}")  # here, not first in a loader worker
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    loader = torch.utils.data.DataLoader(_DecodeFiles(paths, size, crop_box, image_size), batch_size=64,
                                         num_workers=workers if len(paths) > 256 else 0,
                                         worker_init_fn=_signals_to_the_parent)
    # Ctrl-C and SIGTERM (torchrun signals the whole process group) are the parent's to report. The workers are
    # forked with both blocked, so none dies of one, nor runs the parent's handlers, before
    # _signals_to_the_parent sets theirs; the parent gets them once unblocked.
    held = (signal.SIGINT, signal.SIGTERM)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, held) if hasattr(signal, "pthread_sigmask") else None
    try:
        batches = iter(loader)
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    images, statuses = [], []
    for status, batch in tqdm(batches, desc=f"decoding {what}", disable=len(paths) < 2048, leave=False):
        images.append(batch[status == DECODED])
        statuses.extend(status.tolist())  # the loader keeps the files' order
    wrong = [path for path, status in zip(paths, statuses) if status == WRONG_SIZE]
    if wrong:
        from PIL import Image

        with Image.open(wrong[0]) as image:
            width, height = upright(image).size
        top, left, box_height, box_width = crop_box
        wanted = f"{image_size[0]}×{image_size[1]} " if image_size else ""
        raise DreamError(f"{wrong[0]} is {width}×{height} pixels, and {len(wrong)} of the {len(paths)} images of "
                         f"{what} are like it: the crop box ({box_width}×{box_height} at row {top}, column {left}) "
                         f"is for the {wanted}aligned CelebA images (img_align_celeba)")
    skipped = [path for path, status in zip(paths, statuses) if status == UNREADABLE]
    if len(skipped) == len(paths):
        raise DreamError(f"none of the {len(paths)} files in {what} could be read as an image")
    return torch.cat(images), skipped


def printable(name: str) -> str:
    """A file name as it can stand in a one-line message: quoted and escaped if it holds a newline, say."""
    return name if name.isprintable() else ascii(name)


def skip_message(skipped: Sequence[str | Path], total: int, what: str, root: Path | None = None) -> str:
    """One line naming the first SKIPPED_SHOWN skipped files (relative to `root` where they lie under it)."""
    def name(path) -> str:
        path = Path(path)
        try:
            text = str(path.relative_to(root)) if root is not None else str(path)
        except ValueError:
            text = str(path)
        return printable(text)

    names = ", ".join(name(path) for path in skipped[:SKIPPED_SHOWN])
    more = f" and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
    return f"skipped {len(skipped)} of {total} files in {what} that could not be read as images: {names}{more}"


SAMPLE_NAME = re.compile(r"\d{6,}\.png")  # the images of a sample set (dream.sample.image_path)


def _json_keys(path: str) -> set:
    """The keys of a small JSON object file; empty when it is not one."""
    try:
        if os.path.getsize(path) > 1 << 20:
            return set()
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def is_sample_set(folder: str, names: Sequence[str]) -> bool:
    """A folder dream sample or dream eval wrote images into: its sampling.json names the sampler and seed."""
    return "sampling.json" in names and {"sampler", "seed"} <= _json_keys(os.path.join(folder, "sampling.json"))


def written_by_dream(folder: str, names: Sequence[str], subfolders: Sequence[str]) -> bool:
    """Whether a folder holding these files and subfolders is one dream writes images into: a sample set, or a
    training run (a config.json naming dream's preset, objective and batch size, beside checkpoints/,
    metrics.jsonl or samples/)."""
    return is_sample_set(folder, names) or (
        "config.json" in names and ("metrics.jsonl" in names or "checkpoints" in subfolders or "samples" in subfolders)
        and {"preset", "objective", "batch_size"} <= _json_keys(os.path.join(folder, "config.json")))


def list_image_files(root: Path, *, exclude: Sequence[Path] = ()) -> list[Path]:
    """Every image file under `root`, sorted. Symlinked folders are followed, each real folder scanned once
    (a symlink cycle ends, a folder linked twice is not read twice). Files under a folder of `exclude`
    (compared as resolved paths; one that does not exist yet is fine), such as a run folder's sample
    grids, and under any subfolder dream wrote images into (written_by_dream: other runs, sample sets; named
    in a warning) are left out."""
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

    files, dream_folders = [], []
    visited = {os.path.realpath(root)}
    if not is_excluded(str(root)):
        for folder, subfolders, names in os.walk(root, followlinks=True):
            if folder != str(root) and written_by_dream(folder, names, subfolders):  # the root: asked for by name
                dream_folders.append(folder)
                subfolders[:] = []
                continue
            if is_sample_set(folder, names):  # a sample set asked for by name: its images, not its grid.png
                names = [name for name in names if SAMPLE_NAME.fullmatch(name)]
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
    if dream_folders:
        names = ", ".join(printable(os.path.relpath(folder, root)) for folder in sorted(dream_folders)[:SKIPPED_SHOWN])
        more = f" and {len(dream_folders) - SKIPPED_SHOWN} more" if len(dream_folders) > SKIPPED_SHOWN else ""
        warnings.warn(f"left out {len(dream_folders)} folder(s) under {root} that dream wrote images into (runs, "
                      f"sample sets): {names}{more}", stacklevel=2)
    if not files:
        outside = [*map(str, excluded)] if left_out else []
        if dream_folders:
            outside.append(f"the folders dream wrote ({', '.join(sorted(dream_folders)[:SKIPPED_SHOWN])})")
        raise DreamError(f"image folder {root} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                         + (f" outside {', '.join(outside)}" if outside else ""))
    return sorted(files)


def celeba_files(root: Path, split: str) -> list[Path]:
    torchvision = import_torchvision("--data celeba")
    try:
        dataset = torchvision.datasets.CelebA(str(root), split=split, target_type=[], download=False)
    except (RuntimeError, FileNotFoundError, OSError) as error:
        # (torchvision's own message suggests download=True, which its CelebA download rarely survives)
        try:
            problem = celeba_problem(root, torchvision.datasets.CelebA)
        except OSError as unreadable:  # a list file that cannot be read: that is the problem
            problem = f"{Path(unreadable.filename or '?').name} cannot be read ({unreadable.strerror})"
        detail = "" if problem or "download=True" in str(error) else f": {error}"
        raise DreamError(f"CelebA {f'under {root} is incomplete: {problem}' if problem else f'not found under {root}'}"
                         f" (expected {root}/celeba/img_align_celeba and its five list files; download them by hand "
                         f"from the CelebA site, then pass the folder above 'celeba'){detail}") from None
    except ValueError as error:
        raise DreamError(f"bad CelebA split {split!r}: {error}") from None
    return [Path(dataset.root) / dataset.base_folder / "img_align_celeba" / name for name in dataset.filename]


def celeba_problem(root: Path, celeba_class) -> str | None:
    """What keeps torchvision's CelebA from loading `root` whose celeba/ folder is there: a missing image
    folder, a missing list file, or a list file whose MD5 differs from the official one (edited, converted to
    CRLF, another release); None when there is no celeba/ folder or no such problem."""
    from torchvision.datasets.utils import check_integrity

    folder = root / celeba_class.base_folder
    if not folder.is_dir():
        return None  # nothing of CelebA there
    missing, changed = [], []
    for _, md5, name in celeba_class.file_list:
        if Path(name).suffix in (".zip", ".7z"):
            continue
        if not (folder / name).is_file():
            missing.append(name)
        elif not check_integrity(str(folder / name), md5):
            changed.append(name)
    if not (folder / "img_align_celeba").is_dir():
        missing.insert(0, "img_align_celeba/")
    if missing:
        return f"{', '.join(missing)} missing"
    if changed:
        return (f"{', '.join(changed)} not the official file{'s' if len(changed) > 1 else ''} (MD5 differs: edited, "
                f"converted line endings or another release?)")
    return None


def dataset_files(source: str, root: Path, split: str = "train", *,
                  exclude: Sequence[Path] = ()) -> tuple[list[Path], tuple | None, str]:
    """(image files, crop box or None, description) of a CelebA split or an image folder; `exclude`: folders
    an image-folder scan leaves out (see list_image_files; a CelebA split's files are fixed by its list)."""
    if source == "celeba":  # (load_images checks the images' size: CELEBA_IMAGE_SIZE)
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
        digest.update(os.fsencode(path) + f"|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


_DIGESTS = WeakIdKeyDictionary()  # tensor -> (its version counter, its digest) while the tensor lives


def images_digest(images: torch.Tensor) -> str:
    """SHA-1 of the decoded images' bytes (shape included): equal digests, the same training data. Remembered
    per tensor until it is written to (its version counter moves), so the cache check on load and the
    trainer's data check hash the ~2 GB of CelebA once. An inference-mode tensor has no version counter: it is
    hashed every time."""
    remembered = not images.is_inference()
    known = _DIGESTS.get(images) if remembered else None
    if known is not None and known[0] == images._version:
        return known[1]
    digest = hashlib.sha1(f"{tuple(images.shape)}|{images.dtype}|".encode())
    digest.update(memoryview(images.detach().cpu().contiguous().numpy()).cast("B"))
    if remembered:
        _DIGESTS[images] = (images._version, digest.hexdigest())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# cache and entry point
def default_cache_dir() -> Path:
    return Path(os.environ.get("DREAM_CACHE") or Path.home() / ".cache" / "dream").expanduser()  # empty: default


def check_fits_in_memory(nbytes: int, what: str, processes: int = 1) -> None:
    """A one-line DreamError when `what` (nbytes, held by each of `processes` processes on this machine) is more
    than the machine's physical memory: it would be killed by the kernel's out-of-memory killer, or fail after a
    long wait."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no check
        return
    if nbytes * processes > total:
        each = f" in each of the {processes} processes on this machine" if processes > 1 else ""
        raise DreamError(f"{what} take {nbytes / 1e9:,.1f} GB{each}, more than this machine's {total / 1e9:,.1f} GB "
                         f"of memory", same_on_every_rank=True)


def decoder_versions() -> str:
    """The installed versions of the libraries that decode and resize images ("Pillow 11.0.0|torchvision ..."):
    a new release may resample differently, so a cache made by another one is decoded again."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "none"
    return "|".join(f"{package} {installed(package)}" for package in DECODERS)


def load_images(source: str = "synthetic", root: str | None = None, split: str = "train", size: int = 64,
                count: int = 4096, seed: int = 0, cache_dir: str | Path | None = None, *,
                exclude: Sequence[Path] = (), processes: int = 1) -> torch.Tensor:
    """The whole dataset as a uint8 tensor (N, 3, size, size). exclude: folders an image-folder scan leaves
    out, such as the run folder when it lies inside the data folder (its sample grids are no training data).
    processes: how many processes on this machine load it (a synthetic set must fit that many times)."""
    if source == "synthetic":
        check_fits_in_memory(count * 3 * size * size, f"{count} synthetic images of {size}×{size}", processes)
        return synthetic_faces(count, seed=seed, size=size)
    if source not in ("celeba", "folder"):
        raise DreamError(f"unknown data source {source!r}; choose synthetic, celeba or folder")
    if not root:
        raise DreamError(f"--data {source} needs --data-root")
    root_path = Path(root).expanduser().resolve()
    files, crop, what = dataset_files(source, root_path, split, exclude=exclude)
    key = hashlib.sha1(f"{source}|".encode() + os.fsencode(root_path)
                       + f"|{split}|{size}|{DECODE_VERSION}|{decoder_versions()}|{files_fingerprint(files)}".encode())
    cache = Path(cache_dir or default_cache_dir()) / f"{source}-{size}px-{key.hexdigest()[:16]}.pt"
    cached = _read_cache(cache, key.hexdigest(), len(files), size) if cache.exists() else None
    if cached is not None:
        images, skipped = cached
    else:
        images, skipped_paths = decode_files(files, size, crop, what,
                                             image_size=CELEBA_IMAGE_SIZE if source == "celeba" else None)
        skipped = [str(path) for path in skipped_paths]
        _write_cache(cache, key.hexdigest(), images, skipped, len(files))
    if skipped:  # from the cache too: the files stay skipped until they change
        warnings.warn(skip_message(skipped, len(files), what, root_path), stacklevel=2)
    return images


def _write_cache(cache: Path, key: str, images: torch.Tensor, skipped: list[str], files: int) -> None:
    """The image cache of the files of `key` (load_images' full key), written atomically with the images' SHA-1;
    a warning if it cannot be."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(cache) as f:
            torch.save({"images": images, "skipped": skipped, "key": key, "files": files,
                        "sha1": images_digest(images)}, f)
    except OSError as error:
        warnings.warn(f"could not write the image cache {cache}: {error}", stacklevel=3)


def _read_cache(cache: Path, key: str, files: int, size: int) -> tuple[torch.Tensor, list[str]] | None:
    """(images, skipped file names) from the image cache of `files` files at `size` (`key`: load_images' full
    key), or None (with a warning) when it is unreadable, damaged (its images no longer match the SHA-1 stored
    with them: torch.load does not check), made of another set of files, or an older release's (no SHA-1)."""
    why = "unreadable"
    try:
        data = torch.load(cache, weights_only=True)
        if not (isinstance(data, dict) and isinstance(data.get("images"), torch.Tensor)
                and data["images"].dtype == torch.uint8 and data["images"].ndim == 4
                and isinstance(data.get("skipped"), list) and all(isinstance(s, str) for s in data["skipped"])):
            raise ValueError("not an image cache")
        images, skipped = data["images"], data["skipped"]
        if "sha1" not in data:  # its pixels cannot be checked: not trusted
            why = "from an older release of dream (no checksum)"
        elif data.get("key") != key or tuple(images.shape) != (files - len(skipped), 3, size, size):
            why = "made from other files"
        elif data.get("sha1") != images_digest(images):
            why = "damaged (its checksum does not match)"
        else:
            return images, skipped
    except Exception:  # noqa: BLE001  - a damaged cache is rebuilt
        pass
    warnings.warn(f"image cache {cache} is {why}; decoding again", stacklevel=3)
    return None


class DeviceBatches:
    """Batches of a uint8 image tensor, scaled to [-1, 1] on `device`, randomly flipped.

    The images are kept on `device` (each batch sliced there), or with on_device=False on the host (each
    batch gathered there and copied over as uint8: 1.5 MB at batch 128 and 64x64, which spares the device
    the whole set, 2.0 GB for CelebA's train split); the batches are the same bit for bit.
    Epoch e uses the permutation and flip mask drawn from a generator seeded with (seed, e); with
    `world_size` > 1 each rank takes every world_size-th index of the same permutation.
    Only full batches are produced (constant shapes for compiled and graph-captured code)."""

    def __init__(self, images: torch.Tensor, batch_size: int, device, seed: int = 0, flip: bool = True,
                 rank: int = 0, world_size: int = 1, on_device: bool = True):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DreamError("images must be a uint8 tensor (N, C, H, W)")
        per_epoch = images.shape[0] // world_size
        if batch_size < 1 or per_epoch < batch_size:
            raise DreamError(f"batch size {batch_size} needs at least {batch_size * world_size} images; "
                             f"the dataset has {images.shape[0]}")
        self.images = images.to(device) if on_device else images.cpu()
        self.batch_size, self.device, self.seed, self.flip = batch_size, torch.device(device), seed, flip
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
        """Yield the batches of `epoch` from batch index `start_batch` on. The epoch's order and flips are copied
        to the device once: a batch slices them there, with no host-to-device copy of its own (a synchronous copy
        would wait for the device's queue to drain, every step)."""
        order, flips = self.epoch_order(epoch)
        flips = flips[order].to(self.device)  # the flip of each position in the order
        order = order.to(self.images.device)
        for b in range(start_batch, self.batches_per_epoch):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield self.get(order[batch], flips[batch] if self.flip else None)

    @property
    def on_device(self) -> bool:
        return self.images.device.type == self.device.type

    def move_to_device(self) -> None:
        self.images = self.images.to(self.device)

    def get(self, index: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """The images at `index`, scaled to [-1, 1] on the device, mirrored where `flip` is True."""
        pixels = self.images[index.to(self.images.device)]
        if pixels.device.type == "cpu" and self.device.type != "cpu":
            # gathered on the host: copied from pinned memory without waiting (the host allocator keeps the
            # pinned block until the copy is done)
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        x = pixels.float() / 127.5 - 1
        if flip is not None:
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        return x
