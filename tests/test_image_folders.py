"""Your own images as people keep them: a folder of class folders (train/ and test/, or classes alone),
zipped or tarred, in PNG, JPEG, BMP or GIF of any mode, through download, train, evaluate and infer;
then the bad folders and archives, each refused in one line with nothing written."""
import io
import json
import os
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN_CONFIG, run_task, sha256, write_config
from PIL import Image

import mnist

CLASSES = ("circle", "cross", "square")
FORMATS = (("png", "L"), ("jpeg", "RGB"), ("bmp", "RGB"), ("gif", "P"), ("png", "RGBA"))  # mixed: the set is colour


def picture(k: int, mode: str, size=(8, 8), seed=0) -> Image.Image:
    """Class k lights rows 2k and 2k+1 on noise: learnable, and tiny."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, size, dtype=np.uint8)
    pixels[2 * k:2 * k + 2] = 255
    image = Image.fromarray(pixels).convert("RGB" if mode == "P" else mode)
    return image.quantize(8) if mode == "P" else image


def write_classes(root: Path, per_class: int, formats=FORMATS, size=(8, 8)) -> Path:
    """root/<class>/NAME.FORMAT, formats and modes taken in turn."""
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            ext, mode = formats[i % len(formats)]
            picture(k, mode, size, seed=i).save(root / name / f"{i:02d}.{ext}")
    return root


def add_litter(root: Path) -> None:
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / CLASSES[0] / "Thumbs.db").write_bytes(b"not an image")
    (root / CLASSES[1] / "desktop.ini").write_text("[.ShellClassInfo]")
    (root / CLASSES[1] / ".hidden.png").write_bytes(b"not an image")
    (root / "__MACOSX" / CLASSES[0]).mkdir(parents=True)
    (root / "__MACOSX" / CLASSES[0] / "._00.png").write_bytes(b"resource fork")


def workspace(ws: Path, uri: str, **config) -> Path:
    ws.mkdir(parents=True, exist_ok=True)
    write_config(ws / "data.yaml", {"uri": uri, **config})
    write_config(ws / "train.yaml", {**TRAIN_CONFIG, "batch_size": 8})
    return ws


def npz(ws: Path) -> dict:
    with np.load(ws / "data" / "mnist.npz") as f:
        return {name: f[name] for name in f.files}


def refused(ws: Path, capsys, *named: str) -> str:
    """The download's one error line, which names each of `named`; nothing written in data_dir (what an
    earlier run wrote there is kept as it was)."""
    (ws / "data").mkdir(exist_ok=True)
    before = {path.name: path.read_bytes() for path in (ws / "data").iterdir() if path.name != mnist.LOCK_NAME}
    result = run_task("download", ws, capsys)
    lines = [line for line in result.err.splitlines() if "error:" in line]
    assert result.code == 1 and len(lines) == 1 and "Traceback" not in result.err, result.err
    assert all(name in lines[0] for name in named), lines[0]
    assert {path.name: path.read_bytes() for path in (ws / "data").iterdir() if path.name != mnist.LOCK_NAME} == before
    return lines[0]


def test_a_folder_of_splits_downloads_trains_evaluates_and_infers(tmp_path, capsys):
    for split, count in (("train", 10), ("test", 5)):
        write_classes(tmp_path / "ws" / "pictures" / split, count)
    add_litter(tmp_path / "ws" / "pictures" / "train")
    ws = workspace(tmp_path / "ws", "pictures")
    for task in ("download", "train", "evaluate", "infer"):
        result = run_task(task, ws, capsys)
        assert result.code == 0, (task, result.err)
    arrays = npz(ws)
    assert arrays["x_train"].shape == (30, 8, 8, 3) and arrays["x_test"].shape == (15, 8, 8, 3)
    assert arrays["y_train"].tolist() == [0] * 10 + [1] * 10 + [2] * 10
    record = json.loads((ws / "data" / "download.json").read_text())
    assert record["class_names"] == list(CLASSES)
    assert record["class_counts"] == {name: {"train": 10, "test": 5} for name in CLASSES}
    assert json.loads((ws / "model" / "model.json").read_text())["class_names"] == list(CLASSES)
    assert len(json.loads((ws / "predictions.json").read_text())["predictions"]) == 15
    again = run_task("download", ws, capsys)
    assert again.code == 0 and "skipped" in again.out


def test_infer_takes_a_folder_of_images_or_one_image_resized_as_training_resized(tmp_path, capsys):
    """A model trained on 8×8 colour images classifies a folder of other images (other sizes, grey and
    colour, litter skipped), each row naming its file, and one image file; each as the same pixels in
    an npz would be classified, once stretched to 8×8 as download stretches (model.json says how)."""
    for split, count in (("train", 10), ("test", 5)):
        write_classes(tmp_path / "ws" / "pictures" / split, count)
    ws = workspace(tmp_path / "ws", "pictures")
    for task in ("download", "train"):
        assert run_task(task, ws, capsys).code == 0
    assert json.loads((ws / "model" / "model.json").read_text())["resizing"] == mnist.RESIZING
    new = write_classes(tmp_path / "new", 2, (("png", "L"), ("jpeg", "RGB")), size=(16, 12))
    add_litter(new)
    result = run_task("infer", ws, capsys, images=new, predictions=ws / "folder.json")
    assert result.code == 0, result.err
    rows = json.loads((ws / "folder.json").read_text())["predictions"]
    assert [row["file"] for row in rows] == [f"{name}/{i:02d}.{ext}" for name in CLASSES
                                             for i, ext in enumerate(("png", "jpeg"))]
    stretched = np.stack([mnist.in_channels(mnist.decode_image((new / row["file"]).read_bytes(), (8, 8), 1 << 20, ""),
                                            (8, 8, 3)) for row in rows])
    np.save(tmp_path / "same.npy", stretched)
    assert run_task("infer", ws, capsys, images=tmp_path / "same.npy", predictions=ws / "npy.json").code == 0
    same = json.loads((ws / "npy.json").read_text())["predictions"]
    assert [{k: v for k, v in row.items() if k != "file"} for row in rows] == same
    result = run_task("infer", ws, capsys, images=new / CLASSES[1] / "01.jpeg", predictions=ws / "one.json")
    assert result.code == 0, result.err
    assert json.loads((ws / "one.json").read_text())["predictions"] == [{**rows[3], "file": "01.jpeg"}]


def test_grey_stays_grey_and_class_folders_alone_hold_out_the_same_test_set(tmp_path, capsys):
    grey = (("png", "L"), ("bmp", "L"), ("gif", "L"))
    for place in ("a", "b"):
        write_classes(tmp_path / place / "pictures", 8, grey)
    os.utime(tmp_path / "b" / "pictures" / CLASSES[0] / "03.png", (0, 0))  # another machine's times
    runs = []
    for place, uri in (("a", "pictures"), ("b", (tmp_path / "b" / "pictures").as_uri())):
        ws = workspace(tmp_path / place, uri, test_fraction=0.25)
        assert run_task("download", ws, capsys).code == 0
        runs.append(npz(ws))
    assert runs[0]["x_train"].shape == (18, 8, 8) and runs[0]["x_test"].shape == (6, 8, 8)
    for name in mnist.ARRAYS:
        assert np.array_equal(runs[0][name], runs[1][name])
    record = json.loads((tmp_path / "a" / "data" / "download.json").read_text())
    assert record["class_counts"][CLASSES[0]] == {"train": 6, "test": 2}


def zipped(root: Path, top: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(root.rglob("*")):
            archive.write(path, f"{top}/{path.relative_to(root)}")
    return buffer.getvalue()


def tarred(root: Path, top: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(root, top)
    return buffer.getvalue()


def test_a_zip_of_a_folder_and_a_tar_gz_over_http_make_the_folders_npz(tmp_path, capsys, server):
    pictures = write_classes(tmp_path / "pictures", 6)
    folder = workspace(tmp_path / "folder", str(pictures))
    assert run_task("download", folder, capsys).code == 0
    body = zipped(pictures, "my pictures")
    (tmp_path / "zip").mkdir()
    (tmp_path / "zip" / "pictures.zip").write_bytes(body)
    add_litter(pictures)
    targz = tarred(pictures, "pictures")
    for ws in (workspace(tmp_path / "zip", "pictures.zip", hash=sha256(body)),
               workspace(tmp_path / "tar", server.serve("/pictures.tar.gz", targz), hash=sha256(targz))):
        result = run_task("download", ws, capsys)
        assert result.code == 0, result.err
        for name in mnist.ARRAYS:
            assert np.array_equal(npz(ws)[name], npz(folder)[name])
        assert sorted(os.listdir(ws / "data")) == sorted([mnist.LOCK_NAME, "download.json", "mnist.npz"])
    (tmp_path / "zip" / "pictures.zip").write_bytes(body[:-1] + b"!")
    refused(tmp_path / "zip", capsys, "pictures.zip", "SHA-256 mismatch")


def test_sizes_differ_one_line_naming_two_files_or_image_size_resizes(tmp_path, capsys):
    pictures = write_classes(tmp_path / "ws" / "pictures", 4)
    picture(1, "L", (10, 7)).save(pictures / CLASSES[1] / "wide.png")
    ws = workspace(tmp_path / "ws", "pictures")
    refused(ws, capsys, "8×8", "10×7", "wide.png", "image_size")
    ws = workspace(tmp_path / "ws", "pictures", image_size=[6, 12])
    assert run_task("download", ws, capsys).code == 0
    assert npz(ws)["x_train"].shape[1:] == (6, 12, 3)
    write_config(ws / "data.yaml", {"uri": "pictures", "image_size": [6]})
    refused(ws, capsys, "image_size", "[height, width]")


def test_a_file_that_is_not_an_image_is_one_line_naming_it(tmp_path, capsys):
    pictures = write_classes(tmp_path / "ws" / "pictures", 4)
    (pictures / CLASSES[2] / "notes.txt").write_text("not a picture")
    ws = workspace(tmp_path / "ws", "pictures")
    refused(ws, capsys, "pictures: square/notes.txt", "not an image of a format read here")
    (pictures / CLASSES[2] / "notes.txt").unlink()
    good = pictures / CLASSES[2] / "00.png"
    good.write_bytes(good.read_bytes()[:60])  # cut short
    refused(ws, capsys, "pictures: square/00.png", "not a readable image")


def test_archive_members_outside_its_folder_or_links_are_refused_and_never_written(tmp_path, capsys):
    pictures = write_classes(tmp_path / "pictures", 4)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pictures/../../evil.png", (pictures / CLASSES[0] / "00.png").read_bytes())
    body = buffer.getvalue()
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "evil.zip").write_bytes(body)
    ws = workspace(tmp_path / "ws", "evil.zip", hash=sha256(body))
    refused(ws, capsys, "../../evil.png", "outside")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(pictures, "pictures")
        link = tarfile.TarInfo("pictures/circle/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    body = buffer.getvalue()
    (ws / "links.tgz").write_bytes(body)
    write_config(ws / "data.yaml", {"uri": "links.tgz", "hash": sha256(body)})
    refused(ws, capsys, "link.png", "a link")
    assert not (tmp_path / "evil.png").exists() and not (ws / "evil.png").exists()


def bomb() -> bytes:
    """A 1×1 grey PNG whose header declares 40000×40000 pixels (1.6 G)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", 40000, 40000) + bytes(data[24:29])
    data[12:33] = header + struct.pack(">I", zlib.crc32(header))
    return bytes(data)


