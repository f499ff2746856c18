"""Crash-safe checkpoints.

Each checkpoint is one file `ckpt-<step>.pt` written atomically (temp file in the same folder, fsync,
rename, fsync of the folder), then recorded in `manifest.json` with its size and SHA-256; the manifest is
written the same way, and only then are the files it no longer lists deleted. So a kill at any moment
leaves a manifest whose every entry is a complete file. A step saved again (the step that ends an epoch, once
the epoch has advanced) replaces its file in place: while the new file is written, the step's entry accepts
either file, so the intact old one is never unlisted. Loading verifies size and checksum and falls
back, with a warning, to the newest earlier checkpoint that verifies (torch.load alone does not notice
a flipped bit in tensor data). Files are read with `torch.load(weights_only=True)`, so a checkpoint can
hold only tensors and plain Python data and can never run code.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import random
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch

from dream.errors import DreamError
from dream.files import atomic_write_bytes, folder_problem

MANIFEST = "manifest.json"


def torch_saved_bytes(obj) -> bytes:
    """What torch.save writes for obj."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state_dict (names, dtypes, shapes and values, in name order): the same weights
    give the same digest whichever file (checkpoint or export) they came from."""
    return tensors_sha256(module.state_dict())


def tensors_sha256(tensors: dict) -> str:
    """SHA-256 over named tensors: names, dtypes, shapes and values, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# random number generator states, in weights_only-loadable form
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The package version plus the git commit, when the code runs from a checkout."""
    from dream import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


# ----------------------------------------------------------------------------------------------
class CheckpointManager:
    """ckpt-<step>.pt files plus a manifest in `folder`; keeps the newest `keep` of them."""

    def __init__(self, folder: str | Path, keep: int = 3):
        self.folder = Path(folder)
        self.keep = max(1, keep)

    def _manifest(self) -> list[dict]:
        """The manifest's entries, oldest first. Without a readable manifest, the folder's ckpt-*.pt files
        (with a warning, and no checksums to verify): they are never taken for an empty folder, whose
        next save would delete them."""
        path = self.folder / MANIFEST
        scanned = sorted(p for p in self.folder.glob("ckpt-*.pt") if p.stem[len("ckpt-"):].isdigit())
        try:
            return json.loads(path.read_text())["checkpoints"]
        except FileNotFoundError:
            why = "missing"
        except (ValueError, KeyError, TypeError):
            why = "unreadable"
        if scanned:
            warnings.warn(f"checkpoint manifest {path} is {why}; scanning the folder instead", stacklevel=2)
        return [{"file": p.name, "step": int(p.stem.split("-")[1]), "sha256": None} for p in scanned]

    def _write_manifest(self, entries: list[dict]) -> None:
        atomic_write_bytes(self.folder / MANIFEST, json.dumps({"checkpoints": entries}, indent=1).encode())

    def save(self, state: dict, step: int) -> Path:
        """Write ckpt-<step>.pt, then the manifest that lists it, then delete what the manifest dropped.

        A kill at any moment leaves a manifest whose every entry matches its file, and the newest step saved
        before stays loadable, also when it is `step` itself being saved again. Entries after `step` belong
        to an abandoned future (a restore after divergence, a resume from an older checkpoint) and are
        replaced."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"ckpt-{step:09d}.pt"
        path = self.folder / name
        data = torch_saved_bytes(state)
        entry = {"file": name, "step": step, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        listed = self._manifest()
        entries = [e for e in listed if e.get("step", -1) < step]
        if len(entries) != len(listed):
            # Unlisted before the file is written, so that no entry ever names a changed file: the abandoned
            # future (later steps) and a damaged file of this step. This step's intact file stays listed as the
            # entry's alternative ("or"): until the rename below it is the file there, and it loads.
            own = next((e for e in listed if e.get("file") == name), None)
            digest = sha256_file(path) if own is not None and path.exists() else None
            # (the file as it is: it may match its entry's own alternative, left by a save of this step that failed)
            intact = digest is not None and _damage(path, own, digest) is None
            alternative = [{**entry, "or": {"bytes": path.stat().st_size, "sha256": digest}}] if intact else []
            self._write_manifest(entries + alternative)
        atomic_write_bytes(path, data)
        entries.append(entry)
        entries = entries[-self.keep:]
        self._write_manifest(entries)
        self._remove_unlisted({e["file"] for e in entries})
        return self.folder / name

    def _remove_unlisted(self, listed: set[str]) -> None:
        """Delete checkpoints the manifest no longer lists and temp files left by killed writers."""
        for path in self.folder.glob("ckpt-*.pt"):
            if path.name not in listed:
                path.unlink(missing_ok=True)
        for path in self.folder.glob(".*.tmp*"):
            if not path.name.endswith(f".tmp{os.getpid()}"):
                path.unlink(missing_ok=True)

    def verify(self) -> list[tuple[Path, str | None]]:
        """(path, None) for every manifest entry whose file matches its size and checksum, else (path, why)."""
        results = []
        for entry in self._manifest():
            path = self.folder / entry["file"]
            results.append((path, _damage(path, entry)))
        return results

    def entry_for(self, path: str | Path) -> dict | None:
        path = Path(path)
        if path.parent.resolve() != self.folder.resolve():
            return None
        return next((e for e in self._manifest() if e["file"] == path.name), None)

    def latest(self, hint: str = "") -> dict | None:
        """The newest checkpoint whose size and checksum verify, loaded; None when the folder has none
        (or its manifest lists only files that are gone: see `listed`). A damaged newer one is skipped
        with a warning naming it. When checkpoint files are there but none loads, a DreamError: starting
        over would delete them at the first save, so nothing is touched; `hint` ends its message. So too when
        a file that matches its checksum does not load: going back past it would delete it at the next save."""
        entries = self._manifest()
        damaged = []
        for entry in reversed(entries):
            path = self.folder / entry["file"]
            why = _damage(path, entry)
            if why is None:
                try:
                    state = _load_file(path)
                except DreamError as error:  # (its message names the file: said once, below)
                    why = str(error).removeprefix(f"checkpoint {path} ").removeprefix(f"{path} ")
                    if not path.exists():  # deleted since it was checked (a run saving meanwhile)
                        why = "file missing"
                    elif entry.get("sha256"):  # intact as saved: not damage, and no reason to go back past it
                        raise DreamError(f"checkpoint {path} matches its manifest entry (size, SHA-256), so it is "
                                         f"intact, yet it does not load here ({why}): another version of dream or "
                                         f"torch may have written it, or memory ran out; none was deleted{hint}",
                                         same_on_every_rank=True) from None
            if why is not None:
                damaged.append(f"{path.name}: {why}")
                warnings.warn(f"checkpoint {path} is damaged ({why}); skipping it", stacklevel=2)
                continue
            state["_path"] = str(path)
            self._warn_unlisted_newer(entry.get("step", -1))
            return state
        if any((self.folder / entry["file"]).exists() for entry in entries):
            raise DreamError(f"no checkpoint in {self.folder} can be loaded ({'; '.join(damaged)}); none was "
                             f"deleted{hint}", same_on_every_rank=True)
        unlisted = sorted(path.name for path in self.folder.glob("ckpt-*.pt"))
        if not entries and unlisted:  # starting over would delete them at the first save
            where = (f"listed in its {MANIFEST}, which lists no checkpoint" if (self.folder / MANIFEST).exists() else
                     f"named ckpt-<step>.pt, and there is no {MANIFEST}")
            raise DreamError(f"{', '.join(unlisted)} in {self.folder} {'is' if len(unlisted) == 1 else 'are'} not "
                             f"{where}; none was deleted{hint}", same_on_every_rank=True)
        return None

    def _warn_unlisted_newer(self, step: int) -> None:
        """A checkpoint file newer than `step` that the manifest does not list was cut short before it was listed
        (a kill between writing it and the manifest): it is not used, and the next save deletes it. Said once."""
        listed = {entry["file"] for entry in self._manifest()}
        newer = sorted(path.name for path in self.folder.glob("ckpt-*.pt") if path.name not in listed
                       and path.stem.split("-")[-1].isdigit() and int(path.stem.split("-")[-1]) > step)
        if newer:
            warnings.warn(f"{', '.join(newer)} in {self.folder} {'is' if len(newer) == 1 else 'are'} not listed in "
                          f"{MANIFEST} (the save was stopped before it was listed): going on from step {step}",
                          stacklevel=3)

    def newest_step(self) -> int | None:
        """The step of the newest checkpoint the manifest lists whose file is there, or None."""
        steps = [entry.get("step", -1) for entry in self._manifest() if (self.folder / entry["file"]).exists()]
        return max(steps, default=None)

    def listed(self) -> int:
        """How many checkpoints the manifest lists (whether or not their files are still there)."""
        return len(self._manifest())


def _damage(path: Path, entry: dict, digest: str | None = None) -> str | None:
    """Why the file does not match its manifest entry (or the entry's alternative, "or", while a step is saved
    again), or None when it does. An entry without a checksum (a scanned folder) is matched by size alone.
    digest: the file's SHA-256 when the caller has it."""
    if not path.exists():
        return "file missing"
    size = path.stat().st_size
    versions = [version for version in (entry, entry.get("or")) if version]
    versions = [version for version in versions if version.get("bytes") is None or version["bytes"] == size]
    if not versions:
        alternative = f" or {entry['or']['bytes']}" if entry.get("or") else ""
        return f"{size} bytes, the manifest says {entry['bytes']}{alternative}"
    if all(version.get("sha256") for version in versions) and \
            (digest or sha256_file(path)) not in {version["sha256"] for version in versions}:
        return "SHA-256 checksum mismatch"
    return None


def require_checkpoint(path: str | Path, what: str = "checkpoint") -> Path:
    """The path, or a one-line DreamError naming it as `what` when nothing is there (before any slow setup
    that needs it)."""
    path = Path(path)
    if not path.exists():
        raise DreamError(f"{what} {path} does not exist")
    return path


def load_checkpoint(path: str | Path, map_location="cpu", hint: str = "") -> dict:
    """A checkpoint file (verified against its folder's manifest when it is listed there), or the
    newest valid checkpoint of a checkpoint folder or run folder (`hint`: see CheckpointManager.latest)."""
    path = require_checkpoint(path)
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path  # a run folder, or its checkpoints
        manager = CheckpointManager(folder)
        state = manager.latest(hint)
        if state is None:
            gone = manager.listed()
            raise DreamError(f"no valid checkpoint in folder {path}" + (
                f" (the {gone} listed in {folder / MANIFEST} are gone)" if gone else ""))
        return state
    entry = CheckpointManager(path.parent).entry_for(path)
    if entry is not None:
        why = _damage(path, entry)
        if why is not None:
            raise DreamError(f"checkpoint {path} is damaged ({why})")
    state = _load_file(path, map_location)
    state["_path"] = str(path)
    return state


def is_safetensors(path: str | Path) -> bool:
    """Named *.safetensors, or starting as safetensors files do: an 8-byte little-endian header length
    (under 100 MB), then a JSON object."""
    if Path(path).suffix.lower() == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:] == b"{" and 0 < int.from_bytes(head[:8], "little") < 10**8


