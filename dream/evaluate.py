"""`dream eval`: sample N images with the EMA weights and score them against the real set with
FID, IS and KID, computed by torch-fidelity.

  generated  N PNGs written by dream.sample.sample_images (resumable; CUDA graphs on a GPU) into
             <out>/samples; reruns reuse the images already there, and 5,000 images are the first
             5,000 of 50,000 made with the same settings; under torchrun the processes share them out,
             then rank 0 alone scores them;
  real       the checkpoint's training data by default (synthetic, a CelebA split or a folder, through
             dream.data.load_images), served as a Dataset of uint8 (3, H, W) tensors; its features and
             FID statistics are cached by torch-fidelity under <dream cache>/fidelity, so the real set is
             loaded and featurised once; when they are not cached it is loaded, and checked to hold at
             least 2 images, before sampling; cache files that do not load or fail their CRC-32s are deleted
             and recomputed; a CelebA/folder set whose files change between its listing and its loading is
             an error, not cached;
  metrics    FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) over Inception pool features,
             IS = exp(E_x KL(p(y|x) || p(y))) (mean and std over splits of at least ISC_MIN_SPLIT images),
             KID = unbiased MMD^2 with the kernel (x.y/d + 1)^3;
  report     <out>/report-n<N>.json: sample count, sampler, steps, eta, seed, checkpoint, step, metrics
             (report-n<N>-2.json, ... when scored against another real set, metric list or extractor).

Offline: torch-fidelity downloads the Inception weights on first use. Without a network, pass the file
with --inception-weights PATH (torch-fidelity's feature_extractor_weights_path); this is checked before
any sampling (its SHA-256 must start with INCEPTION_SHA256_PREFIX), and a missing or wrong file is reported in
one line. torch-fidelity is imported only here.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
import warnings
import zipfile
from pathlib import Path

import torch

from dream.checkpoint import require_checkpoint
from dream.distributed import Distributed, agreed_setup
from dream.errors import DreamError, out_of_memory
from dream.files import atomic_write_text, folder_problem
from dream.sample import (add_sampling_arguments, check_counts, check_out_dir, checked_sampler, image_path,
                          load_sampler_model, parse_graphs, read_sample, sample_images)
from dream.seeding import check_seed

METRICS = ("fid", "isc", "kid")
INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_SHA256_PREFIX = "6726825d"  # the file's SHA-256 starts with the hash in its name (torch hub's convention)
ISC_MIN_SPLIT = 2  # images per Inception Score split at least: one image's IS is exactly 1 (p(y|x) = p(y))
REAL_SOURCES = ("synthetic", "celeba", "folder")


def import_fidelity():
    from dream.data import import_torchvision

    import_torchvision("FID/IS/KID (torch-fidelity)")  # which torch-fidelity imports: its failure named first
    try:
        import torch_fidelity
    except ImportError as error:
        if getattr(error, "name", None) not in (None, "torch_fidelity"):
            raise DreamError(f"torch-fidelity does not import here ({error}); FID/IS/KID need it") from None
        raise DreamError("FID/IS/KID need torch-fidelity: pip install torch-fidelity") from None
    except Exception as error:  # noqa: BLE001  - a broken install: one line
        raise DreamError(f"torch-fidelity does not import here ({type(error).__name__}: "
                         f"{(str(error).splitlines() or [''])[0]}); FID/IS/KID need it") from None
    return torch_fidelity


# ----------------------------------------------------------------------------------------------
# datasets of uint8 (3, H, W) images, as torch-fidelity takes them
class UInt8Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise DreamError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i]


class PngImages(torch.utils.data.Dataset):
    """Exactly the given files (not whatever else a folder holds), decoded to uint8 (3, size, size)."""

    def __init__(self, paths: list[Path], size: int | None = None):
        self.paths, self.size = [str(p) for p in paths], size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return read_sample(self.paths[i], self.size)

    def check(self) -> None:
        """Decode every file once here (a damaged one is a one-line error, not one raised in a loader worker)."""
        for i in range(len(self)):
            self[i]


class RealImages(torch.utils.data.Dataset):
    """The real set, loaded on first access (torch-fidelity does not touch it when its features are cached)."""

    def __init__(self, real: dict, size: int, cache_dir=None):
        self.real, self.size, self.cache_dir = real, size, cache_dir
        self._images: torch.Tensor | None = None

    @property
    def images(self) -> torch.Tensor:
        if self._images is None:
            self._images = load_real_images(self.real, self.size, self.cache_dir)
        return self._images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i]


def load_images(*args, **kwargs):  # indirection: tests check that a cached real set is never loaded
    from dream.data import load_images as load

    return load(*args, **kwargs)


def load_real_images(real: dict, size: int, cache_dir=None) -> torch.Tensor:
    """uint8 (N, 3, size, size); `count` keeps a fixed random subset (seeded 0) of a CelebA/folder set. A CelebA or
    folder set decodes the files resolve_real_set fingerprinted, or stops (check_real_files_unchanged)."""
    if real["source"] == "synthetic":
        return load_images("synthetic", size=size, count=real["count"], seed=real["seed"])
    check_real_files_unchanged(real)
    images = load_images(real["source"], real["root"], real["split"], size=size, cache_dir=cache_dir,
                         exclude=real.get("exclude", []))
    check_real_files_unchanged(real)  # unchanged before and after: load_images listed and decoded those files
    if real.get("count") and real["count"] < images.shape[0]:
        keep = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))[:real["count"]]
        images = images[keep.sort().values]
    return images


def check_real_files_unchanged(real: dict) -> None:
    """The CelebA split or folder lists the files whose fingerprint (paths, sizes, modification times) keys the
    real set's cached statistics, else a one-line DreamError: the features of another set are never cached
    under that key."""
    from dream.data import dataset_files, files_fingerprint

    try:
        files, _, _ = dataset_files(real["source"], Path(real["root"]), real["split"], exclude=real.get("exclude", []))
        unchanged = files_fingerprint(files) == real["files"]
    except DreamError:  # the folder, the split's list or one of its images gone
        unchanged = False
    if not unchanged:
        raise DreamError(f"{describe_real_set(real)} changed during the evaluation (images added, removed or "
                         f"rewritten since it was listed); no features were cached from it: run dream eval again "
                         f"(the samples made are kept)")


def training_folder(config: dict, checkpoint: str | Path | None) -> Path | None:
    """The folder `dream train` ran in, for a config that stores its folders relative to it (as runs did
    before they stored absolute paths): the run folder holding `checkpoint`, less the parts of the relative
    --run-dir. None when that cannot be told (an export, a moved run, an absolute or upward --run-dir)."""
    run_dir = config.get("run_dir")
    if not run_dir or checkpoint is None or Path(run_dir).is_absolute() or ".." in Path(run_dir).parts:
        return None
    parts = [part for part in Path(run_dir).parts if part != "."]
    run = Path(checkpoint).resolve().parent
    run = run.parent if run.name == "checkpoints" else run
    if parts and list(run.parts[-len(parts):]) != parts:
        return None
    return Path(*run.parts[:len(run.parts) - len(parts)])


def resolve_real_set(config: dict, source: str | None = None, root: str | None = None, split: str | None = None,
                     count: int | None = None, exclude=(), checkpoint: str | Path | None = None) -> dict:
    """The real set: the checkpoint's training data unless overridden. count: synthetic image count, or
    a cap on a CelebA/folder set (None: all of it). A CelebA/folder set's files are listed now and their
    fingerprint ("files") keys its cached statistics, so changed images are never scored from old features.
    A relative data root or run folder in the config is taken from where training ran (see training_folder)."""
    same = source is None or source == config.get("data")
    source = source or config.get("data", "synthetic")
    if source not in REAL_SOURCES:
        raise DreamError(f"unknown real-set source {source!r}; choose one of {REAL_SOURCES}")
    if count is not None and count < 2:
        raise DreamError(f"--real-count must be at least 2, got {count}")
    if source == "synthetic" and (root or split):
        flags = [flag for flag, value in (("--real-root", root), ("--real-split", split)) if value]
        whose = " (the checkpoint's training data)" if same and config.get("data") else ""
        raise DreamError(f"{' and '.join(flags)} {'name' if len(flags) > 1 else 'names'} a CelebA or folder real "
                         f"set, but the real set is the synthetic one{whose}: pass --real celeba or --real folder")
    if source == "folder" and split:
        raise DreamError(f"--real-split {split} names a CelebA split; the real set is a folder (all its images)")
    if source == "synthetic":
        default = config.get("data_count", 4096) if same else 4096
        return {"source": "synthetic", "root": None, "split": None, "count": count or default,
                "seed": config.get("seed", 0) if same else 0}
    base = training_folder(config, checkpoint)
    if not root and same and config.get("data_root"):
        root = Path(config["data_root"]).expanduser()
        if not root.is_absolute():
            if base is None:
                raise DreamError(f"the checkpoint's training data {source} {str(root)!r} is a relative path, and "
                                 f"where training ran cannot be told from {checkpoint}; pass --real-root PATH")
            root = base / root
    if not root:
        raise DreamError(f"the real set {source} needs --real-root")
    from dream.data import dataset_files, files_fingerprint

    split = split or (config.get("data_split", "train") if same else "train")
    root = Path(root).expanduser().resolve()
    # left out of a folder: the training run's own folder (as it was of the training data) and `exclude`
    # (the evaluation's output); a CelebA split lists its files
    run_dir = Path(config["run_dir"]).expanduser() if config.get("run_dir") else None
    if run_dir is not None and not run_dir.is_absolute():
        run_dir = base / run_dir if base is not None else None
    folders = [*([run_dir] if run_dir else []), *exclude] if source == "folder" else []
    exclude = [str(Path(folder).expanduser().resolve()) for folder in folders]
    exclude = [folder for folder in exclude if not root.is_relative_to(folder)]  # a sample set of the run, by name
    files, _, _ = dataset_files(source, root, split, exclude=exclude)
    return {"source": source, "root": str(root), "split": split if source == "celeba" else None, "count": count,
            "seed": None, "files": files_fingerprint(files), "exclude": exclude}


def real_cache_name(real: dict, size: int, weights_tag: str) -> str:
    """Keyed on the real set, the image size, the extractor's weights and how images are decoded (DECODE_VERSION
    and the decoders' releases) or, for the synthetic set, generated."""
    from dream.data import DECODE_VERSION, SYNTHETIC_VERSION, decoder_versions

    identity = {key: value for key, value in real.items() if key != "exclude"}  # the files' fingerprint covers it
    if real["source"] == "synthetic":
        identity["generator"] = SYNTHETIC_VERSION
    else:
        identity["decoders"] = decoder_versions()
    key = hashlib.sha1(json.dumps([identity, size, weights_tag, DECODE_VERSION], sort_keys=True).encode())
    key = key.hexdigest()[:16]
    return f"dream-real-{real['source']}-{size}px-{key}"


