"""Built-in synthetic faces; image folders: bad files, EXIF orientation, excluded run folders, symlinked
folders, Pillow's warnings; CelebA errors; device batches."""
import json
import warnings

import pytest
import torch
from PIL import Image, ImageOps

from dream.data import DeviceBatches, list_image_files, load_images, synthetic_faces
from dream.errors import DreamError


def test_synthetic_faces_are_deterministic_per_index():
    a = synthetic_faces(300, seed=4)
    assert a.shape == (300, 3, 64, 64) and a.dtype == torch.uint8
    assert torch.equal(a[:10], synthetic_faces(10, seed=4))  # image i depends on (seed, i) only
    assert not torch.equal(a[256:266], a[:10])  # each chunk of 256 images has a generator of its own
    assert not torch.equal(a[:10], synthetic_faces(10, seed=5))
    assert a.float().std() > 30  # not flat
    assert synthetic_faces(3, size=16).shape == (3, 3, 16, 16)


def test_a_synthetic_set_is_refused_when_the_processes_of_this_machine_together_would_not_fit(tmp_path, monkeypatch):
    """Under torchrun every training process on a machine holds the whole set: LOCAL_WORLD_SIZE of them must fit
    together. (dream eval's rank 0 alone loads its real set: one.)"""
    import os

    from dream.data import check_fits_in_memory
    from dream.train import TrainConfig, Trainer

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    share = total // 3 + 1  # one or two processes' sets fit, three do not
    check_fits_in_memory(share, "the set")
    check_fits_in_memory(share, "the set", processes=2)
    with pytest.raises(DreamError, match=r"^the set take [\d,.]+ GB in each of the 3 processes on this machine, "
                                         r"more than this machine's [\d,.]+ GB of memory$"):
        check_fits_in_memory(share, "the set", processes=3)

    def no_loading(*args, processes=1, **kwargs):
        raise DreamError(f"loaded by {processes}")

    monkeypatch.setattr("dream.train.load_images", no_loading)
    for local_world_size, processes in (("", 1), ("3", 3)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
        with pytest.raises(DreamError, match=f"^loaded by {processes}$"):
            Trainer(TrainConfig(preset="tiny", run_dir=str(tmp_path / "run"), device="cpu", sample_every=0,
                                progress=False))


def write_images(folder, count, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        colour = (i * 40 % 256, 100, 200)
        Image.new("RGB", size, colour).save(folder / f"img{i}.png")


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG (PIL mode I;16) holds levels 0..65535: scaled by 1/257, not clipped at 255 (all white)."""
    import numpy as np

    levels = (np.arange(40 * 30).reshape(30, 40) * 54).astype(np.uint16)  # 0 .. 64746, a ramp
    (tmp_path / "imgs").mkdir()
    Image.fromarray(levels).save(tmp_path / "imgs" / "deep.png")
    assert Image.open(tmp_path / "imgs" / "deep.png").mode.startswith("I")
    write_images(tmp_path / "imgs", 1)
    images = load_images("folder", str(tmp_path / "imgs"), size=16, cache_dir=tmp_path / "cache")
    deep = images[0].float()  # deep.png sorts before img0.png
    expected = levels[:, 5:35].mean() / 257  # the centre square crop, averaged
    assert torch.equal(deep[0], deep[1]) and torch.equal(deep[0], deep[2])
    assert deep.mean().item() == pytest.approx(expected, abs=2) and deep.min() < 60 and deep.max() > 190


def test_sixteen_bit_levels_round_onto_0_to_255_with_white_kept_white():
    """Level v decodes to round(v / 257): 65535 is 255 (white), not 256 wrapped round to black."""
    import numpy as np

    from dream.data import as_rgb

    levels = np.array([[0, 128, 257, 32896, 65407, 65535]], dtype=np.uint16)
    rgb = np.asarray(as_rgb(Image.fromarray(levels)))
    assert rgb[..., 0].tolist() == [[0, 0, 1, 128, 255, 255]] and (rgb == rgb[..., :1]).all()


def _tiff_of_32_bit_levels(path, levels, signed: bool, exif=None) -> None:
    """levels (int64, within int32 or uint32) as a 32-bit greyscale TIFF with SampleFormat 2 (signed) or 1
    (unsigned). Pillow writes mode I as signed: an unsigned file is that file with its SampleFormat entry set."""
    import numpy as np

    stored = levels.astype(np.int32 if signed else np.uint32).view(np.int32)
    Image.fromarray(stored, mode="I").save(path, exif=exif or Image.Exif())
    data = bytearray(path.read_bytes())
    entry = bytes([0x53, 0x01, 3, 0, 1, 0, 0, 0, 2, 0])  # little-endian IFD entry: tag 339, SHORT, 1 value, 2
    assert data.count(entry) == 1
    if not signed:
        at = data.index(entry)
        data[at + 8] = 1
        path.write_bytes(data)
    with Image.open(path) as image:
        assert image.mode == "I" and image.tag_v2[258] == (32,) and image.tag_v2[339] == (1 + signed,)


@pytest.mark.parametrize("signed", [False, True])
def test_thirty_two_bit_tiff_is_scaled_from_its_own_range(tmp_path, signed):
    """A 32-bit integer TIFF holds levels 0 .. 2^32 - 1 (signed: 2^31 - 1, negative levels black): scaled from
    that range, not clipped as if 16-bit (all white). Read from the tags of the file, also when it is turned
    by its EXIF orientation."""
    import numpy as np

    top = 2 ** (32 - signed) - 1
    rng = np.random.default_rng(3)
    levels = rng.integers(65536, top, size=(30, 40), dtype=np.int64, endpoint=True)
    levels[0, :3] = [0, top, top // 2]
    if signed:
        levels[1, :2] = [-1, -(2 ** 31)]
    (tmp_path / "imgs").mkdir()
    _tiff_of_32_bit_levels(tmp_path / "imgs" / "deep.tif", levels, signed)
    images = load_images("folder", str(tmp_path / "imgs"), size=30, cache_dir=tmp_path / "cache")
    expected = np.rint(levels[:, 5:35].clip(0, None) * 255 / top)  # the centre square, no resize at 30 px
    assert images.shape == (1, 3, 30, 30) and torch.equal(images[0, 0], images[0, 2])
    assert torch.equal(images[0, 0], torch.from_numpy(expected).to(torch.uint8))

    from dream.data import as_rgb, integer_depth, upright

    exif = Image.Exif()
    exif[0x0112] = 3  # Orientation: turned by 180 degrees
    _tiff_of_32_bit_levels(tmp_path / "turned.tif", levels, signed, exif)
    with Image.open(tmp_path / "turned.tif") as image:
        assert integer_depth(image) == (32, signed)
        rgb = np.asarray(as_rgb(upright(image), integer_depth(image)))
    assert rgb[..., 0].tolist() == np.rint(levels[::-1, ::-1].clip(0, None) * 255 / top).tolist()


def test_sixteen_bit_levels_in_a_thirty_two_bit_tiff_are_scaled_as_sixteen_bit(tmp_path):
    """Pillow saves mode I as a 32-bit TIFF: a 16-bit image converted to I and saved so holds levels 0..65535,
    all black if scaled from the 32-bit range. Such an image decodes as the 16-bit one it came from."""
    import numpy as np

    from dream.data import as_rgb, integer_depth

    levels = (np.arange(40 * 30).reshape(30, 40) * 54).astype(np.uint16)  # 0 .. 64746, a ramp
    Image.fromarray(levels).convert("I").save(tmp_path / "deep.tif")
    with Image.open(tmp_path / "deep.tif") as image:
        assert integer_depth(image) == (32, True)
        rgb = np.asarray(as_rgb(image, integer_depth(image)))
    assert rgb[..., 0].tolist() == np.rint(levels / 257).tolist() and rgb[..., 0].max() == 252


@pytest.mark.parametrize("top", [1.0, 255.0])
def test_float_greyscale_is_scaled_from_0_1_and_clipped_from_0_255(tmp_path, top):
    """A float TIFF (PIL mode F) holds levels in [0, 1] or in [0, 255]: PIL's own conversion rounds the first to
    black. NaN decodes black."""
    import numpy as np

    levels = (np.arange(40 * 30).reshape(30, 40) / (40 * 30 - 1) * top).astype(np.float32)  # 0 .. top, a ramp
    levels[0, :] = np.nan
    (tmp_path / "imgs").mkdir()
    Image.fromarray(levels, mode="F").save(tmp_path / "imgs" / "float.tif")
    assert Image.open(tmp_path / "imgs" / "float.tif").mode == "F"
    images = load_images("folder", str(tmp_path / "imgs"), size=30, cache_dir=tmp_path / "cache")
    expected = np.rint(np.nan_to_num(levels[:, 5:35]) * 255 / top)  # the centre square, no resize at 30 px
    assert images.shape == (1, 3, 30, 30) and torch.equal(images[0, 0], images[0, 2])
    assert torch.equal(images[0, 0], torch.from_numpy(expected).to(torch.uint8))
    levels[1, 5], levels[1, 6] = np.inf, -np.inf  # the range is the finite values': +inf white, -inf black
    Image.fromarray(levels, mode="F").save(tmp_path / "imgs" / "float.tif")
    images = load_images("folder", str(tmp_path / "imgs"), size=30, cache_dir=tmp_path / "cache-inf")
    expected[1, 0], expected[1, 1] = 255, 0
    assert torch.equal(images[0, 0], torch.from_numpy(expected).to(torch.uint8))


def test_folder_with_isolated_corrupt_files(tmp_path):
    write_images(tmp_path / "imgs" / "sub", 5)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "imgs" / "notes.txt").write_text("ignored: not an image extension")
    with pytest.warns(UserWarning, match="skipped 1 of 6 .*: broken.jpg$"):
        images = load_images("folder", str(tmp_path / "imgs"), size=16, cache_dir=tmp_path / "cache")
    assert images.shape == (5, 3, 16, 16)
    assert images[1, 0].float().mean().item() == pytest.approx(40, abs=1)
    with pytest.warns(UserWarning, match="skipped 1 of 6 .*: broken.jpg$"):  # the file is still skipped
        cached = load_images("folder", str(tmp_path / "imgs"), size=16, cache_dir=tmp_path / "cache")
    assert torch.equal(images, cached)


def test_skipped_files_are_named_on_one_line_also_from_the_cache(tmp_path, monkeypatch):
    """The warning names the first five skipped files relative to the data root and counts the rest; the
    cache keeps the list, so a load that decodes nothing repeats the same warning."""
    import dream.data

    root = tmp_path / "imgs"
    write_images(root, 2)
    (root / "bad").mkdir()
    for name in ["a\nb.jpg"] + [f"x{i}.jpg" for i in range(6)]:
        (root / "bad" / name).write_bytes(b"not an image")
    expected = (f"skipped 7 of 9 files in {root.resolve()} that could not be read as images: "
                "'bad/a\\nb.jpg', bad/x0.jpg, bad/x1.jpg, bad/x2.jpg, bad/x3.jpg and 2 more")
    with pytest.warns(UserWarning) as first:
        images = load_images("folder", str(root), size=16, cache_dir=tmp_path / "cache")
    assert [str(w.message) for w in first] == [expected] and images.shape[0] == 2
    monkeypatch.setattr(dream.data, "decode_files", lambda *args, **kwargs: pytest.fail("decoded again"))
    with pytest.warns(UserWarning) as cached:
        assert torch.equal(load_images("folder", str(root), size=16, cache_dir=tmp_path / "cache"), images)
    assert [str(w.message) for w in cached] == [expected]


def test_images_are_decoded_as_displayed_by_their_exif_orientation(tmp_path):
    """A phone JPEG stored 80x60 with EXIF Orientation 6 is displayed 60x80, turned a quarter clockwise:
    it is decoded that way up. A damaged EXIF block loses only the orientation, not the file."""
    shown = Image.new("RGB", (60, 80), (0, 0, 255))
    shown.paste((255, 0, 0), (0, 0, 60, 40))  # red top half, as displayed
    stored = shown.transpose(Image.Transpose.ROTATE_90)  # as the camera wrote it: 80x60, red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    (tmp_path / "imgs").mkdir()
    stored.save(tmp_path / "imgs" / "a-phone.jpg", exif=exif)
    exif[0x010F] = "Maker"  # Make; then retyped below as Compression, which must hold a number
    damaged = exif.tobytes().replace(b"\x01\x0f\x00\x02", b"\x01\x03\x00\x02")
    stored.save(tmp_path / "imgs" / "b-damaged.jpg", exif=damaged)
    with Image.open(tmp_path / "imgs" / "b-damaged.jpg") as image, pytest.raises(Exception):
        ImageOps.exif_transpose(image)  # the damage is real: Pillow's own transpose fails on it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no file skipped
        phone, kept = load_images("folder", str(tmp_path / "imgs"), size=16, cache_dir=tmp_path / "cache").float()
    assert phone[0, :6].mean() > 200 and phone[2, :6].mean() < 50  # top rows red
    assert phone[2, -6:].mean() > 200 and phone[0, -6:].mean() < 50  # bottom rows blue
    assert kept[0, :, :6].mean() > 200 and kept[2, :, -6:].mean() > 200  # as stored: red left, blue right


def test_palette_transparency_decodes_without_pillow_warnings(tmp_path):
    """Pillow warns when a palette image with per-entry transparency becomes RGB; the user cannot act on
    that, so decoding shows no warning."""
    image = Image.new("P", (40, 30), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    (tmp_path / "imgs").mkdir()
    image.save(tmp_path / "imgs" / "palette.png", transparency=bytes([0, 128]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = load_images("folder", str(tmp_path / "imgs"), size=16, cache_dir=tmp_path / "cache")
    assert [str(w.message) for w in caught] == []
    assert images.shape == (1, 3, 16, 16) and images[0, 0].min() == 255 and images[0, 1:].max() == 0


def test_a_run_folder_inside_the_data_folder_is_excluded(tmp_path):
    """`--run-dir faces/run1` inside `--data-root faces`: the run's sample grids are not training images.
    Excluded folders compare as resolved paths, and one that does not exist yet is fine."""
    from dream.data import dataset_files

    root, run = tmp_path / "faces", tmp_path / "faces" / "run1"
    write_images(root, 3)
    write_images(run / "samples", 1)
    (tmp_path / "run-link").symlink_to(run)
    cache = tmp_path / "cache"
    assert load_images("folder", str(root), size=16, cache_dir=cache, exclude=[run]).shape[0] == 3
    assert load_images("folder", str(root), size=16, cache_dir=cache, exclude=[tmp_path / "run-link"]).shape[0] == 3
    assert load_images("folder", str(root), size=16, cache_dir=cache, exclude=[root / "run2"]).shape[0] == 4
    files, _, _ = dataset_files("folder", root, exclude=[run])
    assert [f.relative_to(root).as_posix() for f in files] == ["img0.png", "img1.png", "img2.png"]
    with pytest.raises(DreamError, match=f"holds no image files .* outside {tmp_path / 'faces'}$"):
        list_image_files(run, exclude=[root])


def test_symlinked_folders_are_followed_and_a_cycle_ends(tmp_path):
    root = tmp_path / "faces"
    write_images(root, 1)
    write_images(tmp_path / "elsewhere" / "more", 2)
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere" / "loop").symlink_to(root, target_is_directory=True)  # faces/linked/loop is faces
    files = list_image_files(root)
    assert [f.relative_to(root).as_posix() for f in files] == ["img0.png", "linked/more/img0.png",
                                                              "linked/more/img1.png"]
    assert list_image_files(root) == files


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("empty", "holds no image files"),
    ("all_bad", "could be read"),
    ("file", "not a folder"),
])
def test_folder_errors_name_the_path(tmp_path, case, message):
    root = tmp_path / "data"
    if case == "empty":
        root.mkdir()
    elif case == "all_bad":
        root.mkdir()
        (root / "a.png").write_bytes(b"garbage")
    elif case == "file":
        root.write_text("x")
    with pytest.raises(DreamError, match=message) as error:
        load_images("folder", str(root), size=16, cache_dir=tmp_path / "cache")
    assert str(root) in str(error.value) or case == "all_bad"
    assert "\n" not in str(error.value)


def test_celeba_missing_is_one_clear_line(tmp_path):
    with pytest.raises(DreamError, match="CelebA not found under") as error:
        load_images("celeba", str(tmp_path), cache_dir=tmp_path / "cache")
    assert str(tmp_path) in str(error.value)
    assert "download=True" not in str(error.value)  # torchvision's advice: not an option of ours


def test_unknown_source_and_missing_root():
    with pytest.raises(DreamError, match="unknown data source"):
        load_images("imagenet")
    with pytest.raises(DreamError, match="needs --data-root"):
        load_images("folder")


def test_device_batches_order_flip_and_sharding():
    images = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    images[:, :, :, 1] = 255  # left column holds the index, right column is white: flips are visible
    batches = DeviceBatches(images, batch_size=3, device="cpu", seed=1)
    assert len(batches) == 3
    epoch0 = list(batches.epoch(0))
    assert all(b.shape == (3, 3, 2, 2) and b.min() >= -1 and b.max() <= 1 for b in epoch0)
    again = list(batches.epoch(0))
    assert all(torch.equal(a, b) for a, b in zip(epoch0, again))
    resumed = list(batches.epoch(0, start_batch=1))
    assert all(torch.equal(a, b) for a, b in zip(epoch0[1:], resumed))
    order, flips = batches.epoch_order(0)
    assert not torch.equal(order, batches.epoch_order(1)[0])
    for x, index in zip(epoch0[0], order[:3]):
        value = index.item() / 127.5 - 1
        column = 1 if flips[index] else 0
        assert x[0, 0, column].item() == pytest.approx(value)
    ranks = [DeviceBatches(images, 2, "cpu", seed=1, rank=r, world_size=2) for r in range(2)]
    shards = [r.epoch_order(0)[0] for r in ranks]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="images on the host beside a CUDA device"))])
def test_images_kept_on_the_host_give_the_same_batches_bit_for_bit(device):
    """--data-on host: each batch gathered on the host and copied over as uint8, then scaled and flipped on the
    device, as the batches of images kept there."""
    images = synthetic_faces(12, size=8)
    kept = DeviceBatches(images, batch_size=4, device=device, seed=3)
    on_host = DeviceBatches(images, batch_size=4, device=device, seed=3, on_device=False)
    assert kept.on_device and kept.images.device.type == device and on_host.images.device.type == "cpu"
    assert on_host.on_device == (device == "cpu")
    for epoch in range(2):
        for a, b in zip(kept.epoch(epoch), on_host.epoch(epoch), strict=True):
            assert a.device.type == b.device.type == device and torch.equal(a, b)
    on_host.move_to_device()
    assert on_host.on_device and on_host.images.device.type == device


@pytest.mark.parametrize("world_size, batch_size, batches", [(1, 10, 1), (2, 2, 2), (3, 3, 1), (3, 1, 3), (4, 2, 1)])
def test_every_rank_gets_the_same_number_of_full_batches_of_its_own_images(world_size, batch_size, batches):
    """Each rank's epoch is (N // world_size) // batch_size full batches (ranks that differ would hang DDP), and
    no image is in two ranks' batches."""
    images = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    seen = []
    for rank in range(world_size):
        shard = DeviceBatches(images, batch_size, "cpu", seed=2, flip=False, rank=rank, world_size=world_size)
        epoch = list(shard.epoch(0))
        assert len(shard) == len(epoch) == batches and all(b.shape == (batch_size, 3, 2, 2) for b in epoch)
        seen += [round(v) for b in epoch for v in ((b[:, 0, 0, 0] + 1) * 127.5).tolist()]  # back to the index
    assert len(set(seen)) == len(seen) == world_size * batches * batch_size


def test_device_batches_rejects_too_small_a_dataset():
    with pytest.raises(DreamError, match="needs at least 8 images"):
        DeviceBatches(torch.zeros(5, 3, 2, 2, dtype=torch.uint8), batch_size=8, device="cpu")


def test_celeba_crop_is_the_ddim_box():
    """The 128x128 box at (row 57, col 25) of a 178x218 aligned image, centred on (x=89, y=121)."""
    from dream.data import CELEBA_CROP, _crop_resize

    top, left, height, width = CELEBA_CROP
    assert (left + width / 2, top + height / 2) == (89, 121)
    image = Image.new("RGB", (178, 218), (255, 0, 0))
    image.paste((0, 0, 255), (left, top, left + width, top + height))  # the box in blue
    out = _crop_resize(image, 64, CELEBA_CROP)
    assert out.shape == (3, 64, 64)
    assert out[2].min() >= 250 and out[0].max() <= 5  # only the blue box survives


def test_crops_are_resized_with_pillows_bicubic_filter():
    """Pixel for pixel: the CelebA box, and a folder image's centre square, resized by PIL's bicubic filter
    (a change here changes every cached dataset: raise DECODE_VERSION)."""
    import numpy as np

    from dream.data import CELEBA_CROP, _crop_resize

    noise = np.random.default_rng(0).integers(0, 256, (218, 178, 3), dtype=np.uint8)  # any shift or filter shows
    image = Image.fromarray(noise)
    top, left, height, width = CELEBA_CROP
    expected = image.crop((left, top, left + width, top + height)).resize((64, 64), Image.Resampling.BICUBIC)
    assert torch.equal(_crop_resize(image, 64, CELEBA_CROP), torch.from_numpy(np.array(expected)).permute(2, 0, 1))
    wide = Image.fromarray(noise[:40, :60])  # 60x40: the centre square is columns 10..49
    expected = wide.crop((10, 0, 50, 40)).resize((16, 16), Image.Resampling.BICUBIC)
    assert torch.equal(_crop_resize(wide, 16), torch.from_numpy(np.array(expected)).permute(2, 0, 1))


def test_the_files_fingerprint_sees_a_rewrite_by_its_time_or_by_its_size(tmp_path):
    """The decoded-image caches are keyed on it: a file rewritten at the same size (a new time), or with its
    time kept (cp -p, an archive unpacked again) at another size, is decoded again."""
    import os

    from dream.data import files_fingerprint

    path = tmp_path / "a.png"
    path.write_bytes(b"x" * 100)
    first = files_fingerprint([path])
    times = path.stat().st_atime_ns, path.stat().st_mtime_ns
    os.utime(path, ns=(times[0], times[1] + 10**9))  # same size, a new time
    rewritten = files_fingerprint([path])
    path.write_bytes(b"y" * 101)
    os.utime(path, ns=times)  # the first time kept, another size
    assert len({first, rewritten, files_fingerprint([path])}) == 3


def test_folder_cache_follows_the_files_contents(tmp_path):
    """The decoded cache is keyed on every file's path, size and modification time: an image rewritten
    under the same name, or one added, is decoded again instead of served from the old cache."""
    import os

    write_images(tmp_path / "imgs", 3)
    first = load_images("folder", str(tmp_path / "imgs"), size=16, cache_dir=tmp_path / "cache")
    rewritten = tmp_path / "imgs" / "img1.png"
    Image.new("RGB", (40, 30), (7, 7, 7)).save(rewritten)
    os.utime(rewritten, ns=(rewritten.stat().st_atime_ns, rewritten.stat().st_mtime_ns + 10**9))
    second = load_images("folder", str(tmp_path / "imgs"), size=16, cache_dir=tmp_path / "cache")
    assert torch.equal(second[[0, 2]], first[[0, 2]]) and second[1].float().mean().item() == pytest.approx(7, abs=1)
    Image.new("RGB", (40, 30), (9, 9, 9)).save(tmp_path / "imgs" / "img9.png")
    assert load_images("folder", str(tmp_path / "imgs"), size=16, cache_dir=tmp_path / "cache").shape[0] == 4
    assert len(list((tmp_path / "cache").glob("folder-16px-*.pt"))) == 3


@pytest.mark.parametrize("change", ["decode version", "decoder release"])
def test_a_cache_made_by_older_decoding_is_not_served(tmp_path, monkeypatch, change):
    """The key holds DECODE_VERSION and the Pillow and torchvision versions: a cache written before decoding
    changed (for example, 16-bit images once clipped, or a new release's resampling) is decoded again."""
    import dream.data
    from dream.data import images_digest

    write_images(tmp_path / "imgs", 2)
    old = load_images("folder", str(tmp_path / "imgs"), size=16, cache_dir=tmp_path / "cache")
    [cache] = (tmp_path / "cache").glob("folder-16px-*.pt")
    zeros = torch.zeros_like(old)  # what an older decoder would have made
    key = torch.load(cache, weights_only=True)["key"]
    torch.save({"images": zeros, "skipped": [], "key": key, "files": 2, "sha1": images_digest(zeros)}, cache)
    assert torch.equal(load_images("folder", str(tmp_path / "imgs"), size=16, cache_dir=tmp_path / "cache"),
                       torch.zeros_like(old))  # same version: served from the cache
    if change == "decode version":
        monkeypatch.setattr(dream.data, "DECODE_VERSION", dream.data.DECODE_VERSION + 1)
    else:
        monkeypatch.setattr(dream.data, "DECODERS", ("Pillow", "torch"))  # torchvision's version becomes torch's
    assert torch.equal(load_images("folder", str(tmp_path / "imgs"), size=16, cache_dir=tmp_path / "cache"), old)
    assert len(list((tmp_path / "cache").glob("folder-16px-*.pt"))) == 2


def test_images_digest_sees_one_changed_byte_and_the_shape():
    from dream.data import images_digest

    images = synthetic_faces(5, size=8)
    assert images_digest(images) == images_digest(images.clone())
    changed = images.clone()
    changed[3, 1, 4, 5] ^= 1
    assert images_digest(changed) != images_digest(images)
    assert images_digest(images.reshape(5, 3, 4, 16)) != images_digest(images)
    assert images_digest(images.to(memory_format=torch.channels_last)) == images_digest(images)  # bytes in NCHW order


def test_images_are_hashed_once_until_written_to(tmp_path, monkeypatch):
    """Loading checks the cache's SHA-1 and the trainer digests the same tensor: CelebA's 2 GB hashed once."""
    import dream.data as data

    hashed = []
    sha1 = data.hashlib.sha1
    monkeypatch.setattr(data.hashlib, "sha1", lambda *a: hashed.append(a) or sha1(*a))
    write_images(tmp_path / "imgs", 3)
    for load in range(2):  # decoded and cached, then read back from the cache
        images = load_images("folder", str(tmp_path / "imgs"), size=8, cache_dir=tmp_path / "cache")
        hashed.clear()
        digest = data.images_digest(images)
        assert not hashed and digest == data.images_digest(images.clone())
    view = images[1:]
    before = data.images_digest(view)
    images[2, 0, 0, 0] ^= 1  # through the base: the view's version counter moves too
    assert data.images_digest(view) != before
    assert data.images_digest(view) == data.images_digest(view.clone())
    with torch.inference_mode():  # no version counter to remember a digest by: loading still works
        hashed.clear()
        again = load_images("folder", str(tmp_path / "imgs"), size=8, cache_dir=tmp_path / "cache")
        assert again.is_inference() and data.images_digest(again) == digest and hashed
        fresh = load_images("folder", str(tmp_path / "imgs"), size=8, cache_dir=tmp_path / "cache2")
        assert data.images_digest(fresh) == digest


def test_a_damaged_foreign_or_old_image_cache_is_decoded_again_with_a_warning(tmp_path):
    """torch.load does not check a zip member's CRC: flipped bytes in the images would be trained on. The
    cache holds the images' SHA-1 and its full key (the files' names, sizes and times), and a cache that does
    not match is replaced; so is an older release's, whose pixels cannot be checked."""
    from dream.data import images_digest

    write_images(tmp_path / "imgs", 3)
    write_images(tmp_path / "other", 4)
    fresh = load_images("folder", str(tmp_path / "imgs"), size=16, cache_dir=tmp_path / "cache")
    [cache] = (tmp_path / "cache").glob("folder-16px-*.pt")
    good = cache.read_bytes()

    def reload(why):
        with pytest.warns(UserWarning, match=f"image cache {cache} is {why}; decoding again"):
            assert torch.equal(load_images("folder", str(tmp_path / "imgs"), size=16, cache_dir=tmp_path / "cache"),
                               fresh)
        assert cache.read_bytes() != damaged  # replaced by a good one
        assert torch.equal(load_images("folder", str(tmp_path / "imgs"), size=16, cache_dir=tmp_path / "cache"),
                           fresh)

    data = torch.load(cache, weights_only=True)
    data["images"][1, 2, 3, 4] ^= 0x40  # one flipped bit in the pixels, the stored SHA-1 unchanged
    torch.save(data, cache)
    damaged = cache.read_bytes()
    reload(r"damaged \(its checksum does not match\)")
    load_images("folder", str(tmp_path / "other"), size=16, cache_dir=tmp_path / "other-cache")
    [other] = (tmp_path / "other-cache").glob("*.pt")
    cache.write_bytes(damaged := other.read_bytes())  # another set's cache under this set's name
    reload("made from other files")
    write_images(tmp_path / "same-count", 3, size=(30, 40))  # 3 files too, other pixels
    load_images("folder", str(tmp_path / "same-count"), size=16, cache_dir=tmp_path / "same-count-cache")
    [other] = (tmp_path / "same-count-cache").glob("*.pt")
    cache.write_bytes(damaged := other.read_bytes())  # a sound cache of another set of as many files
    reload("made from other files")
    torch.save({"images": fresh, "skipped": []}, cache)  # the format of an older release: no checksum
    damaged = cache.read_bytes()
    reload(r"from an older release of dream \(no checksum\)")
    assert torch.load(cache, weights_only=True)["sha1"] == images_digest(fresh) and good


def test_folders_dream_wrote_images_into_are_left_out_of_a_folder_scan(tmp_path):
    """Another run's sample grids, or a sample set (dream sample, dream eval) saved under the data folder,
    are no training data; they are named in one warning."""
    root = tmp_path / "faces"
    write_images(root / "people", 3)
    run_config = json.dumps({"preset": "tiny", "objective": "seed", "batch_size": 8, "run_dir": "run1"})
    write_images(root / "run1" / "samples", 2)  # a training run: its config.json beside samples/
    (root / "run1" / "config.json").write_text(run_config)
    write_images(root / "eval" / "samples", 2)  # a sample set: sampling.json beside the PNGs
    (root / "eval" / "samples" / "sampling.json").write_text(json.dumps({"sampler": "ddim", "seed": 0}))
    write_images(root / "config-only", 1)  # a config.json alone is anybody's
    (root / "config-only" / "config.json").write_text(run_config)
    write_images(root / "theirs" / "samples", 1)  # someone's own config.json beside samples/ of photos
    (root / "theirs" / "config.json").write_text(json.dumps({"camera": "x"}))
    (root / "theirs" / "sampling.json").write_text("not dream's")
    with pytest.warns(UserWarning) as caught:
        files = list_image_files(root)
    assert [f.relative_to(root).as_posix() for f in files] == ["config-only/img0.png", "people/img0.png",
                                                              "people/img1.png", "people/img2.png",
                                                              "theirs/samples/img0.png"]
    assert [str(w.message) for w in caught] == [
        f"left out 2 folder(s) under {root} that dream wrote images into (runs, sample sets): eval/samples, run1"]
    with pytest.warns(UserWarning), pytest.raises(DreamError, match="holds no image files .* outside the folders "
                                                                    "dream wrote"):
        list_image_files(root / "eval")
    sample_set = root / "eval" / "samples"
    for i in range(2):
        write_images(sample_set / "x", 1)
        (sample_set / "x" / "img0.png").rename(sample_set / f"{i:06d}.png")
    (sample_set / "x").rmdir()
    (sample_set / "grid.png").write_bytes((sample_set / "000000.png").read_bytes())
    # asked for by name (a sample set scored as the real set): its numbered images, not its grid or others
    assert [f.name for f in list_image_files(sample_set)] == ["000000.png", "000001.png"]


def test_a_file_name_that_is_not_utf8_is_no_error(tmp_path):
    import os

    write_images(tmp_path / "imgs", 2)
    os.rename(tmp_path / "imgs" / "img1.png", os.fsdecode(bytes(tmp_path / "imgs") + b"/caf\xe9.png"))
    assert load_images("folder", str(tmp_path / "imgs"), size=16, cache_dir=tmp_path / "cache").shape[0] == 2


@pytest.mark.parametrize("other_size", [(89, 109), (356, 436)])
def test_a_celeba_image_of_another_size_is_named_not_cropped_wrongly(tmp_path, other_size):
    """The crop box is for the aligned 178×218 images: a smaller image would be padded with black, a larger
    one (an in-the-wild img_celeba image, say) cropped at the wrong place."""
    from dream.data import CELEBA_CROP, CELEBA_IMAGE_SIZE, decode_files

    write_images(tmp_path / "aligned", 2, size=(178, 218))
    write_images(tmp_path / "other", 1, size=other_size)
    paths = sorted((tmp_path / "aligned").glob("*.png")) + [tmp_path / "other" / "img0.png"]
    assert decode_files(paths[:2], 16, CELEBA_CROP, image_size=CELEBA_IMAGE_SIZE)[0].shape == (2, 3, 16, 16)
    width, height = other_size
    with pytest.raises(DreamError, match=f"^{tmp_path / 'other' / 'img0.png'} is {width}×{height} pixels, and 1 of "
                                         r"the 3 images of images are like it: the crop box \(128×128 at row 57, "
                                         r"column 25\) is for the 178×218 aligned CelebA images \(img_align_celeba\)$"):
        decode_files(paths, 16, CELEBA_CROP, image_size=CELEBA_IMAGE_SIZE)


def test_celeba_setup_problems_name_the_file(tmp_path):
    root = tmp_path / "data"
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    lists = ["list_eval_partition.txt", "identity_CelebA.txt", "list_attr_celeba.txt", "list_bbox_celeba.txt",
             "list_landmarks_align_celeba.txt"]
    for name in lists:
        (folder / name).write_text("000001.jpg 0\r\n")  # not the official contents

    def error():
        with pytest.raises(DreamError) as caught:
            load_images("celeba", str(root), cache_dir=tmp_path / "cache")
        assert "\n" not in str(caught.value)
        return str(caught.value)

    message = error()
    named = message.removeprefix(f"CelebA under {root} is incomplete: ").split(" not the official files (MD5")[0]
    assert sorted(named.split(", ")) == sorted(lists) and "(MD5 differs" in message
    (folder / "identity_CelebA.txt").unlink()
    assert error().startswith(f"CelebA under {root} is incomplete: identity_CelebA.txt missing (expected")
    (folder / "img_align_celeba").rmdir()
    assert error().startswith(f"CelebA under {root} is incomplete: img_align_celeba/, identity_CelebA.txt missing")


def test_a_torchvision_that_fails_to_import_is_one_line(broken_torchvision):
    """PyPI's torchvision beside another torch fails at import with a RuntimeError, not an ImportError."""
    from dream.data import import_torchvision

    with pytest.raises(DreamError, match="^--data celeba needs torchvision, which does not import here \\(operator "
                                         "torchvision::nms does not exist\\); pip install the torchvision release "
                                         "that matches torch [0-9.]+$"):
        import_torchvision("--data celeba")


def test_an_empty_dream_cache_variable_means_the_default(monkeypatch):
    from pathlib import Path

    from dream.data import default_cache_dir

    monkeypatch.setenv("DREAM_CACHE", "")
    assert default_cache_dir() == Path.home() / ".cache" / "dream"
    monkeypatch.setenv("DREAM_CACHE", "~/elsewhere")
    assert default_cache_dir() == Path.home() / "elsewhere"


def test_flips_mirror_each_image_by_its_own_draw_about_half_the_time_and_none_when_off():
    """Every image of an epoch is mirrored by its own draw of the epoch's flip mask (about half of them), none with
    flip=False; the order and flips depend on the seed, and the synthetic set's chunks do too."""
    images = torch.arange(64, dtype=torch.uint8).reshape(64, 1, 1, 1).expand(64, 3, 2, 2).contiguous()
    images[:, :, :, 1] = 255  # left column holds the index, right column is white: a flip puts white on the left
    batches = DeviceBatches(images, batch_size=8, device="cpu", seed=1)
    order, flips = batches.epoch_order(0)
    seen = torch.cat(list(batches.epoch(0)))
    assert torch.equal(((seen[:, 0, 0].min(-1).values + 1) * 127.5).round().long(), order)  # in the epoch's order
    mirrored = seen[:, 0, 0, 0] == 1
    assert torch.equal(mirrored, flips[order]) and 16 < mirrored.sum().item() < 48
    unflipped = torch.cat(list(DeviceBatches(images, batch_size=8, device="cpu", seed=1, flip=False).epoch(0)))
    assert (unflipped[:, 0, 0, 1] == 1).all() and (unflipped[:, 0, 0, 0] < 1).all()
    other_seed = DeviceBatches(images, batch_size=8, device="cpu", seed=2).epoch_order(0)
    assert not torch.equal(other_seed[0], order) and not torch.equal(other_seed[1], flips)
    assert not torch.equal(synthetic_faces(266, seed=4, size=8)[256:], synthetic_faces(10, seed=5, size=8))


def test_image_extensions_are_matched_in_any_case(tmp_path):
    """A camera's IMG_0001.JPG is an image as much as img.jpg: it is not silently left out of the data."""
    write_images(tmp_path / "imgs", 2)
    Image.new("RGB", (40, 30), (9, 9, 9)).save(tmp_path / "imgs" / "CAMERA.JPG")
    Image.new("RGB", (40, 30), (9, 9, 9)).save(tmp_path / "imgs" / "scan.Png")
    assert [path.name for path in list_image_files(tmp_path / "imgs")] == ["CAMERA.JPG", "img0.png", "img1.png",
                                                                          "scan.Png"]
    assert load_images("folder", str(tmp_path / "imgs"), size=8, cache_dir=tmp_path / "cache").shape[0] == 4


def test_a_file_renamed_with_its_size_and_time_kept_is_not_served_from_the_old_cache(tmp_path):
    """A rename keeps a file's size and time: the cache key holds the files' paths too, so the cache made before
    is not served (its skipped-file list would name the old name, its images would be in the old order)."""
    root = tmp_path / "imgs"
    write_images(root, 2)
    (root / "x-broken.jpg").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 .*: x-broken\.jpg$"):
        load_images("folder", str(root), size=8, cache_dir=tmp_path / "cache")
    (root / "x-broken.jpg").rename(root / "y-broken.jpg")
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 .*: y-broken\.jpg$"):
        load_images("folder", str(root), size=8, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("folder-8px-*.pt"))) == 2
