"""Reading files other people made within what they really hold: JSON, .npy / .npz arrays and zip members.

Headers can lie. A .npy header may declare terabytes in a file of a hundred bytes (numpy allocates the declared array
before reading into it), a zip entry may inflate without bound, a JSON file may nest a million levels deep. Each
reader here checks what a file declares against what it holds before allocating anything, and reports a problem as
a ValueError that names the file.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
import PIL.Image


MAX_JSON_BYTES = 256 << 20  # EDM's dataset.json for ImageNet-1k is ~60 MB; configs are a few kB
MAX_IMAGE_PIXELS = 1 << 26  # 8192 x 8192; a header declaring more is a decompression bomb, not an image of ours
MAX_DEFLATE_RATIO = 1032    # the most deflate can expand one byte (a 258-byte match per bit pair, RFC 1951)

_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, NotImplementedError)


def read_json(source: Union[str, os.PathLike, bytes], where: Optional[str] = None, max_bytes: int = MAX_JSON_BYTES):
    """Parse JSON from a file path or bytes; a file larger than `max_bytes` or nested too deeply is refused."""
    where = where or str(source)
    if not isinstance(source, (bytes, bytearray)):
        size = Path(source).stat().st_size
        if size > max_bytes:
            raise ValueError(f"{where} is {size:,} bytes, more than the {max_bytes:,} any JSON file of ours needs; "
                             "it is not a configuration or label file.")
        source = Path(source).read_bytes()
    try:
        return json.loads(source)
    except RecursionError:
        raise ValueError(f"{where} nests its JSON too deeply to be read; it is not a configuration or label "
                         "file.") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise ValueError(f"{where} is not valid JSON ({e}).") from e


def read_npy(f, available: int, where: str) -> np.ndarray:
    """The array of the .npy stream `f` (which holds `available` bytes), checked against them before it is read.

    Python objects (pickled arrays) are refused, and so is a header declaring more data than the stream holds.
    """
    start = f.tell()
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"format version {version} is not supported (1.0 and 2.0 are)")
    except (ValueError, EOFError, SyntaxError) as e:
        raise ValueError(f"{where} is not a readable .npy array ({e}).") from e
    if dtype.hasobject:
        raise ValueError(f"{where} holds Python objects (a pickled array); only numeric arrays are read.")
    declared = math.prod(shape) * dtype.itemsize
    held = available - (f.tell() - start)
    if declared > held:
        raise ValueError(f"{where} declares a {dtype} array of shape {list(shape)} ({declared:,} bytes) but holds "
                         f"{max(held, 0):,} bytes of data; the file is truncated or forged.")
    f.seek(start)
    return np.lib.format.read_array(f, allow_pickle=False)


def check_zip_member(info: zipfile.ZipInfo, where: str, max_bytes: Optional[int] = None) -> None:
    """Refuse a zip member whose declared size is over `max_bytes` or more than its compressed bytes can inflate to."""
    if max_bytes is not None and info.file_size > max_bytes:
        raise ValueError(f"{where} declares {info.file_size:,} bytes, more than the {max_bytes:,} one item may take; "
                         "it is not a training image or array (a zip bomb?).")
    if info.compress_type == zipfile.ZIP_STORED:
        possible = info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        possible = MAX_DEFLATE_RATIO * info.compress_size + 1024
    else:
        return  # bzip2 / lzma: no useful ratio bound; callers read these with a cap
    if info.file_size > possible:
        raise ValueError(f"{where} declares {info.file_size:,} bytes, more than its {info.compress_size:,} stored "
                         "bytes can hold; the archive is corrupt or forged.")


def read_zip_member(archive: zipfile.ZipFile, name: str, where: str, max_bytes: int) -> bytes:
    """The bytes of one member, refused when it declares or inflates to more than `max_bytes`."""
    try:
        info = archive.getinfo(name)
        check_zip_member(info, where, max_bytes)
        with archive.open(info) as f:
            data = f.read(max_bytes + 1)  # a cap of our own, whatever the header says
    except _ZIP_ERRORS as e:
        raise ValueError(f"{where} cannot be read from its archive ({e}); rebuild the zip.") from e
    if len(data) > max_bytes:
        raise ValueError(f"{where} inflates to more than {max_bytes:,} bytes; it is not a training item (a zip "
                         "bomb?).")
    return data


def load_npz(path: Union[str, os.PathLike]) -> dict:
    """Every array of an .npz (np.savez / np.savez_compressed), keyed as np.load keys them, each checked first."""
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                where = f"{path}[{info.filename}]"
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise ValueError(f"{where} uses zip compression method {info.compress_type}; numpy writes "
                                     "stored or deflated members only.")
                check_zip_member(info, where)
                with archive.open(info) as f:
                    arrays[info.filename.removesuffix(".npy")] = read_npy(f, info.file_size, where)
    except _ZIP_ERRORS as e:
        raise ValueError(f"{path} is not a readable .npz archive ({e}).") from e
    return arrays


def load_npy(path: Union[str, os.PathLike]) -> np.ndarray:
    """The array of a .npy file, checked against the file's size first."""
    with open(path, "rb") as f:
        return read_npy(f, os.fstat(f.fileno()).st_size, str(path))


def check_image_size(image: PIL.Image.Image, where: str) -> None:
    """Refuse an opened image whose header declares more than `MAX_IMAGE_PIXELS` (a decompression bomb); the size
    comes from the header, before any pixel is decoded."""
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{where}: the image header declares {image.width}x{image.height} pixels, more than the "
                         f"{MAX_IMAGE_PIXELS:,} any image of ours needs (a decompression bomb?); remove the file.")
