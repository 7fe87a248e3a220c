"""Training data that lies: zip bombs, decompression-bomb image headers, .npy latents and dataset.json labels.

`build_dataset` reads image folders and EDM / EDM2 zips that other people made. A member that inflates without bound,
an image header declaring billions of pixels or a labels file with absurd entries is refused with a ValueError naming
the file and the problem, within the `bounded` fixture (4 GiB above the current use, 20 s).
"""

import io
import json
import struct
import zipfile

import datasets
import numpy as np
import PIL.Image
import pytest

from sida_diffusers.data.datasets import build_dataset
from sida_diffusers.data.image_files import MAX_CLASSES, MAX_ITEM_BYTES
from sida_diffusers.safe_io.files import MAX_IMAGE_PIXELS

from conftest import png_header


def png(value=0, size=8):
    buf = io.BytesIO()
    PIL.Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="png")
    return buf.getvalue()


def image_zip(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def declare_size(path, name, size):
    """Rewrite the uncompressed size the zip's central directory declares for member `name`."""
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")
    while data[entry + 46:entry + 46 + len(name)] != name.encode():  # the name follows the 46-byte entry header
        entry = data.index(b"PK\x01\x02", entry + 1)
    data[entry + 24:entry + 28] = struct.pack("<I", size)
    path.write_bytes(bytes(data))
    return path


def refused(source, *problem, **kwargs):
    with pytest.raises(ValueError) as error:
        build_dataset(source, **kwargs)
    message = str(error.value)
    assert all(word in message for word in problem), message
    return message


# ---- zip members -----------------------------------------------------------------------------------------------------

def test_a_deflate_bomb_is_refused_from_its_declared_size_without_inflating(tmp_path, bounded):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("00000/img00000000.png", png())
        with archive.open("00000/img00000001.png", "w", force_zip64=True) as member:
            for _ in range((MAX_ITEM_BYTES >> 20) + 1):  # 257 MiB of zeros, about 260 kB deflated
                member.write(bytes(1 << 20))
    assert path.stat().st_size < 1 << 20
    refused(path, f"{path}/00000/img00000001.png declares 269,484,032 bytes, more than the 268,435,456 one item",
            "zip bomb")


def test_a_member_declaring_more_than_its_stored_bytes_is_refused(tmp_path, bounded):
    path = declare_size(image_zip(tmp_path / "forged.zip", {"a.png": png(), "b.png": png(1)}), "b.png", 100_000_000)
    refused(path, "b.png declares 100,000,000 bytes, more than its", "stored bytes can hold")


def test_a_member_that_inflates_past_its_declared_size_is_cut_off_and_refused(tmp_path, bounded):
    path = image_zip(tmp_path / "liar.zip", {"a.png": png(), "b.png": bytes(2 << 20)}, zipfile.ZIP_DEFLATED)
    refused(declare_size(path, "b.png", 100), "b.png cannot be read from its archive (Bad CRC-32")


def test_an_oversized_file_in_an_image_folder_is_refused_before_it_is_read(tmp_path, bounded):
    (tmp_path / "a.png").write_bytes(png())
    with open(tmp_path / "b.png", "wb") as f:
        f.truncate(MAX_ITEM_BYTES + 1)  # sparse: no disk space used
    refused(tmp_path, "b.png is 268,435,457 bytes, more than the 268,435,456 one training item may take")


# ---- images ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("width, height", [(10_000, 10_000), (100_000, 100_000), (1 << 30, 1)])
def test_image_headers_declaring_a_decompression_bomb_are_refused(tmp_path, bounded, width, height):
    path = image_zip(tmp_path / "bomb.zip", {"a.png": png(), "b.png": png_header(width, height)})
    refused(path, f"{path}/b.png")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "only.png").write_bytes(png_header(width, height))
    message = refused(tmp_path / "folder", f"{tmp_path / 'folder'}/only.png")
    assert f"{width}x{height}" in message or "decompression bomb" in message


