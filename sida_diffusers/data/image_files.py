"""Image folders and zips as training items: images decoded within limits, members read with a cap, EDM labels.

The limits are far above any real training item, so that a hostile archive (a zip member that inflates without
bound, an image header that declares a decompression bomb, a dataset.json with absurd labels) is refused with an
error naming the file instead of exhausting memory.
"""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import PIL.Image

from sida_diffusers.safe_io.files import check_image_size, read_bytes, read_json, read_zip_member
from sida_diffusers.safe_io.paths import open_regular


MAX_ITEM_BYTES = 256 << 20    # one encoded image, .npy latent or dataset.json (ImageNet's is ~60 MB)
MAX_CLASSES = 100_000         # ImageNet-21k has 21,841; one-hot labels are [batch, classes]
MAX_LABEL_VALUES = 8 << 20    # JSON values of dataset.json: 3 per labelled file, ImageNet-1k's 1.28 M need 3.8 M


# ---- images ----------------------------------------------------------------------------------------------------------

def image_array(image: PIL.Image.Image, resolution: Optional[int], where: str) -> np.ndarray:
    """uint8 CHW of a PIL image: grey stays 1 channel, colour becomes RGB; square images resized if asked (bicubic)."""
    check_image_size(image, where)
    if image.mode in ("1", "L", "LA", "I;16", "I", "F"):
        if image.mode in ("I;16", "I", "F"):
            raise ValueError(f"{where}: {image.mode} images (16-bit or float) are not supported; convert them to 8-bit "
                             f"grey (L) or RGB first.")
        image = image.convert("L")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    if resolution is not None and image.size != (resolution, resolution):
        if image.size[0] != image.size[1]:
            raise ValueError(f"{where}: image is {image.size[0]}x{image.size[1]}; only square images are resized to "
                             f"resolution={resolution}. Center-crop the data first (e.g. EDM's dataset_tool.py).")
        image = image.resize((resolution, resolution), PIL.Image.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


# What PIL's decoders raise on malformed bytes (OSError covers UnidentifiedImageError and truncated data).
_DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, IndexError, struct.error, zlib.error,
                  PIL.Image.DecompressionBombError)


def open_image(data: bytes, resolution: Optional[int], where: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)  # our own, lower limit applies
            image = PIL.Image.open(io.BytesIO(data))
    except _DECODE_ERRORS as err:
        raise ValueError(f"{where}: cannot read the image ({err}); remove or re-encode the file.") from err
    with image:
        check_image_size(image, where)
        try:
            image.load()
        except _DECODE_ERRORS as err:
            raise ValueError(f"{where}: cannot read the image ({err}); remove or re-encode the file.") from err
        return image_array(image, resolution, where)


# ---- folders and zips ------------------------------------------------------------------------------------------------

class Archive:
    """A folder (walked recursively) or a zip, with '/'-separated relative file names."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            self._zip = None
            self.names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        else:
            file = open_regular(path, "training data")  # not /dev/zero, a pipe or a socket
            try:
                self._zip = zipfile.ZipFile(file)
            except (zipfile.BadZipFile, OSError) as err:
                file.close()
                raise ValueError(f"{path} is not a readable zip ({err}); rebuild it with dataset_tool.py.") from err
            self.names = sorted(n for n in self._zip.namelist() if not n.endswith("/"))

    def read(self, name: str) -> bytes:
        """The member's bytes, refused over MAX_ITEM_BYTES whatever its header declares (zip bombs)."""
        where = f"{self.path}/{name}"
        if self._zip is not None:
            return read_zip_member(self._zip, name, where, MAX_ITEM_BYTES)
        return read_bytes(self.path / name, MAX_ITEM_BYTES, "one training item may take")  # capped: the file may still grow


def archive_labels(archive: Archive, files: list[str]):
    """Class labels of ``files`` and their names: from dataset.json if present (EDM/EDM2), else class sub-folders."""
    if "dataset.json" in archive.names:
        table = _label_table(read_json(archive.read("dataset.json"), f"{archive.path}/dataset.json",
                                       max_nodes=MAX_LABEL_VALUES), f"{archive.path}/dataset.json")
        if table is None:
            return None, None
        missing = [f for f in files if f not in table]
        if missing:
            raise ValueError(f"{archive.path}/dataset.json has no label for {len(missing)} file(s), e.g. "
                             f"{missing[0]!r}; list every file in it, or set \"labels\": null for unlabeled data.")
        return np.asarray([table[f] for f in files], dtype=np.int64), None
    classes = sorted({f.split("/")[0] if "/" in f else "" for f in files})
    if len(classes) < 2:
        return None, None
    if "" in classes:
        raise ValueError(f"{archive.path}: some images lie at the top level and others in sub-folders; put every image "
                         f"in its class folder, or add a dataset.json with the labels.")
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[f.split("/")[0]] for f in files], dtype=np.int64), dict(enumerate(classes))


def _label_table(data, where: str) -> Optional[dict]:
    """File name -> class index from EDM's dataset.json, ``{"labels": [["name", index], ...]}`` (None: unlabeled)."""
    expected = '{"labels": [["file name", class index], ...]} or {"labels": null}'
    if not isinstance(data, dict) or not isinstance(data.get("labels", []), (list, type(None))):
        raise ValueError(f"{where} is not a JSON object with a 'labels' list; expected {expected}.")
    if data.get("labels") is None:
        return None
    table = {}
    for i, row in enumerate(data["labels"]):
        if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str) and type(row[1]) is int):
            raise ValueError(f"{where}: labels row {i} is {str(row)[:80]}, not [\"file name\", class index]; "
                             f"expected {expected}.")
        if not 0 <= row[1] < MAX_CLASSES:
            raise ValueError(f"{where}: labels row {i} has class index {str(row[1])[:40]}; labels must be "
                             f"non-negative integer class indices below {MAX_CLASSES:,}.")
        table[row[0].replace("\\", "/")] = row[1]
    return table