@pytest.mark.parametrize("side", [40000, 300])
def test_a_decompression_bomb_is_refused_in_one_line(tmp_path, capsys, side):
    pictures = write_classes(tmp_path / "ws" / "pictures", 4, (("png", "L"),))
    data = bomb() if side == 40000 else None
    if data is None:  # within Pillow's bound, beyond the data set's (size: 100 bytes a file on average)
        data = io.BytesIO()
        Image.new("L", (side, side)).save(data, "PNG")
        data = data.getvalue()
    (pictures / CLASSES[0] / "bomb.png").write_bytes(data)
    ws = workspace(tmp_path / "ws", "pictures", **({} if side == 40000 else {"size": 2000}))
    refused(ws, capsys, "bomb.png", "decompression bomb")


@pytest.mark.parametrize("form, mode, grey", [
    ("tiff", "L", True), ("tiff", "I;16", True), ("tiff", "CMYK", False), ("webp", "RGB", False),
    ("png", "I;16", True), ("png", "LA", True), ("gif", "P", False), ("jpeg", "L", True),
])
def test_every_format_and_mode_becomes_8_bit_grey_or_rgb(form, mode, grey):
    """TIFF, WebP and the rest, in grey, 16-bit, CMYK, alpha or palette: 8-bit grey (H×W) or RGB
    (H×W×3) of the same picture: its brightest rows stay brightest."""
    base = picture(1, "L", size=(8, 8))
    image = {"I;16": lambda: Image.fromarray(np.asarray(base, np.uint16) * 257),
             "CMYK": lambda: base.convert("RGB").convert("CMYK"),
             "P": lambda: Image.merge("RGB", (base, base.point(lambda v: v // 2), base)).quantize(16)}.get(
        mode, lambda: base.convert(mode))()
    buffer = io.BytesIO()
    image.save(buffer, format=form.upper(), **({"lossless": True} if form == "webp" else {}))
    pixels = mnist.decode_image(buffer.getvalue(), None, 1 << 20, "test")
    assert pixels.dtype == np.uint8 and pixels.shape == ((8, 8) if grey else (8, 8, 3))
    rows = pixels.reshape(8, -1).mean(1)
    assert set(np.argsort(rows)[-2:]) == {2, 3}


def test_a_tar_whose_headers_unpack_without_end_is_refused(tmp_path, capsys, monkeypatch):
    """tarfile reads a long name's whole declared size before any member: the stream it reads is capped
    (at twice what the set may hold: 2 MiB here)."""
    monkeypatch.setattr(mnist, "MAX_DATA_BYTES", 1 << 20)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo("x" * (3 << 20))
        info.size = 3
        archive.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "bomb.tgz").write_bytes(buffer.getvalue())
    ws = workspace(tmp_path / "ws", "bomb.tgz", hash=sha256(buffer.getvalue()), size=len(buffer.getvalue()))
    refused(ws, capsys, "bomb.tgz", "unpacks to more than the data set may hold")


def test_an_archives_size_bounds_the_archive_not_its_decoded_images(tmp_path, capsys):
    """size: is the archive's exact size; its images may decode to far more (they compress)."""
    write_classes(tmp_path / "pictures", 6, (("png", "RGB"),), size=(32, 32))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted((tmp_path / "pictures").rglob("*.png")):
            archive.write(path, path.relative_to(tmp_path).as_posix())
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "pictures.zip").write_bytes(buffer.getvalue())
    ws = workspace(tmp_path / "ws", "pictures.zip", hash=sha256(buffer.getvalue()), size=len(buffer.getvalue()))
    assert 18 * 32 * 32 * 3 > len(buffer.getvalue())  # the decoded pixels outweigh the archive
    result = run_task("download", ws, capsys)
    assert result.code == 0, result.err


def test_a_link_to_a_class_folder_is_refused_not_skipped(tmp_path, capsys):
    write_classes(tmp_path / "store", 4)
    (tmp_path / "ws" / "pictures").mkdir(parents=True)
    for name in CLASSES[:2]:
        (tmp_path / "store" / name).rename(tmp_path / "ws" / "pictures" / name)
    (tmp_path / "ws" / "pictures" / CLASSES[2]).symlink_to(tmp_path / "store" / CLASSES[2])
    ws = workspace(tmp_path / "ws", "pictures")
    refused(ws, capsys, f"{CLASSES[2]}: a link to a folder, which is not followed")


def test_image_files_meet_a_model_of_one_channel_and_refuse_one_of_four():
    colour = np.zeros((8, 8, 3), np.uint8)
    assert mnist.in_channels(colour, (8, 8, 1)).shape == (8, 8, 1)
    assert mnist.in_channels(colour[..., 0], (8, 8, 3)).shape == (8, 8, 3)
    with pytest.raises(mnist.CubeError, match="takes images of 4 channels"):
        mnist.in_channels(colour, (8, 8, 4))


def test_infer_reads_a_folders_images_alone(tmp_path):
    """Its own predictions file, or notes, in the folder are not images to classify."""
    write_classes(tmp_path, 1)
    (tmp_path / "predictions.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("my notes")
    assert mnist.image_file_names(str(tmp_path)) == [f"{name}/00.png" for name in CLASSES]