def describe_real_set(real: dict) -> str:
    if real["source"] == "synthetic":
        return f"the synthetic real set (seed {real['seed']})"
    if real["source"] == "celeba":
        return f"the real set CelebA {real['split']} under {real['root']}"
    return f"the real set {real['root']}"


def check_real_count(real: dict, count: int) -> None:
    if count < 2:
        raise DreamError(f"{describe_real_set(real)} has {count} image{'' if count == 1 else 's'}; FID and KID need "
                         f"at least 2 (add images, or choose another set with --real/--real-root)")


def real_features_cached(cache_root: Path, cache_name: str, extractor: str, metrics) -> bool:
    """Whether torch-fidelity (0.3, 0.4) takes the real set's features from its cache instead of reading the
    images. Its files are <cache name>-<extractor>-features-<layer>.pt, one per layer of the requested
    metrics, read as a group (any one missing: all recomputed), and <cache name>-<extractor>-stat-fid-<layer>.pt,
    which alone serves a FID-only run."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    layer = FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric
    prefix = f"{cache_name}-{extractor}"
    if set(metrics) == {"fid"} and (cache_root / f"{prefix}-stat-fid-{layer('fid')}.pt").is_file():
        return True
    return all((cache_root / f"{prefix}-features-{layer(m)}.pt").is_file() for m in metrics)


def discard_damaged_cache(cache_root: Path, cache_name: str) -> None:
    """Delete, with a one-line warning, the files of this real set's cache (torch-fidelity's
    <cache name>-*.pt, dream's <cache name>-count.json) that do not load or whose bytes changed: they are
    recomputed from the images."""
    damaged = []
    for path in sorted(cache_root.glob(f"{cache_name}-*")):
        try:
            if path.suffix == ".json":
                int(json.loads(path.read_text())["count"])
            else:  # torch.save's zip: a central directory (a cut-short file lacks it) and every entry's CRC-32
                with zipfile.ZipFile(path) as archive:
                    if not archive.namelist():
                        raise ValueError("empty archive")
                    for entry in archive.infolist():  # a changed pickle or tensor byte fails its CRC-32 ...
                        if entry.CRC != 0:  # ... unless torch.save recorded none (save.compute_crc32 off)
                            with archive.open(entry) as stream:
                                while stream.read(1 << 24):  # zipfile checks the CRC-32 at the end
                                    pass
        except Exception:  # noqa: BLE001  - truncated, garbled or empty: all mean "compute it again"
            damaged.append(path)
    if damaged:
        warnings.warn(f"deleting damaged cache files of the real set, to compute them again: "
                      f"{', '.join(str(p) for p in damaged)}", stacklevel=2)
        for path in damaged:
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# metrics
def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), by torch-fidelity (float64)."""
    import numpy as np

    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    stats = [{"mu": np.asarray(mu, dtype=np.float64), "sigma": np.asarray(sigma, dtype=np.float64)}
             for mu, sigma in ((mu1, sigma1), (mu2, sigma2))]
    return fid_statistics_to_metric(stats[0], stats[1], verbose=False)[KEY_METRIC_FID]


