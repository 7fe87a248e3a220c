"""Reading files other people made within what they really hold: JSON, YAML front matter, .npy / .npz arrays and zip
members.

Headers can lie. A .npy header may declare terabytes in a file of a hundred bytes (numpy allocates the declared array
before reading into it), a zip entry may inflate without bound, a JSON file may nest a million levels deep. Each
reader here checks what a file declares against what it holds before allocating anything, and reports a problem as
a ValueError that names the file.

Bytes are not enough for structured text: 250 MiB of ``{},`` become 83 million Python dicts (over 5 GB), and a YAML
alias refers to a subtree any number of times. So JSON is counted before it is parsed (every value but the first
follows a comma, a colon or an opening bracket, so those bytes bound the values; only near the limit are string
contents discounted exactly) and its nesting is bounded; YAML is walked as an event stream first, which refuses
aliases and tags and bounds values and nesting, and only then built.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
import zlib
from typing import Optional, Union

import numpy as np
import PIL.Image

from sida_diffusers.safe_io.paths import open_regular


MAX_JSON_BYTES = 256 << 20  # EDM's dataset.json for ImageNet-1k is ~60 MB; configs are a few kB
MAX_JSON_NODES = 1 << 20    # values (objects, arrays, strings, numbers) of a configuration or record file
MAX_JSON_DEPTH = 64         # nesting; our files nest at most 8 levels
MAX_YAML_BYTES = 1 << 20    # a model card's YAML front matter is a few kB
MAX_YAML_NODES = 100_000
MAX_IMAGE_PIXELS = 1 << 26  # 8192 x 8192; a header declaring more is a decompression bomb, not an image of ours
MAX_DEFLATE_RATIO = 1032    # the most deflate can expand one byte (a 258-byte match per bit pair, RFC 1951)
NUMERIC_KINDS = "biufc"     # numpy dtype kinds an array of ours may have (bool, integers, floats, complex)
MAX_ITEMSIZE = 16           # bytes per element of those kinds (complex128)

_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, NotImplementedError)
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def read_bytes(path: Union[str, os.PathLike], max_bytes: int, what: str = "this file may take") -> bytes:
    """The bytes of the regular file `path`, refused when it holds more than the `max_bytes` that `what` (e.g. "one
    training item may take"); the cap applies while reading, so a file that grows meanwhile is refused too."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(max_bytes + 1) if size <= max_bytes else b""
    if max(size, len(data)) > max_bytes:
        raise ValueError(f"{path} is {max(size, len(data)):,} bytes, more than the {max_bytes:,} {what}.")
    return data


def _count(text: bytes) -> int:
    """Values in JSON text without strings: every value but the first follows a comma, a colon or an opening
    bracket, except the nothing inside an empty {} or []."""
    return sum(text.count(c) for c in (b",", b":", b"[", b"{")) - text.count(b"{}") - text.count(b"[]") + 1


def count_json_values(data: bytes, limit: int = MAX_JSON_NODES) -> int:
    """The values in the JSON text `data` (counted outside strings), or as soon as they exceed `limit` a lower
    bound that does: every comma starts a value, so the commas alone settle a bomb in one pass."""
    stripped = _JSON_STRING.sub(b'""', data)  # the same object when the text has no strings
    commas = stripped.count(b",")
    return commas if commas > limit else _count(stripped)


def json_depth(data: bytes) -> int:
    """The deepest nesting of the JSON text `data`, from its brackets outside strings, without parsing it."""
    brackets = np.frombuffer(_JSON_STRING.sub(b'""', data).translate(None, _NOT_BRACKETS), np.uint8)
    if brackets.size == 0:
        return 0
    steps = ((brackets == ord("[")) | (brackets == ord("{"))).astype(np.int8) * 2 - 1
    return int(np.cumsum(steps, dtype=np.int32).max())


def read_json(source: Union[str, os.PathLike, bytes], where: Optional[str] = None, max_bytes: int = MAX_JSON_BYTES,
              max_nodes: int = MAX_JSON_NODES, max_depth: int = MAX_JSON_DEPTH):
    """Parse JSON from a regular file or bytes; refused when over `max_bytes`, `max_nodes` values or `max_depth`
    levels of nesting, all counted before anything is parsed."""
    where = where or ("the JSON text" if isinstance(source, (bytes, bytearray)) else str(source))
    if not isinstance(source, (bytes, bytearray)):
        source = read_bytes(source, max_bytes, "any JSON file of ours needs; it is not a configuration, record or "
                                               "label file")
    elif len(source) > max_bytes:
        raise ValueError(f"{where} is {len(source):,} bytes, more than the {max_bytes:,} any JSON file of ours needs; "
                         "it is not a configuration or label file.")
    source = bytes(source)
    values = count_json_values(source, max_nodes) if len(source) > max_nodes else 0
    if values > max_nodes:
        raise ValueError(f"{where} holds at least {values:,} JSON values, more than the {max_nodes:,} this file may "
                         "have; it is not a configuration, record or label file of ours.")
    if json_depth(source) > max_depth:
        raise ValueError(f"{where} nests its JSON too deeply (more than {max_depth} levels); it is not a "
                         "configuration or label file.")
    try:
        return json.loads(source)
    except RecursionError:  # not reached after the depth check; kept as the last line of defence
        raise ValueError(f"{where} nests its JSON too deeply to be read; it is not a configuration or label "
                         "file.") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise ValueError(f"{where} is not valid JSON ({str(e)[:200]}).") from e


def parse_yaml(text: str, where: str, max_nodes: int = MAX_YAML_NODES, max_depth: int = MAX_JSON_DEPTH):
    """`yaml.safe_load(text)` after a streaming pass that refuses aliases (``*name``, which can repeat a subtree
    without bound) and explicit tags (``!!python/...``), and more than `max_nodes` values or `max_depth` levels."""
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise ValueError(f"{where}: its YAML is {len(text):,} characters, more than the {MAX_YAML_BYTES:,} a model "
                         "card's metadata needs.")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    nodes = depth = 0
    try:
        for event in yaml.parse(text, Loader=loader):  # an iterative parser: no recursion, nothing built yet
            if isinstance(event, yaml.AliasEvent):
                raise ValueError(f"{where}: its YAML uses an alias (*{event.anchor}); model-card metadata never needs "
                                 "one, and aliases can repeat a subtree without bound.")
            if isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)):
                if event.tag is not None and not (isinstance(event, yaml.ScalarEvent) and event.tag == "!"):
                    raise ValueError(f"{where}: its YAML uses the tag {event.tag[:60]!r}; model-card metadata is "
                                     "plain YAML without tags.")
                nodes += 1
                if nodes > max_nodes:
                    raise ValueError(f"{where}: its YAML holds more than {max_nodes:,} values; it is not model-card "
                                     "metadata.")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > max_depth:
                    raise ValueError(f"{where}: its YAML nests more than {max_depth} levels deep; it is not "
                                     "model-card metadata.")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as e:
        problem = " ".join(str(e).split())
        raise ValueError(f"{where}: its YAML cannot be parsed ({problem[:200]}).") from None


