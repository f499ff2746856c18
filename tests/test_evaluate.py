"""`dream eval` (dream/evaluate.py): the Fréchet distance against closed forms, and the whole pipeline
(checkpoint -> EMA samples -> torch-fidelity FID/IS/KID against the real set, cached) on tiny data with a
small deterministic feature extractor registered through torch-fidelity's extension mechanism, so that
nothing is downloaded. The metric values are recomputed here from the extractor's features of the PNGs
and of the real images, with independent formulas."""
import hashlib
import json
import os
import re
import struct
import zipfile
from fractions import Fraction
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

torch_fidelity = pytest.importorskip("torch_fidelity")

from conftest import make_tiny_checkpoint  # noqa: E402
import dream.evaluate as evaluate_module  # noqa: E402
from dream.data import load_images  # noqa: E402
from dream.errors import DreamError  # noqa: E402
from dream.evaluate import (INCEPTION, INCEPTION_FILE, evaluate, fid_from_features, frechet_distance,  # noqa: E402
                            load_real_images, resolve_feature_extractor, resolve_real_set)
from dream.sample import image_path, sample_from_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# torch-fidelity computes FID from float64 statistics with an eigenvalue route; the closed forms here use
# a symmetric square root, so agreement is to float64 rounding amplified by the matrix square root.
FID_RTOL = {"closed_form": 1e-8, "pipeline": 1e-6}
IS_RTOL = 1e-9
KID_ATOL = 1e-9
SAMPLED_FID_ATOL = 0.08  # 200,000 draws in 3-D: the estimate of a population FID ~ 3-10

EXTRACTOR = "dream-test-random-conv"
INCEPTION_NAME = INCEPTION  # torch-fidelity's "inception-v3-compat"


class RandomConvFeatures(torch_fidelity.FeatureExtractorBase):
    """A small fixed random conv net on uint8 images: 'features' (12-d) for FID/KID, 'logits' (10) for IS."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(1234)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(12, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def all_features(self, x):
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3
        h = F.silu(self.conv1(x.float() / 127.5 - 1))
        h = torch.tanh(self.conv2(h))
        features = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1).double()
        return {"features": features, "logits": 4 * self.head(features.float()).double()}

    def forward(self, x):
        found = self.all_features(x)
        return tuple(found[name] for name in self.features_list)


def register_extractor(name: str, extractor: type) -> None:
    """Register with torch-fidelity once (the module may be imported again, e.g. by another test runner)."""
    if name not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(name, extractor)


register_extractor(EXTRACTOR, RandomConvFeatures)


# ----------------------------------------------------------------------------------------------
# Fréchet distance
def closed_form_fid(mu1, s1, mu2, s2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^(1/2) S2 S1^(1/2))^(1/2)), symmetric square roots by eigh."""
    def sqrt_psd(m):
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r1 = sqrt_psd(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrt_psd(r1 @ s2 @ r1)))


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + rng.uniform(0.1, 1.0) * np.eye(d)


@pytest.mark.parametrize("d", [1, 3, 17])
def test_frechet_distance_diagonal_closed_form(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=FID_RTOL["closed_form"])


@pytest.mark.parametrize("d", [2, 5, 33])
def test_frechet_distance_general_closed_form(d):
    rng = np.random.default_rng(100 + d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) * 2
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed_form_fid(mu1, s1, mu2, s2),
                                                               rel=FID_RTOL["closed_form"])
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)
    shift = rng.standard_normal(d)
    assert frechet_distance(mu1, s1, mu1 + shift, s1) == pytest.approx((shift ** 2).sum(), rel=1e-7)


def test_fid_of_samples_matches_sample_statistics_and_population():
    rng = np.random.default_rng(7)
    d, n = 3, 200_000
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d) * 2
    x = torch.from_numpy(rng.multivariate_normal(mu1, s1, n))
    y = torch.from_numpy(rng.multivariate_normal(mu2, s2, n))
    got = fid_from_features(x, y)
    xm, ym = x.mean(0), y.mean(0)
    sx, sy = (x - xm).T @ (x - xm) / (n - 1), (y - ym).T @ (y - ym) / (n - 1)
    assert got == pytest.approx(closed_form_fid(xm.numpy(), sx.numpy(), ym.numpy(), sy.numpy()),
                                rel=FID_RTOL["closed_form"])
    population = closed_form_fid(mu1, s1, mu2, s2)
    assert population > 1
    assert got == pytest.approx(population, abs=SAMPLED_FID_ATOL)


def test_metric_settings_are_capped_by_the_sets_and_the_scores_stay_finite(tmp_path):
    """IS's splits hold 2 images at least (one image's IS is exactly 1, an empty split's NaN); KID's subsets at most
    the smaller set (torch-fidelity refuses larger ones): 6 samples and 4 real images with the defaults (10 splits,
    1000)."""
    from dream.evaluate import UInt8Images, compute_metrics

    generated = UInt8Images(load_images("synthetic", size=16, count=6, seed=1))
    real = UInt8Images(load_images("synthetic", size=16, count=4, seed=2))
    result = compute_metrics(generated, real, ("isc", "kid"), feature_extractor=EXTRACTOR, kid_subsets=2,
                             cache_dir=tmp_path / "fidelity")
    assert result["settings"] == {"isc_splits": 3, "kid_subsets": 2, "kid_subset_size": 4}
    assert all(np.isfinite(result[key]) for key in ("isc_mean", "isc_std", "kid_mean", "kid_std"))
    assert result["isc_mean"] > 1 and result["isc_std"] > 0  # splits of one image: 1 ± 0 whatever the images


# ----------------------------------------------------------------------------------------------
# the pipeline
def make_checkpoint(tmp_path):
    return make_tiny_checkpoint(tmp_path, step=9, data_count=12, seed=5)


def read_png(path):
    from torchvision.io import ImageReadMode, read_image

    return read_image(str(path), ImageReadMode.RGB)


def independent_metrics(generated: torch.Tensor, real: torch.Tensor) -> dict:
    extractor = RandomConvFeatures(EXTRACTOR, ["features", "logits"]).eval()
    with torch.no_grad():
        fg, fr = extractor.all_features(generated), extractor.all_features(real)
    x, y = fg["features"].numpy(), fr["features"].numpy()
    fid = closed_form_fid(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    p = torch.softmax(fg["logits"], dim=1).numpy()
    isc = float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), axis=1))))
    m, d = len(x), x.shape[1]
    kernel = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    kid = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    return {"fid": fid, "isc_mean": isc, "kid_mean": float(kid)}


def test_eval_pipeline_tiny(tmp_path, monkeypatch):
    checkpoint = make_checkpoint(tmp_path)
    count = 12  # = the checkpoint's synthetic training set: KID subsets are then the whole sets
    settings = dict(count=count, sampler="ddim", steps=2, eta=0.3, batch_size=5, seed=4, device="cpu",
                    feature_extractor=EXTRACTOR, cache_dir=tmp_path / "fidelity", isc_splits=1, kid_subsets=3,
                    progress=False)
    report = evaluate(str(checkpoint), out=str(tmp_path / "eval"), **settings)

    saved = json.loads((tmp_path / "eval" / f"report-n{count}.json").read_text())
    assert saved == json.loads(json.dumps(report))
    for key, value in {"count": count, "made": count, "sampler": "ddim", "steps": 2, "eta": 0.3, "seed": 4,
                       "step": 9, "ema": True, "graphs": False, "checkpoint": str(checkpoint.resolve())}.items():
        assert report[key] == value, key
    assert report["real"]["source"] == "synthetic" and report["real"]["images"] == 12
    # as used: KID's subset size (default 1000) at most the 12 images of either set
    assert report["metric_settings"] == {"isc_splits": 1, "kid_subsets": 3, "kid_subset_size": 12}

    generated = torch.stack([read_png(image_path(tmp_path / "eval" / "samples", i)) for i in range(count)])
    real = load_images("synthetic", size=16, count=12, seed=5)  # the checkpoint's training data
    expected = independent_metrics(generated, real)
    metrics = report["metrics"]
    assert metrics["fid"] > 0 and metrics["fid"] == pytest.approx(expected["fid"], rel=FID_RTOL["pipeline"])
    assert metrics["isc_mean"] == pytest.approx(expected["isc_mean"], rel=IS_RTOL) and metrics["isc_std"] == 0
    assert metrics["kid_mean"] == pytest.approx(expected["kid_mean"], abs=KID_ATOL) and metrics["kid_std"] < 1e-12

    # the samples are the EMA model's
    ema = sample_from_checkpoint(str(checkpoint), str(tmp_path / "ema"), count=5, sampler="ddim", steps=2, eta=0.3,
                                 batch_size=5, seed=4, grid=False, progress=False)
    raw = sample_from_checkpoint(str(checkpoint), str(tmp_path / "raw"), count=5, sampler="ddim", steps=2, eta=0.3,
                                 batch_size=5, seed=4, grid=False, progress=False, use_ema=False)
    assert ema["made"] == raw["made"] == 5
    assert all(torch.equal(read_png(image_path(tmp_path / "ema", i)), generated[i]) for i in range(5))
    assert not all(torch.equal(read_png(image_path(tmp_path / "raw", i)), generated[i]) for i in range(5))

    # rerun: samples and real-set features come from disk; the real set is not loaded again
    def no_loading(*args, **kwargs):
        raise AssertionError("the real set was loaded although its features are cached")

    monkeypatch.setattr(evaluate_module, "load_images", no_loading)
    again = evaluate(str(checkpoint), out=str(tmp_path / "eval"), **settings)
    assert again["made"] == 0 and again["metrics"] == pytest.approx(report["metrics"], rel=1e-12)
    assert any(p.name.startswith(report["real"]["cache_name"]) for p in (tmp_path / "fidelity").iterdir())

    with pytest.raises(DreamError, match="eta"):  # different settings into the same sample folder
        evaluate(str(checkpoint), out=str(tmp_path / "eval"), **{**settings, "eta": 0.0})