def fid_from_features(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """FID between two feature sets (N, D), through torch-fidelity's statistics (mean, unbiased covariance)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    s1, s2 = (fid_features_to_statistics(f.detach().double().cpu()) for f in (features1, features2))
    return frechet_distance(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"])


def _download_inception(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(INCEPTION_URL, str(target), progress=False)


def _check_extractor_loads(name: str, weights: Path | None = None) -> None:
    """Build torch-fidelity's extractor `name` once, from `weights` or else fetching its weights (if it has to)
    into torch's hub cache, so that a missing or wrong file stops `dream eval` before sampling, in one line."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    extractor = FEATURE_EXTRACTORS_REGISTRY[name]
    try:
        extractor(name, list(extractor.get_provided_features_list())[:1],
                  **({"feature_extractor_weights_path": str(weights)} if weights else {}))
    except Exception as error:  # noqa: BLE001  - no network, missing hub repo, HTTP error, a wrong file
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        if weights is None:
            raise DreamError(f"feature extractor {name!r} could not be loaded ({reason}); without a network, pass "
                             f"its weights file with --extractor-weights PATH") from None
        raise DreamError(f"{weights} is not {weights_file_name(name)} ({reason[:300]})"
                         + ("; delete it to download it again, or pass --inception-weights PATH"
                            if weights == hub_inception_file() else "")) from None


def weights_file_name(name: str) -> str:
    return (f"torch-fidelity's Inception weights file {INCEPTION_FILE}" if name == INCEPTION
            else f"the weights file of feature extractor {name!r}")


def hub_inception_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


# torch-fidelity reads these extractors' weights files with full unpickling: a given file must first load as
# plain tensors (weights_only=True), so that it cannot run code
PICKLED_WEIGHTS = (INCEPTION, "vgg16")


def resolve_feature_extractor(name: str, weights: str | None) -> tuple[str | None, str]:
    """(weights path or None, tag for cache names), checked before any sampling by building the extractor:
    from the given file, else (Inception) torch's hub cache or a download, else (others) torch-fidelity's own
    fetch; failing that, one line saying what to provide."""
    fidelity = import_fidelity()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise DreamError(f"unknown feature extractor {name!r}; torch-fidelity knows "
                         f"{sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    hub_file = hub_inception_file()
    if weights:
        flag = "--inception-weights" if name == INCEPTION else "--extractor-weights"
        path = Path(weights).expanduser()
        if path.is_dir():
            raise DreamError(f"{flag} {path} is a folder, not a file; pass {weights_file_name(name)}")
        if not path.is_file():
            raise DreamError(f"{flag} {path}: no such file (expected {weights_file_name(name)})")
    elif name != INCEPTION:
        _check_extractor_loads(name)
        return None, f"{name}-{fidelity.__version__}"
    elif hub_file.is_file():
        path = hub_file
    else:
        try:
            _download_inception(hub_file)
        except Exception as error:  # noqa: BLE001  - no network, proxy, HTTP error: all mean "provide the file"
            reason = (str(error).strip().splitlines() or [""])[0]
            raise DreamError(f"FID/IS/KID need the Inception weights {INCEPTION_FILE}, which could not be downloaded "
                             f"({type(error).__name__}: {reason}); fetch {INCEPTION_URL} elsewhere and pass "
                             f"--inception-weights PATH (or copy it to {hub_file})") from None
        path = hub_file
    if name in PICKLED_WEIGHTS:
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001
            # (torch's first line for a pickled object is its advice on loading the file anyway, with terminal codes)
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
            why = (f"it holds a pickled {found.group(1)}, which loading could run as code" if found else
                   f"torch.load weights_only=True: {type(error).__name__}: "
                   f"{(str(error).splitlines() or [''])[0][:200]}")
            raise DreamError(f"{path} is not {weights_file_name(name)}: it does not load as plain tensors ({why})") \
                from None
    _check_extractor_loads(name, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    if name == INCEPTION and not digest.startswith(INCEPTION_SHA256_PREFIX):  # other weights: FIDs not comparable
        raise DreamError(f"{path} is not {weights_file_name(name)}: its SHA-256 starts with {digest[:8]}, not "
                         f"{INCEPTION_SHA256_PREFIX} (other Inception weights give FIDs not comparable with "
                         f"published ones)" + ("; delete it to download it again, or pass --inception-weights PATH"
                                               if path == hub_file else ""))
    return str(path.resolve()), f"{name}-{digest}"


def check_metrics(metrics) -> None:
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown or not metrics:
        raise DreamError(f"{'unknown metrics ' + ', '.join(unknown) if unknown else '--metrics names none'}; "
                         f"choose one or more of {', '.join(METRICS)}")


def compute_metrics(generated, real, metrics=METRICS, device="cpu", feature_extractor: str = INCEPTION,
                    weights: str | None = None, real_cache_name: str | None = None, cache_dir=None,
                    batch_size: int = 64, kid_subset_size: int = 1000, kid_subsets: int = 100, isc_splits: int = 10,
                    real_count: int | None = None, verbose: bool = False) -> dict:
    """torch-fidelity over two datasets of uint8 (3, H, W) images (generated = input1, real = input2).
    Returns {"fid", "isc_mean", "isc_std", "kid_mean", "kid_std"} for the requested metrics, plus "raw" and
    "settings" (those the requested metrics' numbers depend on, as used: KID's subsets, their size at most
    either set's count; IS's splits, of ISC_MIN_SPLIT images at least)."""
    import_fidelity()
    from torch_fidelity import calculate_metrics

    check_metrics(metrics)
    n_generated = len(generated)
    binary = "fid" in metrics or "kid" in metrics
    n_real = (real_count or len(real)) if binary else None
    used = dict(isc_splits=max(1, min(isc_splits, n_generated // ISC_MIN_SPLIT)), kid_subsets=kid_subsets,
                kid_subset_size=min(kid_subset_size, n_generated, n_real or n_generated))
    kwargs = dict(
        input1=generated, cuda=torch.device(device).type == "cuda", batch_size=batch_size,
        isc="isc" in metrics, fid="fid" in metrics, kid="kid" in metrics,
        feature_extractor=feature_extractor, feature_extractor_weights_path=weights,
        **used, save_cpu_ram=n_generated + (n_real or 0) < 4096, verbose=verbose,
        cache=True, cache_root=str(Path(cache_dir)) if cache_dir else None)
    if binary:
        kwargs.update(input2=real, input2_cache_name=real_cache_name)
    raw = calculate_metrics(**kwargs)
    names = {"frechet_inception_distance": "fid", "inception_score_mean": "isc_mean",
             "inception_score_std": "isc_std", "kernel_inception_distance_mean": "kid_mean",
             "kernel_inception_distance_std": "kid_std"}
    result = {names[k]: float(v) for k, v in raw.items() if k in names}
    result["raw"] = {k: float(v) for k, v in raw.items()}
    result["settings"] = {k: v for k, v in used.items() if k.split("_")[0] in metrics}
    return result


# ----------------------------------------------------------------------------------------------
# the command
def default_out_dir(checkpoint_path: str, sampler: str, steps: int, eta: float, seed: int, dtype,
                    batch_size: int, use_ema: bool = True) -> Path:
    """<run>/eval/<tag> for a run's checkpoints/<file>; <folder>/eval/<tag> beside any other file (an export).
    The tag names everything the images depend on: sampler, steps, eta, seed, batch size, weights, precision."""
    path = Path(checkpoint_path)
    tag = (f"{path.stem}-{sampler}{steps}-eta{eta:g}-seed{seed}-b{batch_size}" + ("" if use_ema else "-raw")
           + ("-bf16" if dtype == torch.bfloat16 else ""))
    home = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return home / "eval" / tag


def _atomic_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def prepare_real_set(state: dict, size: int, out_dir: Path, real: str | None, real_root: str | None,
                     real_split: str | None, real_count: int | None, cache_root: Path, weights_tag: str,
                     feature_extractor: str, metrics) -> tuple[dict, str, RealImages, int]:
    """The real set FID and KID compare with (by default the checkpoint's training data), the name of its cached
    statistics, its images (loaded when first used) and their count. Unless its features are cached, it is loaded
    now and checked to hold at least 2 images: a bad real set fails before any sampling."""
    real_set = resolve_real_set(state["config"], real, real_root, real_split, real_count, exclude=[out_dir],
                                checkpoint=state["_path"])
    cache_name = real_cache_name(real_set, size, weights_tag)
    real_images = RealImages(real_set, size)
    count_file = cache_root / f"{cache_name}-count.json"
    discard_damaged_cache(cache_root, cache_name)
    known_real_count = json.loads(count_file.read_text())["count"] if count_file.exists() else None
    if known_real_count is None or not real_features_cached(cache_root, cache_name, feature_extractor, metrics):
        known_real_count = len(real_images)  # loads it
        check_real_count(real_set, known_real_count)
        real_images._images = None  # not held through sampling (CelebA: 2 GB); read again from its cache
        _atomic_json(count_file, {"count": known_real_count})
    return real_set, cache_name, real_images, known_real_count


def evaluate(checkpoint: str, out: str | None = None, count: int = 50_000, sampler: str = "ddim",
             steps: int | None = None, eta: float = 0.0, batch_size: int = 256, seed: int = 0, device="auto",
             backend: str = "auto",
             dtype: torch.dtype = torch.float32, graphs: bool | None = None, steps_per_graph: int = 1,
             compile: bool = False, channels_last: bool | None = None, use_ema: bool = True, metrics=METRICS,
             real: str | None = None,
             real_root: str | None = None, real_split: str | None = None, real_count: int | None = None,
             inception_weights: str | None = None, feature_extractor: str = INCEPTION, kid_subset_size: int = 1000,
             kid_subsets: int = 100, isc_splits: int = 10, metrics_batch_size: int = 64, cache_dir=None,
             progress: bool = True, dist: Distributed | None = None) -> dict | None:
    """Sample `count` images from `checkpoint` and score them; returns the report (also written as JSON).

    Under torchrun (`dist`) the ranks share the sampling out (see sample_images); rank 0 alone prepares the real
    set, computes the metrics (the others leave the process group first and return None) and writes the report."""
    from dream.data import default_cache_dir
    from dream.train import resolve_backend, resolve_device

    dist = dist or Distributed()
    with agreed_setup(dist):  # a rank-0 failure (the real set, the caches) stops every rank, and is said once
        if count < 2:
            raise DreamError(f"--count must be at least 2 for FID/IS/KID, got {count}")
        for flag, value, least in (("--kid-subset-size", kid_subset_size, 2), ("kid_subsets", kid_subsets, 1),
                                   ("isc_splits", isc_splits, 1), ("--metrics-batch-size", metrics_batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DreamError(f"{flag} must be an integer of at least {least}, got {value!r}")
        metrics = tuple(metrics)
        check_metrics(metrics)
        check_seed(seed)
        check_counts(count, batch_size, steps_per_graph)
        if out and Path(out).exists() and not Path(out).is_dir():
            raise DreamError(f"--out {out} is a file; it must be a folder (new or holding an earlier evaluation)")
        if out:
            check_out_dir(out)
        cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "fidelity"
        problem = dist.is_main and folder_problem(cache_root)  # made and written into now, not after hours of sampling
        if problem:
            what = f"--cache-dir {cache_dir}" if cache_dir else "the statistics cache"
            raise DreamError(f"{what}: {problem}; pass another --cache-dir")
        device = resolve_device(device, dist) if isinstance(device, str) else torch.device(device)
        if graphs and device.type != "cuda":
            raise DreamError(f"CUDA graphs need a CUDA device; sampling runs on {device}")
        require_checkpoint(checkpoint)  # the cheap checks first, then the feature extractor's weights, before sampling
        weights = weights_tag = None
        if dist.is_main:
            weights, weights_tag = resolve_feature_extractor(feature_extractor, inception_weights)
        model, diffusion, state, identity = load_sampler_model(checkpoint, device, use_ema,
                                                               resolve_backend(backend, device), compile, dtype,
                                                               channels_last)
        size = getattr(model, "_orig_mod", model).config.image_size
        _, steps_run, eta_run = checked_sampler(diffusion, sampler, steps, eta)  # (ddpm: eta 0 or 1 both run as 1)
        out_dir = Path(out) if out else default_out_dir(state["_path"], sampler, steps_run, eta_run, seed, dtype,
                                                        batch_size, use_ema)
        real_set = cache_name = real_images = known_real_count = None  # IS alone scores the samples by themselves
        if dist.is_main and ("fid" in metrics or "kid" in metrics):
            real_set, cache_name, real_images, known_real_count = prepare_real_set(
                state, size, out_dir, real, real_root, real_split, real_count, cache_root, weights_tag,
                feature_extractor, metrics)
    out_dir = dist.share(out_dir)  # (rank 0's: sample_images checks that every rank loaded the same weights)
    samples_dir = out_dir / "samples"

    start = time.perf_counter()
    sampling = sample_images(model, diffusion, count, samples_dir, sampler, steps, eta, batch_size, seed, dtype,
                             progress, graphs=graphs, steps_per_graph=steps_per_graph, settings=identity, dist=dist)
    sampling_seconds = time.perf_counter() - start
    del model
    dist.leave()  # the metrics are rank 0's alone
    if not dist.is_main:
        return None
    # torch-fidelity moves its extractor and batches with a bare .cuda(): the current device is made ours
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if device.type == "cuda":
            torch.cuda.empty_cache()
        start = time.perf_counter()
        samples = PngImages([image_path(samples_dir, i) for i in range(count)], size)
        samples.check()
        try:
            scores = compute_metrics(samples, real_images, metrics, device, feature_extractor, weights, cache_name,
                                     cache_root, metrics_batch_size, kid_subset_size, kid_subsets, isc_splits,
                                     known_real_count, progress)
        except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
            if not out_of_memory(error):
                raise
            raise DreamError(f"out of memory computing the metrics in batches of {metrics_batch_size} images on "
                             f"{device}: pass a smaller --metrics-batch-size (the {count} samples in {samples_dir} "
                             f"are kept, and a rerun scores them without sampling again)") from None
        metrics_seconds = time.perf_counter() - start

    import torch_fidelity

    from dream.checkpoint import code_version

    report = {
        "checkpoint": state["_path"], "step": state.get("step"), "ema": identity["ema"],
        "count": count, "made": sampling["made"], "sampler": sampling["sampler"], "steps": sampling["steps"],
        "eta": sampling["eta"], "seed": seed, "batch_size": batch_size, "dtype": sampling["dtype"],
        "graphs": sampling["graphs"], "processes": sampling["processes"], "backend": resolve_backend(backend, device),
        "compile": compile,
        "image_size": size, "samples_dir": str(samples_dir),
        "real": {**real_set, "images": known_real_count, "cache_name": cache_name} if real_set else None,
        "feature_extractor": feature_extractor, "feature_extractor_weights": weights,
        "metrics": {k: v for k, v in scores.items() if k not in ("raw", "settings")},
        "torch_fidelity_metrics": scores["raw"], "metric_settings": scores["settings"],
        "seconds": {"sampling": sampling_seconds, "metrics": metrics_seconds},
        "torch_fidelity_version": torch_fidelity.__version__, "code_version": code_version(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    report["report"] = str(report_path(out_dir, report))
    _atomic_json(Path(report["report"]), report)
    return report


def scoring(report: dict) -> dict:
    """What a report's numbers were scored against: the real set, the metrics and their settings, the feature
    extractor."""
    real = report.get("real")
    return {"real": real and {k: v for k, v in real.items() if k != "images"}, "metrics": sorted(report["metrics"]),
            "metric_settings": report.get("metric_settings", {}),
            "feature_extractor": report.get("feature_extractor"),
            "feature_extractor_weights": report.get("feature_extractor_weights")}


def report_path(out_dir: Path, report: dict) -> Path:
    """out_dir/report-n<count>.json, replaced only by a new scoring of the same kind; a report scored against
    another real set, other metrics or metric settings, or another extractor is kept, and this one is named
    report-n<count>-2.json (-3, ...)."""
    k = 1
    while True:
        path = out_dir / (f"report-n{report['count']}" + (f"-{k}" if k > 1 else "") + ".json")
        try:
            earlier = json.loads(path.read_text())
            same = scoring(earlier) == scoring(report)
        except FileNotFoundError:
            return path
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            same = False  # unreadable: not ours to replace
        if same:
            return path
        k += 1


def format_report(report: dict) -> str:
    m = report["metrics"]
    parts = []
    if "fid" in m:
        parts.append(f"FID {m['fid']:.3f}")
    if "isc_mean" in m:
        parts.append(f"IS {m['isc_mean']:.3f} ± {m['isc_std']:.3f}")
    if "kid_mean" in m:
        parts.append(f"KID {m['kid_mean']:.5f} ± {m['kid_std']:.5f}")
    ddim = f" {report['steps']} steps, eta {report['eta']:g}" if report["sampler"] == "ddim" else ""
    sampler = report["sampler"] + ddim
    return (f"{', '.join(parts)} on {report['count']} samples ({sampler}, seed {report['seed']}, "
            f"step {report['step']}); report {report['report']}")


# ----------------------------------------------------------------------------------------------
# CLI
def add_eval_arguments(p) -> None:
    add_sampling_arguments(p, count=50_000, batch_size=256, backend="auto",
                           backends=["auto", "eager", "sdpa", "triton"],
                           count_help="number of samples (5000 to compare with the seed)")
    p.add_argument("--out", help="folder for samples/ and report-n<count>.json "
                                 "(default: <run>/eval/<checkpoint>-<sampler><steps>-eta<eta>-seed<seed>-b<batch>"
                                 "[-raw][-bf16])")
    p.add_argument("--metrics", default="fid,isc,kid", help="comma-separated subset of fid,isc,kid")
    p.add_argument("--real", choices=list(REAL_SOURCES), help="real set (default: the checkpoint's training data)")
    p.add_argument("--real-root", help="CelebA root (the folder holding 'celeba') or an image folder")
    p.add_argument("--real-split", help="CelebA split: train, valid, test or all (default: the training split)")
    p.add_argument("--real-count", type=int, help="synthetic image count, or a cap on the CelebA/folder images")
    p.add_argument("--inception-weights", "--extractor-weights", dest="inception_weights",
                   help=f"the feature extractor's weights file (Inception: {INCEPTION_FILE}; offline use)")
    p.add_argument("--feature-extractor", default=INCEPTION, help="torch-fidelity feature extractor name")
    p.add_argument("--kid-subset-size", type=int, default=1000,
                   help="KID subset size (capped at the sample and real counts)")
    p.add_argument("--metrics-batch-size", type=int, default=64, help="images per feature-extractor batch")
    p.add_argument("--cache-dir", help="torch-fidelity cache (default: <dream cache>/fidelity)")


def run_eval_command(args) -> int:
    from dream.distributed import SAMPLING_TIMEOUT, session

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    with session(args.device, SAMPLING_TIMEOUT) as dist:  # under torchrun: the sampling shared over the processes
        report = evaluate(args.checkpoint, out=args.out, count=args.count, sampler=args.sampler, steps=args.steps,
                          eta=args.eta, batch_size=args.batch_size, seed=args.seed, device=args.device,
                          backend=args.backend, dtype=torch.bfloat16 if args.bf16 else torch.float32,
                          graphs=parse_graphs(args.graphs), steps_per_graph=args.steps_per_graph,
                          compile=args.compile, channels_last=args.channels_last, use_ema=not args.no_ema,
                          metrics=metrics, real=args.real, real_root=args.real_root, real_split=args.real_split,
                          real_count=args.real_count, inception_weights=args.inception_weights,
                          feature_extractor=args.feature_extractor, kid_subset_size=args.kid_subset_size,
                          metrics_batch_size=args.metrics_batch_size, cache_dir=args.cache_dir,
                          progress=not args.no_progress, dist=dist)
    if report is not None:
        print(format_report(report))
    return 0
