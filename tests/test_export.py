"""`dream export`: a checkpoint's EMA (or raw) UNet weights as safetensors, which sample and eval read."""
import json

import pytest
import torch

from conftest import make_tiny_checkpoint
from dream.checkpoint import export_weights, load_checkpoint, load_exported, load_model_for_sampling
from dream.cli import main
from dream.errors import DreamError

pytest.importorskip("safetensors")


@pytest.fixture
def checkpoint(tmp_path, one_cpu_thread):
    return make_tiny_checkpoint(tmp_path, step=7)


def outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    x = torch.randn(2, model.config.in_channels, size, size, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([3, 900]))


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_export_round_trip_gives_the_same_model(tmp_path, checkpoint, weights):
    out = tmp_path / f"{weights}.safetensors"
    report = export_weights(checkpoint, out, weights)
    assert report["weights"] == weights and report["step"] == 7 and out.is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # the temp file was renamed
    exported, _, state = load_model_for_sampling(out)
    original, _, _ = load_model_for_sampling(checkpoint, use_ema=weights == "ema")
    assert state["sampled_weights"] == weights and state["step"] == 7
    for name, tensor in original.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    assert torch.equal(outputs(exported), outputs(original))
    source = load_checkpoint(checkpoint)
    assert state["config"] == json.loads(json.dumps(source["config"]))
    assert state["export"]["source_sha256"] and state["export"]["format"] == "dream-unet-1"


def test_ema_and_raw_exports_differ(tmp_path, checkpoint):
    ema = load_exported(export_weights(checkpoint, tmp_path / "a.safetensors", "ema")["out"])["model"]
    raw = load_exported(export_weights(checkpoint, tmp_path / "b.safetensors", "model")["out"])["model"]
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[name], raw[name]) for name in ema)


def test_sample_from_an_export(tmp_path, checkpoint, capsys):
    out = tmp_path / "ema.safetensors"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    assert "ema weights of step 7" in capsys.readouterr().out
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"replaced {out}: ema weights of step 7")
    images = tmp_path / "images"
    assert main(["sample", str(out), "--out", str(images), "--count", "2", "--batch-size", "2", "--steps", "2",
                 "--device", "cpu", "--no-progress"]) == 0
    assert len(list(images.glob("*.png"))) >= 2


def test_export_errors_are_one_line(tmp_path, checkpoint, capsys):
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "weights.pt")]) == 2
    assert "--out must be a file name ending in .safetensors" in capsys.readouterr().err
    out = tmp_path / "ema.safetensors"
    export_weights(checkpoint, out)
    assert main(["sample", str(out), "--out", str(tmp_path / "s"), "--no-ema", "--device", "cpu"]) == 2
    assert "EMA weights only" in capsys.readouterr().err
    taken = tmp_path / "folder.safetensors"
    taken.mkdir()
    assert main(["export", str(checkpoint), "--out", str(taken)]) == 2
    assert f"--out {taken} is a folder; it must be a .safetensors file" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name], "the temp file is removed"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(out.read_bytes()[:1000])
    with pytest.raises(DreamError, match="cannot be read as safetensors"):
        load_exported(truncated)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    with pytest.raises(DreamError, match="not a dream export"):
        load_exported(foreign)


def test_only_an_earlier_export_is_replaced(tmp_path, checkpoint, capsys):
    """Another safetensors file, or any other file, at --out is someone's data: refused before loading
    the checkpoint. An earlier export is replaced, and the line says what it held."""
    from safetensors.torch import save_file

    foreign = tmp_path / "other.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    before = foreign.read_bytes()
    text = tmp_path / "notes.SAFETENSORS"  # the suffix in any case
    text.write_text("my notes")
    for out in (foreign, text):
        assert main(["export", str(checkpoint), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == f"dream export: error: --out {out} exists and is not a dream export; choose another --out " \
                      f"(or delete it)\n", err
    assert foreign.read_bytes() == before and text.read_text() == "my notes"

    out = tmp_path / "weights.SafeTensors"
    assert main(["export", str(checkpoint), "--out", str(out), "--weights", "model"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: model weights of step 7")
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"replaced {out}: ema weights of step 7")
    assert line.rstrip().endswith(f"; it held the model weights of step 7 from {checkpoint.resolve()}")
    assert load_exported(out)["sampled_weights"] == "ema"


def test_an_unwritable_out_folder_is_found_before_loading(tmp_path, checkpoint, capsys, monkeypatch):
    import dream.checkpoint as checkpoint_module

    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(checkpoint_module, "load_checkpoint", lambda *a, **k: pytest.fail("loaded first"))
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "a_file" / "ema.safetensors")]) == 2
    assert capsys.readouterr().err == (f"dream export: error: --out {tmp_path / 'a_file' / 'ema.safetensors'}: "
                                       f"{tmp_path / 'a_file'} exists and is not a folder\n")


def test_a_damaged_export_is_one_line_and_an_export_without_a_digest_still_loads(tmp_path, checkpoint, capsys):
    """The export records a SHA-256 of its tensors; a byte flipped in the last tensor (where a header check
    cannot see it) is refused when the file is read, in one line naming the source to export again from."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    out = tmp_path / "ema.safetensors"
    export_weights(checkpoint, out)
    intact = load_exported(out)["model"]
    data = bytearray(out.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's values
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    with pytest.raises(DreamError, match=rf"^{damaged} is damaged: its tensors do not match the SHA-256 recorded "
                                         rf"when it was exported; export it again from its checkpoint \(.*\)$"):
        load_exported(damaged)
    assert main(["sample", str(damaged), "--out", str(tmp_path / "s"), "--count", "2", "--batch-size", "2",
                 "--steps", "1", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is damaged" in err, err

    with safe_open(str(out), framework="pt") as f:  # an export made before the digest was recorded
        metadata = {key: value for key, value in f.metadata().items() if key != "tensors_sha256"}
    older = tmp_path / "older.safetensors"
    save_file(load_file(str(out)), str(older), metadata=metadata)
    assert all(torch.equal(load_exported(older)["model"][name], tensor) for name, tensor in intact.items())