def _load_file(path: Path, map_location="cpu") -> dict:
    if is_safetensors(path):
        raise DreamError(f"{path} is a safetensors export, not a training checkpoint")
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save's zip format
    except OSError as error:
        raise DreamError(f"checkpoint {path} cannot be read ({error.strerror or error})") from None
    if not zipped:
        raise DreamError(f"{path} is not a dream checkpoint or export (neither a PyTorch checkpoint nor safetensors)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:  # the weights-only unpickler stopped: a foreign object, or damage
        if "Unsupported global" in str(error):
            raise DreamError(f"{path} is not a dream checkpoint: it holds Python objects other than tensors and "
                             f"plain data, and is never loaded in a way that could run code") from None
        detail = " ".join(str(error).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].split())
        raise DreamError(f"checkpoint {path} cannot be read (damaged: {detail[:120]})") from None
    except Exception as error:  # noqa: BLE001  - a truncated or otherwise damaged file
        first = (str(error).splitlines() or [""])[0].split(". ")[0]  # torch's first sentence, not its advice
        raise DreamError(f"checkpoint {path} cannot be read ({type(error).__name__}: {first[:160]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise DreamError(f"{path} is not a dream checkpoint")
    return state


def check_model_state(state: dict) -> None:
    """A one-line DreamError unless `state` holds what sampling and export read: the weights ("model") and a
    config naming the model and the schedule (other projects' files often hold "model" and "config" too)."""
    config = state.get("config")
    if not (isinstance(state.get("model"), dict) and isinstance(config, dict) and isinstance(config.get("model"), dict)
            and {"schedule", "num_timesteps"} <= config.keys()):
        raise DreamError(f"{state['_path']} is not a dream checkpoint (no UNet weights and config in it)")


TRAINING_STATE = ("model", "ema", "optimizer", "scaler", "epoch", "batch_in_epoch", "step", "rng", "config")


def check_training_state(state: dict) -> None:
    """A one-line DreamError unless `state` is a dream training checkpoint that training can go on from (an
    export, or another project's file holding "model" and "config", is not)."""
    check_model_state(state)
    missing = [key for key in TRAINING_STATE if key not in state]
    if missing or not isinstance(state["config"].get("preset"), str):
        what = f"no {', '.join(missing)}" if missing else "no model preset in its config"
        raise DreamError(f"{state['_path']} is not a dream training checkpoint ({what}); training cannot go on "
                         f"from it")


def load_model_for_sampling(path: str | Path, device="cpu", use_ema: bool = True, backend: str = "eager",
                            autocast_dtype: torch.dtype | None = None):
    """(model in eval mode, diffusion, state) from a checkpoint file, a run folder or an exported
    .safetensors file; state["sampled_weights"] says which weights the model holds ("ema" or "model").
    autocast_dtype: the dtype it will run under, checked against the backend and device first."""
    from dream.diffusion import GaussianDiffusion
    from dream.model import UNet, UNetConfig, check_backend_device

    check_backend_device(backend, device, autocast_dtype)
    if Path(path).is_file() and is_safetensors(path):
        state = load_exported(path)
        if not use_ema and state["sampled_weights"] == "ema":
            raise DreamError(f"{path} holds the exported EMA weights only; the raw weights need the training "
                             f"checkpoint (or an export made with --weights model)")
        weights = state["model"]
    else:
        state = load_checkpoint(path)
        check_model_state(state)
        weights = dict(state["model"])
        state["sampled_weights"] = "model"
        if use_ema and state.get("ema") is not None:
            weights.update(state["ema"]["shadow"])
            state["sampled_weights"] = "ema"
    config = state["config"]
    try:
        model_config = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["model"].items()})
    except TypeError as error:  # a model setting this version does not know (a newer dream's, or none of ours)
        raise DreamError(f"the model config in {state['_path']} is not one this version of dream can build "
                         f"({(str(error).splitlines() or [''])[0]})") from None
    model = UNet(model_config, backend=backend)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:  # names missing, unexpected or mis-shaped tensors
        detail = " ".join(str(error).split("\n", 1)[-1].split())
        raise DreamError(f"the weights in {state['_path']} do not fit the model its config describes "
                         f"({detail[:200]}{'...' if len(detail) > 200 else ''})") from None
    diffusion = GaussianDiffusion(config["schedule"], config["num_timesteps"])
    return model.to(device).eval(), diffusion.to(device), state