def test_a_bomb_header_just_over_the_limit_names_the_limit(tmp_path, bounded):
    (tmp_path / "big.png").write_bytes(png_header(8193, 8192))
    refused(tmp_path, "big.png: the image header declares 8193x8192 pixels", f"{MAX_IMAGE_PIXELS:,}",
            "decompression bomb")


def test_truncated_and_corrupt_images_are_named(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "b.png").write_bytes(png()[:40])  # cut inside the pixel data
    refused(tmp_path, "b.png: cannot read the image", "remove or re-encode the file")


# ---- latents ---------------------------------------------------------------------------------------------------------

def test_a_latent_npy_whose_header_declares_terabytes_is_refused(tmp_path, bounded):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (8, 1 << 19, 1 << 19)})
    good = io.BytesIO()
    np.save(good, np.zeros((8, 4, 4), np.float32))
    path = image_zip(tmp_path / "latents.zip", {"00000/img-mean-std-00000000.npy": good.getvalue(),
                                                "00000/img-mean-std-00000001.npy": buf.getvalue() + bytes(64)})
    latents = build_dataset(path)  # latents are read on demand, each checked when it is read
    with pytest.raises(ValueError, match=r"img-mean-std-00000001.npy declares a float32 array of shape "
                                         r"\[8, 524288, 524288\] \(8,796,093,022,208 bytes\) but holds 64 bytes"):
        latents[1]


# ---- dataset.json ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, problem", [
    ({"labels": 5}, "not a JSON object with a 'labels' list"),
    ({"labels": {"a.png": 1}}, "not a JSON object with a 'labels' list"),
    ([["a.png", 1]], "not a JSON object with a 'labels' list"),
    ({"labels": [["a.png", 1, 2]]}, "labels row 0 is ['a.png', 1, 2], not [\"file name\", class index]"),
    ({"labels": [["a.png", "1"]]}, "labels row 0 is ['a.png', '1']"),
    ({"labels": [[1, 1]]}, "labels row 0 is [1, 1]"),
    ({"labels": [["a.png", True]]}, "labels row 0 is ['a.png', True]"),
    ({"labels": ["ab"]}, "labels row 0 is ab"),
    ({"labels": [["a.png", -1]]}, "class index -1"),
    ({"labels": [["a.png", 10**12]]}, "class index 1000000000000"),
    ({"labels": [["a.png", 10**400]]}, "class index 1000000000"),
])
def test_dataset_json_whose_labels_are_not_name_index_rows_is_refused(tmp_path, content, problem):
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "dataset.json").write_text(json.dumps(content))
    refused(tmp_path, f"{tmp_path}/dataset.json", problem)


def test_dataset_json_nested_too_deeply_or_not_json_is_refused(tmp_path, bounded):
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "dataset.json").write_text('{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(tmp_path, "dataset.json nests its JSON too deeply")
    (tmp_path / "dataset.json").write_bytes(b"\xff\xfe not json")
    refused(tmp_path, "dataset.json is not valid JSON")


def test_absurd_labels_from_any_source_are_refused(bounded):
    image = PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    ds = datasets.Dataset.from_dict({"image": [image, image], "label": [0, 10**12]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    refused(ds, "class index 1000000000000 is absurd", f"at most {MAX_CLASSES:,} classes", label_column="label")


def test_honest_archives_still_load(tmp_path):
    labels = {"labels": [["00000/img00000000.png", 1], ["00000/img00000001.png", 0]]}
    path = image_zip(tmp_path / "tiny-8x8.zip", {"00000/img00000000.png": png(10), "00000/img00000001.png": png(20),
                                                 "dataset.json": json.dumps(labels)}, zipfile.ZIP_DEFLATED)
    ds = build_dataset(path)
    assert len(ds) == 2 and ds.labels.tolist() == [1, 0] and ds[1][0].max() == 20