def test_eval_cli_only_fid(tmp_path, capsys, monkeypatch):
    from dream.cli import main

    checkpoint = make_checkpoint(tmp_path)
    command = ["eval", str(checkpoint), "--out", str(tmp_path / "eval"), "--count", "6", "--steps", "1",
               "--batch-size", "3", "--device", "cpu", "--metrics", "fid", "--real-count", "8",
               "--feature-extractor", EXTRACTOR, "--cache-dir", str(tmp_path / "fidelity"), "--no-progress"]
    assert main(command) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("FID ") and "on 6 samples" in line and "IS" not in line
    report = json.loads((tmp_path / "eval" / "report-n6.json").read_text())
    assert set(report["metrics"]) == {"fid"} and report["real"]["count"] == 8 and report["real"]["images"] == 8

    # a rerun takes the real set's FID statistics from the cache: the real set is not loaded up front
    (tmp_path / "fidelity" / f"{report['real']['cache_name']}-{EXTRACTOR}-features-features.pt").unlink()
    monkeypatch.setattr(evaluate_module, "load_images", lambda *a, **k: pytest.fail("the real set was loaded"))
    assert main(command) == 0 and capsys.readouterr().out.strip() == line


def test_inception_score_alone_needs_no_real_set(tmp_path, monkeypatch):
    """IS scores the samples by themselves: a real set that cannot be read is not looked at."""
    checkpoint = make_checkpoint(tmp_path)
    monkeypatch.setattr(evaluate_module, "load_images", lambda *a, **k: pytest.fail("the real set was loaded"))
    report = evaluate(str(checkpoint), out=str(tmp_path / "eval"), count=4, steps=1, batch_size=4, device="cpu",
                      metrics=("isc",), real="folder", real_root=str(tmp_path / "gone"),
                      feature_extractor=EXTRACTOR, cache_dir=tmp_path / "fidelity", isc_splits=1, progress=False)
    assert set(report["metrics"]) == {"isc_mean", "isc_std"} and report["real"] is None
    assert report["metric_settings"] == {"isc_splits": 1}  # what IS's numbers depend on (KID's: not asked for)
    assert not list((tmp_path / "fidelity").glob("*-count.json"))


def test_a_damaged_sample_is_one_line_before_scoring(tmp_path, capsys, monkeypatch):
    """Every sample is decoded before torch-fidelity runs: a damaged one raised in one of its loader workers (sets
    of 4096 images and more) would be a traceback, and the real set's features could be computed for nothing."""
    from dream.cli import main

    checkpoint = make_checkpoint(tmp_path)
    command = ["eval", str(checkpoint), "--out", str(tmp_path / "eval"), "--count", "4", "--steps", "1",
               "--batch-size", "4", "--device", "cpu", "--metrics", "isc", "--feature-extractor", EXTRACTOR,
               "--cache-dir", str(tmp_path / "fidelity"), "--no-progress"]
    assert main(command) == 0
    capsys.readouterr()
    png = image_path(tmp_path / "eval" / "samples", 2)
    data = bytearray(png.read_bytes())
    data[60:len(data) - 40] = bytes(len(data) - 100)  # still ends with IEND: not remade
    png.write_bytes(data)
    scored, compute_metrics = [], evaluate_module.compute_metrics
    monkeypatch.setattr(evaluate_module, "compute_metrics",
                        lambda *args, **kwargs: scored.append(args) or compute_metrics(*args, **kwargs))
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{png} cannot be read as an image" in err, err
    assert scored == []


class OutOfMemoryFeatures(RandomConvFeatures):
    """An extractor whose batches do not fit in the device's (or the host's) memory."""
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def all_features(self, x):
        raise self.error


OUT_OF_MEMORY = "dream-test-out-of-memory"
register_extractor(OUT_OF_MEMORY, OutOfMemoryFeatures)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   MemoryError()], ids=["cuda", "host"])
def test_out_of_memory_while_scoring_is_one_line_and_keeps_the_samples(tmp_path, capsys, monkeypatch, error):
    from dream.cli import main

    monkeypatch.setattr(OutOfMemoryFeatures, "error", error)

    checkpoint = make_checkpoint(tmp_path)
    out = tmp_path / "eval"
    code = main(["eval", str(checkpoint), "--out", str(out), "--count", "2", "--steps", "1", "--batch-size", "2",
                 "--device", "cpu", "--metrics", "isc", "--metrics-batch-size", "32", "--feature-extractor",
                 OUT_OF_MEMORY, "--cache-dir", str(tmp_path / "fidelity"), "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err == (f"dream eval: error: out of memory computing the metrics in batches of 32 "
                                       f"images on cpu: pass a smaller --metrics-batch-size (the 2 samples in "
                                       f"{out / 'samples'} are kept, and a rerun scores them without sampling "
                                       f"again)\n")
    assert len(list((out / "samples").glob("*.png"))) == 2


def test_lost_real_count_is_written_again(tmp_path, monkeypatch):
    """The real set's image count sits beside torch-fidelity's cached features; when only the count is lost,
    the next evaluation counts the real set once and writes the count again, and the one after loads nothing."""
    checkpoint = make_checkpoint(tmp_path)
    settings = dict(out=str(tmp_path / "eval"), count=4, steps=1, batch_size=4, device="cpu", metrics=("fid",),
                    feature_extractor=EXTRACTOR, cache_dir=tmp_path / "fidelity", progress=False)
    first = evaluate(str(checkpoint), **settings)
    count_file = tmp_path / "fidelity" / f"{first['real']['cache_name']}-count.json"
    assert json.loads(count_file.read_text()) == {"count": 12}
    count_file.unlink()
    loads = []
    real_load_images = evaluate_module.load_images
    monkeypatch.setattr(evaluate_module, "load_images", lambda *a, **k: loads.append(1) or real_load_images(*a, **k))
    second = evaluate(str(checkpoint), **settings)
    assert len(loads) == 1 and json.loads(count_file.read_text()) == {"count": 12}
    third = evaluate(str(checkpoint), **settings)
    assert len(loads) == 1 and third["real"]["images"] == second["real"]["images"] == 12
    assert third["metrics"] == pytest.approx(first["metrics"], rel=1e-12)


# ----------------------------------------------------------------------------------------------
# offline: the Inception weights
@pytest.fixture
def empty_hub(tmp_path):
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)