# ----------------------------------------------------------------------------------------------
# Exported weights: one set of UNet weights as safetensors, with the run's config in the metadata
EXPORT_FORMAT = "dream-unet-1"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise DreamError("exported weights are safetensors files: pip install safetensors") from None
    return safetensors.torch


def export_weights(source: str | Path, out: str | Path, weights: str = "ema") -> dict:
    """Write the UNet weights of a checkpoint (file or run folder) to `out` as safetensors, atomically.
    weights: "ema" (the EMA shadow, what sampling uses) or "model" (the raw training weights). The
    metadata holds the run's config (so sample and eval rebuild the model and schedule), the step and
    the source checkpoint with its SHA-256. Returns a summary."""
    if weights not in ("ema", "model"):
        raise DreamError(f"--weights must be ema or model, got {weights!r}")
    out = Path(out)
    if out.suffix.lower() != ".safetensors":  # (".safetensors" alone is a name without a suffix)
        raise DreamError(f"--out must be a file name ending in .safetensors (such as ema.safetensors), got {out}")
    if out.is_dir():
        raise DreamError(f"--out {out} is a folder; it must be a .safetensors file")
    previous = None
    if out.exists():  # only an earlier export is replaced: anything else may be someone's only copy
        previous = _export_metadata(out)
        if previous is None:
            raise DreamError(f"--out {out} exists and is not a dream export; choose another --out (or delete it)")
    if Path(source).is_file() and is_safetensors(source):
        raise DreamError(f"{source} is an export already; exports are made from a training checkpoint or run folder")
    problem = folder_problem(out.parent)  # before loading the checkpoint
    if problem:
        raise DreamError(f"--out {out}: {problem}")
    state = load_checkpoint(source)
    check_model_state(state)
    tensors = dict(state["model"])
    if weights == "ema":
        if state.get("ema") is None:
            raise DreamError(f"checkpoint {state['_path']} has no EMA weights; use --weights model")
        tensors.update(state["ema"]["shadow"])
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    source_path = Path(state["_path"])
    metadata = {"format": EXPORT_FORMAT, "weights": weights, "config": json.dumps(state["config"]),
                "step": str(state.get("step")), "epoch": str(state.get("epoch")),
                "source": str(source_path.resolve()), "source_sha256": sha256_file(source_path),
                "code_version": str(state.get("code_version", "")), "tensors_sha256": tensors_sha256(tensors)}
    data = _safetensors().save(tensors, metadata=metadata)
    atomic_write_bytes(out, data)
    replaced = None if previous is None else {"weights": previous.get("weights"), "step": previous.get("step"),
                                              "source": previous.get("source")}
    return {"out": str(out), "replaced": replaced, "weights": weights, "step": state.get("step"),
            "tensors": len(tensors),
            "parameters": sum(t.numel() for t in tensors.values()), "bytes": len(data),
            "source": metadata["source"]}


