"""Crash-safe checkpoints.

Each checkpoint is one file `ckpt-<step>.pt` written atomically (temp file in the same folder, fsync,
rename, fsync of the folder) and recorded in `manifest.json` with its size and SHA-256; the manifest is
written the same way. Loading verifies the checksum and falls back, with a warning, to the newest
earlier checkpoint that verifies. Files are read with `torch.load(weights_only=True)`, so a checkpoint
can hold only tensors and plain Python data and can never run code.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch

from dream.errors import DreamError

MANIFEST = "manifest.json"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_torch_save(obj, path: Path) -> str:
    """Save atomically; returns the file's SHA-256."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


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


def code_version() -> str:
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
        path = self.folder / MANIFEST
        if not path.exists():
            return []
        try:
            entries = json.loads(path.read_text())["checkpoints"]
        except (ValueError, KeyError, TypeError):
            warnings.warn(f"checkpoint manifest {path} is unreadable; scanning the folder instead", stacklevel=2)
            return [{"file": p.name, "sha256": None} for p in sorted(self.folder.glob("ckpt-*.pt"))]
        return entries

    def _write_manifest(self, entries: list[dict]) -> None:
        atomic_write_bytes(self.folder / MANIFEST, json.dumps({"checkpoints": entries}, indent=1).encode())

    def save(self, state: dict, step: int) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"ckpt-{step:09d}.pt"
        digest = atomic_torch_save(state, self.folder / name)
        entries = [e for e in self._manifest() if e["file"] != name]
        entries.append({"file": name, "step": step, "sha256": digest})
        entries.sort(key=lambda e: e.get("step", 0))
        stale, entries = entries[:-self.keep], entries[-self.keep:]
        self._write_manifest(entries)
        for entry in stale:
            (self.folder / entry["file"]).unlink(missing_ok=True)
        return self.folder / name

    def latest(self) -> dict | None:
        """The newest checkpoint whose checksum verifies, loaded; None when there is none."""
        entries = self._manifest()
        for entry in reversed(entries):
            path = self.folder / entry["file"]
            try:
                if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
                    raise ValueError("checksum mismatch")
                state = load_checkpoint(path)
            except (OSError, ValueError, RuntimeError, DreamError) as error:
                warnings.warn(f"checkpoint {path} is damaged ({error}); trying the previous one", stacklevel=2)
                continue
            state["_path"] = str(path)
            return state
        if entries:
            warnings.warn(f"no checkpoint in {self.folder} could be loaded; starting from scratch", stacklevel=2)
        return None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise DreamError(f"checkpoint {path} does not exist")
    if path.is_dir():
        state = CheckpointManager(path).latest()
        if state is None:
            raise DreamError(f"no valid checkpoint in folder {path}")
        return state
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001  - any unpickling failure means a bad file
        raise DreamError(f"checkpoint {path} cannot be read ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise DreamError(f"{path} is not a dream checkpoint")
    return state


def load_model_for_sampling(path: str | Path, device="cpu", use_ema: bool = True, backend: str = "eager"):
    """(model in eval mode, diffusion, checkpoint state) from a checkpoint file or run folder."""
    from dream.diffusion import GaussianDiffusion
    from dream.model import UNet, UNetConfig

    state = load_checkpoint(path)
    config = state["config"]
    model_config = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["model"].items()})
    model = UNet(model_config, backend=backend)
    weights = dict(state["model"])
    if use_ema and state.get("ema") is not None:
        weights.update(state["ema"]["shadow"])
    model.load_state_dict(weights)
    diffusion = GaussianDiffusion(config["schedule"], config["num_timesteps"])
    return model.to(device).eval(), diffusion.to(device), state