def test_missing_inception_weights_is_one_clear_line(tmp_path, capsys, monkeypatch, empty_hub):
    from dream.cli import main

    def offline(target):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(evaluate_module, "_download_inception", offline)
    checkpoint = make_checkpoint(tmp_path)
    capsys.readouterr()  # (training's lines)
    out = tmp_path / "eval"
    code = main(["eval", str(checkpoint), "--out", str(out), "--count", "4", "--device", "cpu", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dream eval: error: ")
    assert INCEPTION_FILE in err and "--inception-weights" in err and "URLError" in err
    assert not out.exists()  # checked before any sampling

    code = main(["eval", str(checkpoint), "--out", str(out), "--count", "4", "--device", "cpu", "--no-progress",
                 "--inception-weights", str(tmp_path / "nowhere.pth")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "nowhere.pth" in err and "no such file" in err

    code = main(["eval", str(checkpoint), "--out", str(out), "--count", "4", "--device", "cpu", "--no-progress",
                 "--inception-weights", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err == f"dream eval: error: --inception-weights {tmp_path} is a folder, not a file; " \
                                f"pass torch-fidelity's Inception weights file {INCEPTION_FILE}\n"
    assert not out.exists()


class UnreachableFeatures(RandomConvFeatures):
    """An extractor whose weights would come from the network, which is not there."""

    def __init__(self, name, features_list, **kwargs):
        raise RuntimeError("It looks like there is no internet connection and the repo could not be found\nmore")


UNREACHABLE = "dream-test-unreachable"
register_extractor(UNREACHABLE, UnreachableFeatures)


def test_unloadable_feature_extractor_is_one_line_before_sampling(tmp_path, capsys):
    from dream.cli import main

    checkpoint = make_checkpoint(tmp_path)
    out = tmp_path / "eval"
    code = main(["eval", str(checkpoint), "--out", str(out), "--count", "4", "--steps", "1", "--device", "cpu",
                 "--no-progress", "--feature-extractor", UNREACHABLE])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("dream eval: error: ")
    assert UNREACHABLE in err and "no internet connection" in err and "--extractor-weights PATH" in err
    assert not out.exists()  # checked before any sampling


class WeightedFeatures(RandomConvFeatures):
    """An extractor built from a weights file, which must hold b"weights"."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        if feature_extractor_weights_path is None or Path(feature_extractor_weights_path).read_bytes() != b"weights":
            raise ValueError(f"cannot build from {feature_extractor_weights_path}\nsecond line")
        super().__init__(name, features_list)


WEIGHTED = "dream-test-weighted"
register_extractor(WEIGHTED, WeightedFeatures)


def test_a_wrong_weights_file_for_any_extractor_is_one_line_before_sampling(tmp_path, capsys):
    from dream.cli import main

    checkpoint = make_checkpoint(tmp_path)
    (tmp_path / "wrong.bin").write_bytes(b"other")
    (tmp_path / "right.bin").write_bytes(b"weights")
    out = tmp_path / "eval"
    command = ["eval", str(checkpoint), "--out", str(out), "--count", "2", "--steps", "1", "--device", "cpu",
               "--no-progress", "--metrics", "isc", "--feature-extractor", WEIGHTED, "--extractor-weights"]
    assert main(command + [str(tmp_path / "wrong.bin")]) == 2
    assert capsys.readouterr().err == (f"dream eval: error: {tmp_path / 'wrong.bin'} is not the weights file of "
                                       f"feature extractor {WEIGHTED!r} (ValueError: cannot build from "
                                       f"{tmp_path / 'wrong.bin'})\n")
    assert not out.exists()
    assert main(command + [str(tmp_path / "right.bin")]) == 0
    report = json.loads((out / "report-n2.json").read_text())
    assert report["feature_extractor_weights"] == str(tmp_path / "right.bin")


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A file of torch-fidelity's Inception architecture (random weights: the real ones are not here)."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch.object(torch, "load", lambda *a, **k: {}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        model = FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048"], feature_extractor_weights_path="unused")
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)  # half the size; loads into fp32
    return path


def sha256_prefix(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]


def test_inception_weights_file_is_checked(tmp_path, empty_hub, monkeypatch, inception_file):
    """The file is checked by building the extractor from it, after loading it as plain tensors (torch-fidelity
    itself unpickles it fully, which could run code)."""
    import shutil

    monkeypatch.setattr(evaluate_module, "INCEPTION_SHA256_PREFIX", sha256_prefix(inception_file))  # (random weights)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DreamError, match="not torch-fidelity's Inception weights .*does not load as plain tensors"):
        resolve_feature_extractor(INCEPTION_NAME, str(bad))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)  # tensors, but not the architecture's
    with pytest.raises(DreamError, match=r"not torch-fidelity's Inception weights .*Error\(s\) in loading state_dict"):
        resolve_feature_extractor(INCEPTION_NAME, str(wrong))
    code = tmp_path / "code.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "extra": Fraction(1, 3)}, code)  # a pickled object of a class
    with pytest.raises(DreamError, match=r"does not load as plain tensors \(it holds a pickled fractions.Fraction, "
                                         r"which loading could run as code\)$") as error:
        resolve_feature_extractor(INCEPTION_NAME, str(code))
    assert "\x1b" not in str(error.value) and "trust" not in str(error.value)  # not torch's advice to load it anyway
    # a file in torch's hub cache is found without a flag or a download
    hub_file = empty_hub / "checkpoints" / INCEPTION_FILE
    hub_file.parent.mkdir(parents=True)
    shutil.copy(inception_file, hub_file)
    path, tag = resolve_feature_extractor(INCEPTION_NAME, None)
    assert path == str(hub_file) and tag.startswith(f"{INCEPTION_NAME}-")
    shutil.copy(wrong, hub_file)  # a damaged download in the hub cache: the line says what to do
    with pytest.raises(DreamError, match="delete it to download it again, or pass --inception-weights PATH"):
        resolve_feature_extractor(INCEPTION_NAME, None)
    with pytest.raises(DreamError, match="unknown feature extractor"):
        resolve_feature_extractor("no-such-net", None)
    # a relative path is recorded (in the report) as the absolute path of the file
    good = tmp_path / "weights" / "inception.pth"
    good.parent.mkdir()
    shutil.copy(inception_file, good)
    monkeypatch.chdir(tmp_path)
    path, _ = resolve_feature_extractor(INCEPTION_NAME, "weights/../weights/inception.pth")
    assert path == str(good)


def test_inception_weights_of_another_hash_are_refused(tmp_path, empty_hub, inception_file):
    """The architecture's weights, but not torch-fidelity's file (SHA-256 6726825d...): FIDs from them are not
    comparable with published ones."""
    import shutil

    from dream.evaluate import INCEPTION_SHA256_PREFIX

    found = sha256_prefix(inception_file)
    assert INCEPTION_SHA256_PREFIX == INCEPTION_FILE.rsplit("-", 1)[1].removesuffix(".pth") != found
    expected = (f"is not torch-fidelity's Inception weights file {INCEPTION_FILE}: its SHA-256 starts with {found}, "
                f"not {INCEPTION_SHA256_PREFIX} (other Inception weights give FIDs not comparable with published "
                f"ones)")
    with pytest.raises(DreamError, match=f"^{re.escape(f'{inception_file} {expected}')}$"):
        resolve_feature_extractor(INCEPTION_NAME, str(inception_file))
    hub_file = empty_hub / "checkpoints" / INCEPTION_FILE  # in torch's hub cache: the line says what to do
    hub_file.parent.mkdir(parents=True)
    shutil.copy(inception_file, hub_file)
    with pytest.raises(DreamError, match=f"^{re.escape(f'{hub_file} {expected}')}; delete it to download it again, "
                                         f"or pass --inception-weights PATH$"):
        resolve_feature_extractor(INCEPTION_NAME, None)


# ----------------------------------------------------------------------------------------------
# the real set's cache, and checks made before any sampling
def write_png(path, image):
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def write_faces(folder, first, count):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        Image.fromarray(load_images("synthetic", size=16, count=i + 1, seed=9)[i].permute(1, 2, 0).numpy()).save(
            folder / f"face{i:03d}.png")


def test_relative_folders_of_a_run_are_taken_from_where_it_trained(tmp_path, monkeypatch):
    """A config that stores --data-root and --run-dir relative to where training ran (runs before they were
    stored absolute) is read from the run folder that holds the checkpoint, wherever eval runs; where that
    cannot be told (an export) the line asks for --real-root."""
    work = tmp_path / "work"
    write_faces(work / "faces", 0, 3)
    write_faces(work / "faces" / "runs" / "x" / "samples", 3, 2)  # the run inside the data: left out
    config = {"data": "folder", "data_root": "faces", "run_dir": "faces/./runs/x", "seed": 0}
    checkpoint = work / "faces" / "runs" / "x" / "checkpoints" / "ckpt-000000001.pt"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    real = resolve_real_set(config, checkpoint=str(checkpoint))
    assert real["root"] == str((work / "faces").resolve()) and str((work / "faces" / "runs" / "x").resolve()) \
        in real["exclude"]
    assert len(load_real_images(real, 16)) == 3
    with pytest.raises(DreamError, match="'faces' is a relative path, and where training ran cannot be told from "
                                         ".*export.safetensors; pass --real-root PATH"):
        resolve_real_set(config, checkpoint=str(tmp_path / "export.safetensors"))
    assert resolve_real_set(config, root=str(work / "faces"), checkpoint=None)["root"] == real["root"]
    absolute = {**config, "data_root": str(work / "faces"), "run_dir": str(work / "faces" / "runs" / "x")}
    assert resolve_real_set(absolute, checkpoint=None) == real


def test_training_stores_its_folders_as_absolute_paths(tmp_path, monkeypatch):
    from dream.cli import main

    write_faces(tmp_path / "faces", 0, 4)
    monkeypatch.chdir(tmp_path / "faces")
    assert main(["train", "--preset", "tiny", "--image-size", "16", "--data", "folder", "--data-root", ".",
                 "--run-dir", "runs/x", "--batch-size", "2", "--max-steps", "1", "--sample-every", "0",
                 "--device", "cpu", "--no-progress"]) == 0
    saved = json.loads((tmp_path / "faces" / "runs" / "x" / "config.json").read_text())
    assert saved["data_root"] == str((tmp_path / "faces").resolve())
    assert saved["run_dir"] == str((tmp_path / "faces" / "runs" / "x").resolve())
    monkeypatch.chdir(tmp_path)  # a rerun from elsewhere, with the same folders named otherwise: the same run
    assert main(["train", "--preset", "tiny", "--image-size", "16", "--data", "folder", "--data-root", "faces",
                 "--run-dir", "faces/runs/x", "--batch-size", "2", "--max-steps", "1", "--sample-every", "0",
                 "--device", "cpu", "--no-progress"]) == 0


def test_real_folder_statistics_follow_its_files(tmp_path):
    """The cached real-set features are keyed on the folder's files: images added to the folder are scored,
    not the features of the folder as it was."""
    checkpoint = make_checkpoint(tmp_path)
    write_faces(tmp_path / "real", 0, 6)
    settings = dict(count=4, steps=1, batch_size=4, device="cpu", metrics=("fid",), real="folder",
                    real_root=str(tmp_path / "real"), feature_extractor=EXTRACTOR,
                    cache_dir=tmp_path / "fidelity", progress=False)
    before = evaluate(str(checkpoint), out=str(tmp_path / "eval"), **settings)
    write_faces(tmp_path / "real", 6, 5)
    after = evaluate(str(checkpoint), out=str(tmp_path / "eval"), **settings)
    assert before["real"]["images"] == 6 and after["real"]["images"] == 11 and after["made"] == 0
    assert after["real"]["files"] != before["real"]["files"]
    assert after["metrics"]["fid"] != pytest.approx(before["metrics"]["fid"], rel=1e-6)
    fresh = evaluate(str(checkpoint), out=str(tmp_path / "eval"), **{**settings, "cache_dir": tmp_path / "fresh"})
    assert after["metrics"]["fid"] == pytest.approx(fresh["metrics"]["fid"], rel=1e-9)


def add_a_face(folder):
    write_faces(folder, 6, 1)


def remove_a_face(folder):
    (folder / "face000.png").unlink()


def rewrite_a_face(folder):
    face = folder / "face000.png"
    write_png(face, load_images("synthetic", size=16, count=8, seed=9)[7])
    os.utime(face, ns=(0, 0))  # the fingerprint's modification time changes whatever the clock's resolution


@pytest.mark.parametrize("change", [add_a_face, remove_a_face, rewrite_a_face])
def test_a_real_folder_changed_while_sampling_is_one_line_and_nothing_is_cached(tmp_path, monkeypatch, change):
    """The real set's statistics are cached under the fingerprint of the files listed before sampling: a folder
    that holds other files by the time it is scored stops the evaluation, rather than caching another set's
    features under that key. The samples are kept; a rerun scores the folder as it now is."""
    monkeypatch.setenv("DREAM_CACHE", str(tmp_path / "cache"))  # (the decoded-image cache)
    checkpoint = make_checkpoint(tmp_path)
    real = tmp_path / "real"
    write_faces(real, 0, 6)
    real_sample_images = evaluate_module.sample_images

    def sample_while_the_folder_changes(*args, **kwargs):
        change(real)
        return real_sample_images(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "sample_images", sample_while_the_folder_changes)
    cache = tmp_path / "fidelity"
    settings = dict(out=str(tmp_path / "eval"), count=2, steps=1, batch_size=2, device="cpu", metrics=("fid",),
                    real="folder", real_root=str(real), feature_extractor=EXTRACTOR, cache_dir=cache, progress=False)
    with pytest.raises(DreamError, match=f"^the real set {re.escape(str(real.resolve()))} changed during the "
                                         r"evaluation \(images added, removed or rewritten since it was listed\); "
                                         r"no features were cached from it: run dream eval again \(the samples "
                                         r"made are kept\)$"):
        evaluate(str(checkpoint), **settings)
    assert [path.suffix for path in cache.iterdir()] == [".json"]  # the count of the set listed, not features
    assert len(list((tmp_path / "eval" / "samples").glob("*.png"))) == 2

    monkeypatch.setattr(evaluate_module, "sample_images", real_sample_images)
    again = evaluate(str(checkpoint), **settings)
    fresh = evaluate(str(checkpoint), **{**settings, "cache_dir": tmp_path / "fresh"})
    assert again["made"] == 0 and again["real"]["images"] == len(list(real.glob("*.png")))
    assert again["metrics"]["fid"] == pytest.approx(fresh["metrics"]["fid"], rel=1e-12)


def test_a_real_folder_changed_while_it_is_decoded_is_refused(tmp_path, monkeypatch):
    """load_images lists the folder itself: the listing is checked again after decoding, so the images returned
    are those of the files fingerprinted."""
    monkeypatch.setenv("DREAM_CACHE", str(tmp_path / "cache"))
    write_faces(tmp_path / "real", 0, 3)
    real = resolve_real_set({"data": "folder"}, root=str(tmp_path / "real"))
    real_load_images = evaluate_module.load_images
    monkeypatch.setattr(evaluate_module, "load_images",
                        lambda *a, **k: (real_load_images(*a, **k), add_a_face(tmp_path / "real"))[0])
    with pytest.raises(DreamError, match="changed during the evaluation"):
        load_real_images(real, 16)


@pytest.mark.parametrize("change, message", [
    ({"real": "folder", "real_root": "/nonexistent/faces"}, "/nonexistent/faces does not exist"),
    ({"kid_subset_size": 1}, "--kid-subset-size must be an integer of at least 2, got 1"),
    ({"metrics_batch_size": 0}, "--metrics-batch-size must be an integer of at least 1, got 0"),
    ({"seed": -1}, r"--seed must be an integer in \[0, 4294967295\], got -1"),
])
def test_bad_real_set_and_metric_settings_fail_before_sampling(tmp_path, change, message):
    checkpoint = make_checkpoint(tmp_path)
    with pytest.raises(DreamError, match=message):
        evaluate(str(checkpoint), out=str(tmp_path / "eval"), count=4, steps=1, device="cpu",
                 feature_extractor=EXTRACTOR, cache_dir=tmp_path / "fidelity", progress=False, **change)
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("files, message", [
    ({"face000.png": "face"}, "has 1 image; FID and KID need at least 2"),
    ({"a.png": "some text", "b.jpg": "more text"}, "none of the 2 files in .* could be read as an image"),
    ({"face000.png": "face", "bad.png": "text", "bad.jpg": "text"}, "has 1 image; FID and KID need at least 2"),
    ({"face000.png": "face", "face001.png": "face"}, None),  # 2 images: enough, and KID subsets cap at 2
])
def test_real_folder_of_fewer_than_two_images_is_one_line_before_sampling(tmp_path, capsys, monkeypatch, files,
                                                                           message):
    from dream.cli import main

    monkeypatch.setenv("DREAM_CACHE", str(tmp_path / "cache"))
    checkpoint = make_checkpoint(tmp_path)
    real = tmp_path / "real"
    real.mkdir()
    faces = load_images("synthetic", size=16, count=2, seed=9)
    for i, (name, content) in enumerate(files.items()):
        if content == "face":
            write_png(real / name, faces[i])
        else:
            (real / name).write_text(content)
    out = tmp_path / "eval"
    code = main(["eval", str(checkpoint), "--out", str(out), "--count", "2", "--steps", "1", "--batch-size", "2",
                 "--device", "cpu", "--real", "folder", "--real-root", str(real), "--kid-subset-size", "1000",
                 "--feature-extractor", EXTRACTOR, "--cache-dir", str(tmp_path / "fidelity"), "--no-progress"])
    err = capsys.readouterr().err
    if message is None:
        assert code == 0 and err == ""
        assert json.loads((out / "report-n2.json").read_text())["real"]["images"] == 2
        return
    assert code == 2 and err.count("\n") == 1 and err.startswith("dream eval: error: ") and re.search(message, err)
    assert not out.exists()  # checked before any sampling


def test_cache_dir_that_is_a_file_is_one_line_before_sampling(tmp_path, capsys, monkeypatch):
    from dream.cli import main

    checkpoint = make_checkpoint(tmp_path)
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("not a folder")
    code = main(["eval", str(checkpoint), "--out", "eval", "--count", "2", "--steps", "1", "--device", "cpu",
                 "--feature-extractor", EXTRACTOR, "--cache-dir", "afile", "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err == ("dream eval: error: --cache-dir afile: afile exists and is not a folder; "
                                       "pass another --cache-dir\n")
    assert not Path("eval").exists()


def test_cache_dir_that_cannot_be_written_is_one_line_before_sampling(tmp_path, capsys, monkeypatch):
    """An existing folder that refuses new files (a read-only mount) is found before sampling."""
    import tempfile

    from dream.cli import main

    checkpoint = make_checkpoint(tmp_path)
    (tmp_path / "readonly").mkdir()
    real_temporary_file = tempfile.TemporaryFile

    def read_only_mount(*args, dir=None, **kwargs):
        if Path(dir) == tmp_path / "readonly":
            raise OSError(30, "Read-only file system")
        return real_temporary_file(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only_mount)
    code = main(["eval", str(checkpoint), "--out", str(tmp_path / "eval"), "--count", "2", "--steps", "1",
                 "--device", "cpu", "--feature-extractor", EXTRACTOR, "--cache-dir", str(tmp_path / "readonly"),
                 "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err == (f"dream eval: error: --cache-dir {tmp_path / 'readonly'}: cannot write into "
                                       f"folder {tmp_path / 'readonly'}: Read-only file system; pass another "
                                       f"--cache-dir\n")
    assert not (tmp_path / "eval").exists()


def test_damaged_statistics_cache_is_deleted_and_recomputed(tmp_path, capsys):
    from dream.cli import main

    checkpoint = make_checkpoint(tmp_path)
    cache = tmp_path / "fidelity"
    command = ["eval", str(checkpoint), "--out", str(tmp_path / "eval"), "--count", "6", "--steps", "1",
               "--batch-size", "3", "--device", "cpu", "--real-count", "8", "--kid-subset-size", "4",
               "--feature-extractor", EXTRACTOR, "--cache-dir", str(cache), "--no-progress"]
    assert main(command) == 0
    line = capsys.readouterr().out
    name = json.loads((tmp_path / "eval" / "report-n6.json").read_text())["real"]["cache_name"]
    files = sorted(cache.glob(f"{name}-*"))
    assert [p.name[len(name):] for p in files] == [
        "-count.json", f"-{EXTRACTOR}-features-features.pt", f"-{EXTRACTOR}-features-logits.pt",
        f"-{EXTRACTOR}-stat-fid-features.pt"]
    other = cache / "dream-real-synthetic-16px-0123456789abcdef-count.json"  # another real set's: kept
    other.write_text("{")
    files[0].write_bytes(b"")
    flip_a_tensor_bit(files[1])
    overwrite_pickle_bytes(files[2])
    files[3].write_bytes(files[3].read_bytes()[:files[3].stat().st_size // 2])

    with pytest.warns(UserWarning, match="deleting damaged cache files of the real set") as warned:
        assert main(command) == 0
    assert capsys.readouterr().out == line  # the same scores, from the real images read again
    warning, = (str(w.message) for w in warned if "damaged" in str(w.message))
    assert "\n" not in warning and all(str(p) in warning for p in files)
    assert str(other) not in warning and other.read_text() == "{"
    for path in files[1:]:
        torch.load(path, weights_only=False)
    assert json.loads(files[0].read_text()) == {"count": 8}


def test_default_out_dir_is_beside_the_weights():
    from dream.evaluate import default_out_dir

    tag = "ddim50-eta0-seed3-b64"
    assert default_out_dir("/r/run/checkpoints/ckpt-000000009.pt", "ddim", 50, 0.0, 3, torch.float32, 64) == \
        Path(f"/r/run/eval/ckpt-000000009-{tag}")
    assert default_out_dir("/r/exports/ema.safetensors", "ddim", 50, 0.0, 3, torch.bfloat16, 64) == \
        Path(f"/r/exports/eval/ema-{tag}-bf16")
    # the raw (non-EMA) weights and another batch size make other images: other folders
    assert default_out_dir("/r/run/checkpoints/ckpt-000000009.pt", "ddim", 50, 0.0, 3, torch.float32, 32,
                           use_ema=False) == Path("/r/run/eval/ckpt-000000009-ddim50-eta0-seed3-b32-raw")


def test_default_out_dir_names_the_eta_that_runs(tmp_path, monkeypatch):
    """ddpm takes eta 0 (not given) or 1 and runs both as 1: one sample folder, not two of the same images."""
    checkpoint = make_checkpoint(tmp_path)
    named = []

    class Named(Exception):
        pass

    def default_out_dir(checkpoint_path, sampler, steps, eta, *args):
        named.append((sampler, steps, eta))
        raise Named

    monkeypatch.setattr(evaluate_module, "default_out_dir", default_out_dir)
    for sampler, eta in (("ddpm", 0.0), ("ddpm", 1), ("ddim", 0.25)):
        with pytest.raises(Named):
            evaluate(str(checkpoint), sampler=sampler, eta=eta, device="cpu", feature_extractor=EXTRACTOR,
                     cache_dir=tmp_path / "fidelity", progress=False)
    total = named[0][1]
    assert named == [("ddpm", total, 1.0), ("ddpm", total, 1.0), ("ddim", 50 if total >= 50 else total, 0.25)]


@pytest.mark.parametrize("change", ["decode version", "decoder release"])
def test_real_statistics_are_keyed_on_the_decoder_version(monkeypatch, change):
    """The real set's statistics are those of its decoded images: new decoding (DECODE_VERSION, or another Pillow
    or torchvision release) computes them again."""
    import dream.data
    from dream.evaluate import real_cache_name

    real = {"source": "folder", "root": "/data", "split": None, "count": None, "seed": None, "files": "abc"}
    name = real_cache_name(real, 64, "inception-v3-compat-123")
    if change == "decode version":
        monkeypatch.setattr(dream.data, "DECODE_VERSION", dream.data.DECODE_VERSION + 1)
    else:
        monkeypatch.setattr(dream.data, "DECODERS", ("Pillow", "torch"))  # torchvision's version becomes torch's
    assert real_cache_name(real, 64, "inception-v3-compat-123") != name


def test_a_real_folder_leaves_out_the_run_and_the_evaluation_and_keeps_one_statistics_key(tmp_path):
    """Sample grids of a run inside the data folder, and an evaluation's own PNGs written there, are not real
    images; and which folders were left out does not split the statistics cache (the files' fingerprint is
    the key), so every run evaluated on one folder shares its statistics."""
    from PIL import Image

    from dream.evaluate import real_cache_name, resolve_real_set

    faces = tmp_path / "faces"
    for folder, count in ((faces, 3), (faces / "run" / "samples", 1), (faces / "eval" / "samples", 2)):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (40 * i, 90, 200)).save(folder / f"{i:06d}.png")
    config = {"data": "folder", "data_root": str(faces), "run_dir": str(faces / "run")}
    real = resolve_real_set(config, exclude=[faces / "eval"])
    only_faces = resolve_real_set({**config, "data_root": str(faces), "run_dir": str(tmp_path / "elsewhere")},
                                  exclude=[faces / "eval", faces / "run"])
    assert real["files"] == only_faces["files"]
    assert real_cache_name(real, 64, "w") == real_cache_name(only_faces, 64, "w")
    everything = resolve_real_set({"data": "folder", "data_root": str(faces)})
    assert everything["files"] != real["files"]


def test_a_report_scored_otherwise_is_kept_and_a_rescoring_of_the_same_kind_replaces_it(tmp_path):
    from dream.evaluate import report_path

    def report(metrics, real_root=None, extractor="inception-v3-compat", settings=None):
        real = {"kind": "folder", "root": real_root, "cache_name": f"c-{real_root}", "images": 9} if real_root else None
        return {"count": 5, "metrics": dict.fromkeys(metrics, 1.0), "real": real, "feature_extractor": extractor,
                "feature_extractor_weights": None, **({"metric_settings": settings} if settings else {})}

    def write(report_):
        path = report_path(tmp_path, report_)
        path.write_text(json.dumps(report_))
        return path.name

    assert write(report(["fid", "kid_mean"], "/a")) == "report-n5.json"
    assert write(report(["fid", "kid_mean"], "/a")) == "report-n5.json"  # the same scoring again: replaced
    assert write(report(["fid"], "/b")) == "report-n5-2.json"  # another real set: the first is kept
    assert write(report(["isc_mean"])) == "report-n5-3.json"
    assert write(report(["isc_mean"], extractor="other")) == "report-n5-4.json"
    assert write(report(["fid"], "/b")) == "report-n5-2.json"
    (tmp_path / "report-n5-5.json").write_text("{not json")
    assert report_path(tmp_path, report(["kid_mean"], "/c")).name == "report-n5-6.json"  # an unreadable one is kept
    assert len(list(tmp_path.glob("report-n5*.json"))) == 5
    kid = {"kid_subset_size": 1000, "kid_subsets": 100}
    assert write(report(["fid", "kid_mean"], "/a", settings=kid)) == "report-n5-6.json"  # KID's subsets: other
    assert write(report(["fid", "kid_mean"], "/a", settings={**kid, "kid_subset_size": 4})) == "report-n5-7.json"
    assert write(report(["fid", "kid_mean"], "/a", settings=kid)) == "report-n5-6.json"


def test_a_sample_set_inside_the_run_folder_can_be_the_real_set_by_name(tmp_path, capsys):
    """The run's folder is left out of a real folder that holds it, not out of a real folder inside it: two
    sample sets of one run can be compared. The real set's grid.png is no image of the set."""
    from dream.cli import main

    checkpoint = make_checkpoint(tmp_path)
    run = tmp_path / "run"
    common = ["--count", "2", "--steps", "1", "--batch-size", "2", "--device", "cpu", "--no-progress"]
    assert main(["sample", str(checkpoint), "--out", str(run / "s1"), *common]) == 0
    assert (run / "s1" / "grid.png").exists()
    out = tmp_path / "eval"
    code = main(["eval", str(checkpoint), "--out", str(out), *common, "--seed", "1", "--real", "folder",
                 "--real-root", str(run / "s1"), "--kid-subset-size", "2", "--feature-extractor", EXTRACTOR,
                 "--cache-dir", str(tmp_path / "fidelity")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "report-n2.json").read_text())["real"]["images"] == 2


def test_a_torchvision_that_fails_to_import_is_one_line_before_sampling_or_scoring(tmp_path, capsys,
                                                                                  broken_torchvision):
    from dream.cli import main

    checkpoint = make_checkpoint(tmp_path)
    common = ["--count", "2", "--steps", "1", "--batch-size", "2", "--device", "cpu", "--no-progress"]
    assert main(["sample", str(checkpoint), "--out", str(tmp_path / "s"), *common]) == 2
    assert capsys.readouterr().err.startswith("dream sample: error: the sample grid needs torchvision, which does "
                                              "not import here (operator torchvision::nms does not exist)")
    assert not list((tmp_path / "s").glob("*.png"))  # refused before sampling
    assert main(["eval", str(checkpoint), "--out", str(tmp_path / "e"), *common, "--metrics", "isc",
                 "--feature-extractor", EXTRACTOR]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torchvision, which does not import here" in err, err
    assert not (tmp_path / "e").exists()  # refused before sampling


@pytest.mark.parametrize("change, message", [
    ({"count": 1}, "--count must be at least 2 for FID/IS/KID, got 1"),
    ({"real_count": 1}, "--real-count must be at least 2, got 1"),
    ({"kid_subsets": 0}, "kid_subsets must be an integer of at least 1, got 0"),
])
def test_too_few_images_to_score_are_refused_before_sampling(tmp_path, change, message):
    checkpoint = make_checkpoint(tmp_path)
    settings = dict(count=4, steps=1, device="cpu", feature_extractor=EXTRACTOR, cache_dir=tmp_path / "fidelity",
                    progress=False)
    with pytest.raises(DreamError, match=f"^{message}$"):
        evaluate(str(checkpoint), out=str(tmp_path / "eval"), **{**settings, **change})
    assert not (tmp_path / "eval").exists()


def test_an_out_that_is_a_file_is_refused_before_sampling(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_module, "load_sampler_model", lambda *a, **k: pytest.fail("the model was loaded"))
    a_file = tmp_path / "report.json"
    a_file.write_text("{}")
    with pytest.raises(DreamError, match=f"^--out {a_file} is a file; it must be a folder"):
        evaluate("ckpt.pt", out=str(a_file), count=4, feature_extractor=EXTRACTOR, cache_dir=tmp_path / "fidelity")


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 0}, "--batch-size must be a positive integer, got 0"),
    ({"steps_per_graph": 0}, "--steps-per-graph must be a positive integer, got 0"),
    ({"graphs": True}, "CUDA graphs need a CUDA device; sampling runs on cpu"),
    ({"out": "FILE/eval"}, r"--out .*FILE/eval cannot be made \(Not a directory: .*FILE is a file\)"),
])
def test_sampling_settings_are_refused_before_anything_is_loaded(tmp_path, monkeypatch, change, message):
    """What sample_images would refuse is refused before the model, the extractor and the real set are loaded
    (a CelebA real set takes minutes)."""
    for name in ("load_sampler_model", "resolve_feature_extractor", "prepare_real_set"):
        monkeypatch.setattr(evaluate_module, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} ran"))
    (tmp_path / "FILE").write_text("")
    settings = dict(out=str(tmp_path / "eval"), count=4, device="cpu", feature_extractor=EXTRACTOR,
                    cache_dir=tmp_path / "fidelity")
    change = {key: str(tmp_path / value) if key == "out" else value for key, value in change.items()}
    with pytest.raises(DreamError, match=f"^{message}$"):
        evaluate("ckpt.pt", **{**settings, **change})
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("config, change, message", [
    ({"data": "synthetic"}, {"real_root": "/data/celeba"}, "--real-root names a CelebA or folder real set, but the "
     r"real set is the synthetic one \(the checkpoint's training data\): pass --real celeba or --real folder"),
    ({"data": "folder", "data_root": "/faces"}, {"real": "synthetic", "real_root": "/r", "real_split": "test"},
     "--real-root and --real-split name a CelebA or folder real set, but the real set is the synthetic one: "),
    ({}, {"real_split": "test"}, "--real-split names a CelebA or folder real set, but the real set is the "
     "synthetic one: pass"),  # (an old export's config without "data": synthetic is the default, not its data)
    ({"data": "folder", "data_root": "/faces"}, {"real_split": "test"},
     r"--real-split test names a CelebA split; the real set is a folder \(all its images\)$"),
])
def test_real_set_flags_that_would_be_ignored_are_refused(config, change, message):
    with pytest.raises(DreamError, match=f"^{message}"):
        resolve_real_set(config, **{{"real": "source", "real_root": "root", "real_split": "split"}[key]: value
                                    for key, value in change.items()})


def test_kid_alone_is_scored_against_the_real_set(tmp_path):
    checkpoint = make_checkpoint(tmp_path)
    report = evaluate(str(checkpoint), out=str(tmp_path / "eval"), count=4, steps=1, batch_size=4, device="cpu",
                      metrics=("kid",), feature_extractor=EXTRACTOR, cache_dir=tmp_path / "fidelity", kid_subsets=2,
                      progress=False)
    assert set(report["metrics"]) == {"kid_mean", "kid_std"} and report["real"]["images"] == 12
    assert report["metric_settings"] == {"kid_subsets": 2, "kid_subset_size": 4}


def test_the_report_records_the_steps_and_eta_that_ran_and_another_scoring_is_kept_beside_it(tmp_path):
    """ddpm runs all T steps with eta 1 whatever the defaults said: the report records what ran, and the checkpoint
    file a run folder stood for. Scoring the
    same samples with other settings writes report-n<N>-2.json and keeps the first."""
    from dream.evaluate import format_report

    checkpoint = make_checkpoint(tmp_path)  # T = 10
    settings = dict(out=str(tmp_path / "eval"), count=4, sampler="ddpm", batch_size=4, device="cpu",
                    metrics=("isc",), feature_extractor=EXTRACTOR, cache_dir=tmp_path / "fidelity", progress=False)
    first = evaluate(str(checkpoint.parent.parent), isc_splits=1, **settings)  # the run folder: its newest checkpoint
    assert (first["sampler"], first["steps"], first["eta"], first["seed"]) == ("ddpm", 10, 1.0, 0)
    assert first["checkpoint"] == str(checkpoint.resolve())
    assert Path(first["report"]).name == "report-n4.json"
    assert format_report(first).startswith(f"IS {first['metrics']['isc_mean']:.3f} ± ") and \
        format_report(first).endswith(" on 4 samples (ddpm, seed 0, step 9); report " + first["report"])
    second = evaluate(str(checkpoint), isc_splits=2, **settings)
    assert second["made"] == 0 and Path(second["report"]).name == "report-n4-2.json"
    assert json.loads(Path(first["report"]).read_text())["metric_settings"] == {"isc_splits": 1}


def test_a_capped_real_folder_keeps_a_fixed_subset_of_that_many_images(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAM_CACHE", str(tmp_path / "cache"))
    write_faces(tmp_path / "real", 0, 7)
    real = resolve_real_set({"data": "folder"}, root=str(tmp_path / "real"), count=4)
    capped = load_real_images(real, 16)
    every = load_real_images({**real, "count": None}, 16)
    assert capped.shape == (4, 3, 16, 16) and every.shape[0] == 7
    rows = [next(i for i in range(7) if torch.equal(every[i], image)) for image in capped]
    assert rows == sorted(set(rows))  # distinct images, in the folder's order
    assert rows != list(range(len(rows)))  # a random subset (seeded), not the folder's first images
    assert torch.equal(load_real_images(real, 16), capped)


def test_naming_the_training_data_as_the_real_set_is_the_default_real_set():
    config = {"data": "synthetic", "data_count": 12, "seed": 5}
    assert resolve_real_set(config, source="synthetic") == resolve_real_set(config) == {
        "source": "synthetic", "root": None, "split": None, "count": 12, "seed": 5}


def test_real_statistics_are_keyed_on_the_image_size_the_extractor_weights_and_the_synthetic_generator(
        monkeypatch):
    import dream.data
    from dream.evaluate import real_cache_name

    real = {"source": "synthetic", "root": None, "split": None, "count": 12, "seed": 5}
    names = {real_cache_name(real, 16, "w1"), real_cache_name(real, 32, "w1"), real_cache_name(real, 16, "w2")}
    monkeypatch.setattr(dream.data, "SYNTHETIC_VERSION", dream.data.SYNTHETIC_VERSION + 1)
    names.add(real_cache_name(real, 16, "w1"))
    assert len(names) == 4


@pytest.mark.parametrize("metrics, files, cached", [
    (("fid",), ["stat-fid-features"], True),
    (("fid", "kid"), ["stat-fid-features"], False),  # KID needs the features themselves
    (("fid", "kid"), ["features-features"], True),
    (("fid", "isc"), ["features-features"], False),  # IS's logits are missing
    (("fid", "isc"), ["features-features", "features-logits"], True),
])
def test_the_real_features_are_cached_only_when_every_metric_finds_its_file(tmp_path, metrics, files, cached):
    from dream.evaluate import real_features_cached

    for name in files:
        (tmp_path / f"key-{EXTRACTOR}-{name}.pt").write_bytes(b"x")
    assert real_features_cached(tmp_path, "key", EXTRACTOR, metrics) is cached


def test_the_real_set_is_loaded_before_sampling_when_its_features_are_gone(tmp_path, monkeypatch):
    """The real-set count survives, but its features do not: the real set is read (and checked) again before
    sampling, not after it."""
    checkpoint = make_checkpoint(tmp_path)
    settings = dict(out=str(tmp_path / "eval"), count=2, steps=1, batch_size=2, device="cpu", metrics=("kid",),
                    feature_extractor=EXTRACTOR, cache_dir=tmp_path / "fidelity", kid_subsets=2, progress=False)
    first = evaluate(str(checkpoint), **settings)
    for path in (tmp_path / "fidelity").glob(f"{first['real']['cache_name']}-*.pt"):
        path.unlink()
    events = []
    real_load_images, real_sample_images = evaluate_module.load_images, evaluate_module.sample_images
    monkeypatch.setattr(evaluate_module, "load_images",
                        lambda *a, **k: events.append("load") or real_load_images(*a, **k))
    monkeypatch.setattr(evaluate_module, "sample_images",
                        lambda *a, **k: events.append("sample") or real_sample_images(*a, **k))
    second = evaluate(str(checkpoint), **settings)
    assert events[:2] == ["load", "sample"] and second["metrics"] == pytest.approx(first["metrics"], rel=1e-12)


def test_an_empty_archive_in_the_statistics_cache_is_damaged(tmp_path):
    import zipfile

    from dream.evaluate import discard_damaged_cache

    empty = tmp_path / "key-x-features-features.pt"
    zipfile.ZipFile(empty, "w").close()
    good = tmp_path / "key-x-stat-fid-features.pt"
    torch.save({"mu": torch.randn(3)}, good)
    with pytest.warns(UserWarning, match="deleting damaged cache files"):
        discard_damaged_cache(tmp_path, "key")
    assert not empty.exists() and good.exists()


def rewrite_zip_entry(path, entry: str, damage) -> None:
    """Replace the bytes of one entry of torch.save's zip (stored uncompressed) by damage(bytes) of the same length,
    in place, leaving its CRC-32 as it was."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/" + entry))
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    data[start:start + info.file_size] = damage(bytes(data[start:start + info.file_size]))
    path.write_bytes(data)


def overwrite_pickle_bytes(path):
    rewrite_zip_entry(path, "data.pkl", lambda pickled: pickled[:2] + b"\xff" * 8 + pickled[10:])


def flip_a_tensor_bit(path):
    rewrite_zip_entry(path, "data/0", lambda tensor: tensor[:5] + bytes([tensor[5] ^ 0x10]) + tensor[6:])


def test_a_statistics_cache_file_saved_without_crc32s_is_not_damaged(tmp_path):
    """torch.save with serialization's compute_crc32 off records 0 for every entry: such a file loads, and is kept."""
    import torch.utils.serialization

    from dream.evaluate import discard_damaged_cache

    features = tmp_path / "key-x-features-features.pt"
    with torch.utils.serialization.config.patch({"save.compute_crc32": False}):
        torch.save(torch.linspace(-1, 1, 96, dtype=torch.float64).reshape(8, 12), features)
    with zipfile.ZipFile(features) as archive:
        assert {entry.CRC for entry in archive.infolist()} == {0}
    discard_damaged_cache(tmp_path, "key")
    assert features.exists()


@pytest.mark.parametrize("damage", [overwrite_pickle_bytes, flip_a_tensor_bit])
def test_a_statistics_cache_file_with_changed_bytes_is_damaged(tmp_path, damage):
    """torch.save's zip holds a CRC-32 of each entry: overwritten pickle bytes (torch.load: an UnpicklingError)
    and a flipped bit in tensor data (torch.load: other numbers, silently) both fail it."""
    from dream.evaluate import discard_damaged_cache

    features = tmp_path / "key-x-features-features.pt"
    torch.save(torch.linspace(-1, 1, 96, dtype=torch.float64).reshape(8, 12), features)
    good = tmp_path / "key-x-features-logits.pt"
    torch.save(torch.ones(8, 10, dtype=torch.float64), good)
    damage(features)
    try:
        damaged_but_loaded = not torch.equal(torch.load(features), torch.linspace(-1, 1, 96).double().reshape(8, 12))
    except Exception:  # noqa: BLE001
        damaged_but_loaded = None
    assert damaged_but_loaded is (None if damage is overwrite_pickle_bytes else True)
    with pytest.warns(UserWarning, match=f"^deleting damaged cache files of the real set, to compute them again: "
                                         f"{re.escape(str(features))}$"):
        discard_damaged_cache(tmp_path, "key")
    assert not features.exists() and good.exists()


def test_the_number_of_real_images_does_not_make_a_scoring_of_another_kind(tmp_path):
    """The real set's files are its identity (their fingerprint); the image count it was found to hold is not:
    rescoring against the same files replaces the report."""
    from dream.evaluate import report_path

    real = {"source": "folder", "root": "/r", "files": "abc", "cache_name": "c", "images": 9}
    report = {"count": 5, "metrics": {"fid": 1.0}, "real": real, "feature_extractor": EXTRACTOR,
              "feature_extractor_weights": None}
    report_path(tmp_path, report).write_text(json.dumps(report))
    again = {**report, "real": {**real, "images": 10}}
    assert report_path(tmp_path, again).name == "report-n5.json"


def test_eval_passes_its_flags_on(monkeypatch, capsys):
    """`dream eval` hands the metric list (spaces and empty items dropped), --no-ema, --bf16 and --graphs to
    the evaluation, and prints its one-line summary."""
    from dream.cli import main

    calls = []

    def evaluated(checkpoint, **kwargs):
        calls.append(kwargs)
        return {"metrics": {"fid": 3.25}, "sampler": "ddim", "steps": 5, "eta": 0.0, "count": 6, "seed": 0,
                "step": 9, "report": "r.json"}

    monkeypatch.setattr(evaluate_module, "evaluate", evaluated)
    assert main(["eval", "ckpt.pt", "--metrics", " fid, kid,", "--no-ema", "--bf16", "--graphs", "off",
                 "--real-count", "8", "--count", "6"]) == 0
    assert capsys.readouterr().out == "FID 3.250 on 6 samples (ddim 5 steps, eta 0, seed 0, step 9); report r.json\n"
    [kwargs] = calls
    assert (kwargs["metrics"], kwargs["use_ema"], kwargs["dtype"], kwargs["graphs"], kwargs["real_count"],
            kwargs["count"]) == (("fid", "kid"), False, torch.bfloat16, False, 8, 6)


def test_a_missing_weights_file_of_another_extractor_names_the_flag_for_it(tmp_path):
    missing = tmp_path / "none.bin"
    with pytest.raises(DreamError, match=f"^--extractor-weights {missing}: no such file \\(expected the weights file "
                                         f"of feature extractor '{WEIGHTED}'\\)$"):
        resolve_feature_extractor(WEIGHTED, str(missing))


def test_a_synthetic_real_set_named_for_a_run_on_other_data_is_the_default_synthetic_set():
    """--real synthetic for a run trained on CelebA or a folder is the synthetic set any run without a config of its
    own gets (the default count and seed 0), not one sized and seeded by that run's --data-count and --seed: its
    scores compare with every other such evaluation's."""
    default = resolve_real_set({})
    config = {"data": "celeba", "data_root": "/data", "data_split": "train", "data_count": 12, "seed": 5}
    assert resolve_real_set(config, source="synthetic") == default
    assert default["count"] != config["data_count"] and default["seed"] != config["seed"]
    assert resolve_real_set(config, source="synthetic", count=20) == {**default, "count": 20}


@pytest.mark.parametrize("text", ["{}", '{"count": "many"}', "[12]"])
def test_a_real_count_file_without_a_count_is_damaged(tmp_path, text):
    """<cache name>-count.json that parses as JSON but holds no integer count is deleted like a cut-short one
    (prepare_real_set reads its "count"): the real set is counted again, not a KeyError after the checks."""
    from dream.evaluate import discard_damaged_cache

    count_file = tmp_path / "key-count.json"
    count_file.write_text(text)
    kept = tmp_path / "other-count.json"  # another real set's: not looked at
    kept.write_text(text)
    with pytest.warns(UserWarning, match=f"^deleting damaged cache files of the real set, to compute them again: "
                                         f"{re.escape(str(count_file))}$"):
        discard_damaged_cache(tmp_path, "key")
    assert not count_file.exists() and kept.exists()


def test_the_summary_line_gives_each_metric_its_spread_and_ddims_steps():
    """format_report: IS and KID each with their own std over splits/subsets, and the DDIM steps and eta (which
    ddpm does not take: all T steps, eta 1)."""
    from dream.evaluate import format_report

    report = {"metrics": {"fid": 3.25, "isc_mean": 2.5, "isc_std": 0.125, "kid_mean": 0.0125, "kid_std": 0.0025},
              "sampler": "ddim", "steps": 20, "eta": 0.5, "count": 6, "seed": 2, "step": 9, "report": "r.json"}
    assert format_report(report) == ("FID 3.250, IS 2.500 ± 0.125, KID 0.01250 ± 0.00250 on 6 samples "
                                     "(ddim 20 steps, eta 0.5, seed 2, step 9); report r.json")
    ddpm = format_report({**report, "sampler": "ddpm", "steps": 1000, "eta": 1.0})
    assert "(ddpm, seed 2, step 9)" in ddpm and "1000" not in ddpm


@pytest.mark.parametrize("metrics, message", [
    ((), "--metrics names none"),  # `--metrics ,`: nothing to score after hours of sampling
    (("fid", "is", "lpips"), "unknown metrics is, lpips"),
])
def test_a_metric_list_of_none_or_of_unknown_metrics_is_refused_before_anything_is_loaded(tmp_path, monkeypatch,
                                                                                         metrics, message):
    """An empty or unknown --metrics is one line before the model, the extractor or the real set is loaded (not
    after the sampling)."""
    for name in ("load_sampler_model", "resolve_feature_extractor", "prepare_real_set"):
        monkeypatch.setattr(evaluate_module, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} ran"))
    with pytest.raises(DreamError, match=f"^{message}; choose one or more of fid, isc, kid$"):
        evaluate("ckpt.pt", out=str(tmp_path / "eval"), count=4, device="cpu", metrics=metrics,
                 feature_extractor=EXTRACTOR, cache_dir=tmp_path / "fidelity")
    assert not (tmp_path / "eval").exists()


def test_a_real_folder_capped_at_one_image_fewer_keeps_that_many(tmp_path, monkeypatch):
    """--real-count caps the folder whenever it is below the folder's count, down to one image fewer; a cap at the
    count or above keeps every image."""
    monkeypatch.setenv("DREAM_CACHE", str(tmp_path / "cache"))
    write_faces(tmp_path / "real", 0, 3)
    real = resolve_real_set({"data": "folder"}, root=str(tmp_path / "real"))
    every = load_real_images(real, 16)
    assert every.shape[0] == 3
    assert load_real_images({**real, "count": 2}, 16).shape[0] == 2
    for count in (3, 4):
        assert torch.equal(load_real_images({**real, "count": count}, 16), every)


def test_a_real_folder_gone_before_it_is_decoded_is_said_to_have_changed(tmp_path, monkeypatch):
    """The folder listed when the evaluation began is gone when its images are to be read: the same one line as
    for any change since the listing, before anything is decoded."""
    import shutil

    monkeypatch.setenv("DREAM_CACHE", str(tmp_path / "cache"))
    write_faces(tmp_path / "real", 0, 3)
    real = resolve_real_set({"data": "folder"}, root=str(tmp_path / "real"))
    shutil.rmtree(tmp_path / "real")
    monkeypatch.setattr(evaluate_module, "load_images", lambda *a, **k: pytest.fail("the real set was decoded"))
    with pytest.raises(DreamError, match=f"^the real set {re.escape(str(tmp_path / 'real'))} changed during the "
                                         f"evaluation"):
        load_real_images(real, 16)


def test_a_sample_of_another_size_is_one_line_before_scoring(tmp_path):
    """A whole PNG of another size in the samples folder (not made again: it ends as a PNG does) is named before
    torch-fidelity sees it, not scored as it is or failed on in one of its batches."""
    checkpoint = make_checkpoint(tmp_path)
    settings = dict(out=str(tmp_path / "eval"), count=2, steps=1, batch_size=2, device="cpu", metrics=("isc",),
                    feature_extractor=EXTRACTOR, cache_dir=tmp_path / "fidelity", isc_splits=1, progress=False)
    evaluate(str(checkpoint), **settings)
    png = image_path(tmp_path / "eval" / "samples", 1)
    write_png(png, torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(DreamError, match=f"^{re.escape(str(png))} is 8×8 pixels, not the set's 16×16"):
        evaluate(str(checkpoint), **settings)