def _export_metadata(path: Path) -> dict | None:
    """The metadata of a dream export at `path`, or None for any other file (read from the header only)."""
    if not path.is_file() or not is_safetensors(path):
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # noqa: BLE001  - not importable, truncated, foreign: not an export we can vouch for
        return None
    return metadata if metadata.get("format") == EXPORT_FORMAT else None


def load_exported(path: str | Path) -> dict:
    """A state dict like a checkpoint's ("model", "config", "step", "_path") from an exported file."""
    path = Path(path)
    if not path.is_file():
        raise DreamError(f"exported weights {path} do not exist")
    library = _safetensors()
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = library.load_file(str(path))
    except Exception as error:  # noqa: BLE001  - a truncated or foreign file
        raise DreamError(f"{path} cannot be read as safetensors ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if metadata.get("format") != EXPORT_FORMAT or "config" not in metadata:
        raise DreamError(f"{path} is not a dream export (no '{EXPORT_FORMAT}' metadata)")
    if "tensors_sha256" in metadata and tensors_sha256(tensors) != metadata["tensors_sha256"]:
        raise DreamError(f"{path} is damaged: its tensors do not match the SHA-256 recorded when it was exported; "
                         f"export it again from its checkpoint ({metadata.get('source', 'unknown')})")
    step = metadata.get("step")
    return {"model": tensors, "config": json.loads(metadata["config"]), "ema": None,
            "step": int(step) if step and step.isdigit() else None, "_path": str(path),
            "sampled_weights": metadata.get("weights", "ema"), "export": metadata}