def read_npy(f, available: int, where: str, kinds: str = NUMERIC_KINDS) -> np.ndarray:
    """The array of the .npy stream `f` (which holds `available` bytes), checked against them before it is read.

    Only dtypes of `kinds` with a sensible item size are read (Python objects, i.e. pickled arrays, and void or
    zero-size types never), and a header declaring more data than the stream holds is refused.
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
    if dtype.kind not in kinds or not 1 <= dtype.itemsize <= (MAX_ITEMSIZE if dtype.kind in NUMERIC_KINDS else 1 << 20):
        raise ValueError(f"{where} holds an array of dtype {str(dtype)[:40]}; only numeric arrays (bool, integer, "
                         "float) are read.")
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
    """Every array of an .npz (np.savez / np.savez_compressed), keyed as np.load keys them, each checked first;
    numeric arrays and strings (the JSON `meta` of our references) only."""
    arrays = {}
    try:
        with open_regular(path, "an .npz archive") as file, zipfile.ZipFile(file) as archive:
            for info in archive.infolist():
                where = f"{path}[{info.filename}]"
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise ValueError(f"{where} uses zip compression method {info.compress_type}; numpy writes "
                                     "stored or deflated members only.")
                check_zip_member(info, where)
                with archive.open(info) as f:
                    arrays[info.filename.removesuffix(".npy")] = read_npy(f, info.file_size, where, NUMERIC_KINDS + "U")
    except _ZIP_ERRORS as e:
        raise ValueError(f"{path} is not a readable .npz archive ({e}).") from e
    return arrays


def load_npy(path: Union[str, os.PathLike]) -> np.ndarray:
    """The array of a .npy file, checked against the file's size first."""
    with open_regular(path, "an .npy array") as f:
        return read_npy(f, os.fstat(f.fileno()).st_size, str(path))


def check_image_size(image: PIL.Image.Image, where: str) -> None:
    """Refuse an opened image whose header declares more than `MAX_IMAGE_PIXELS` (a decompression bomb); the size
    comes from the header, before any pixel is decoded."""
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{where}: the image header declares {image.width}x{image.height} pixels, more than the "
                         f"{MAX_IMAGE_PIXELS:,} any image of ours needs (a decompression bomb?); remove the file.")
