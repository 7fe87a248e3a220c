"""Decoding chains, sharing and nesting: small files that expand exponentially, nest without end or contain themselves.

The pickle memo lets a file refer to one object many times, and allowed functions can be composed; a few hundred
bytes can then describe terabytes or an endless structure. Every case ends in a ValueError naming the file, never in
a RecursionError, and runs under the `bounded` fixture (4 GiB above the current use, 20 s).
"""

import codecs
import io
import json
import pickle
import struct
import zipfile

import numpy as np
import pytest

from sida_diffusers.cli.evaluate import load_label_pool
from sida_diffusers.evaluation import load_reference
from sida_diffusers.pretrained import load_denoiser, read_official_pickle

import official_pickles as official
from conftest import Call, tiny_edm
from conftest import refused_file as refused


def reference_pickle(tmp_path, mu, protocol=4):
    path = tmp_path / "img512.pkl"
    path.write_bytes(pickle.dumps({"fid": {"mu": mu, "sigma": np.eye(2)}}, protocol=protocol))
    return path


def official_network(init_kwargs, modules=None):
    """A minimal network record in the official persistence format, with one parameter."""
    state = {"_init_kwargs": init_kwargs, "_modules": modules or {}, "_buffers": {},
             "_parameters": {"weight": official.tensor(np.zeros(4, np.float32), parameter=True, requires_grad=True)}}
    return official.persistent("EDMPrecond", "training.networks", state, tag="hostile")


def official_pickle(tmp_path, network, **extras):
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(official.dumps({"ema": network, **extras}, protocol=3))  # 3: BINUNICODE strings, spliced below
    return path


def nested_lists(depth):
    """Pickle opcodes of a list nested `depth` levels deep, which Python's own pickler cannot write."""
    return b"]" * depth + b"a" * (depth - 1)


def with_placeholder_replaced(path, placeholder, opcodes):
    data = path.read_bytes()
    marker = b"X" + struct.pack("<I", len(placeholder)) + placeholder.encode()  # BINUNICODE of the placeholder
    assert data.count(marker) == 1
    path.write_bytes(data.replace(marker, opcodes))
    return path


# ---- decoding chains -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", ["hex", "base64", "uu"])
def test_nested_codec_calls_cannot_double_a_byte_forty_times(tmp_path, bounded, codec):
    data = b"x"
    for _ in range(40):  # each hex encoding doubles the bytes: 2^40 of them at the end
        data = Call(codecs.encode, data, codec)
    path = reference_pickle(tmp_path, Call(np._core.multiarray._reconstruct, np.ndarray, (0,), data))
    refused(load_reference, path, f"refused _codecs.encode(..., '{codec}')", "never pickled code")


def test_numpy_arrays_of_protocol_2_still_spell_their_bytes_with_latin1(tmp_path):
    path = reference_pickle(tmp_path, np.arange(3.0), protocol=2)
    np.testing.assert_array_equal(load_reference(path).entries["fid"]["mu"], [0.0, 1.0, 2.0])


# ---- one object shared many times ------------------------------------------------------------------------------------

def test_a_list_shared_a_million_times_is_not_expanded_into_a_billion_numbers(tmp_path, bounded):
    thousand = [0.0] * 1000
    shared = [[thousand] * 1000] * 1000  # 10^9 numbers (8 GB as float64) from a 5 kB pickle
    path = reference_pickle(tmp_path, shared)
    refused(load_reference, path, "expands to more than 1,000,000 values")


def test_shared_init_kwargs_are_not_expanded_either(tmp_path, bounded):
    thousand = list(range(1000))
    path = official_pickle(tmp_path, official_network({"channel_mult": [[thousand] * 1000] * 1000}))
    refused(read_official_pickle, path, "expands to more than 1,000,000 values")


# ---- nesting and cycles ----------------------------------------------------------------------------------------------

def test_a_reference_nested_a_hundred_thousand_levels_deep_is_refused_without_recursion_error(tmp_path, bounded):
    path = tmp_path / "img512.pkl"
    key = lambda text: b"X" + struct.pack("<I", len(text)) + text  # noqa: E731  (BINUNICODE)
    path.write_bytes(b"\x80\x02}" + key(b"fid") + b"}" + key(b"mu") + nested_lists(100_000) + b"ss.")
    refused(load_reference, path, "nests deeper than 100 levels")


def test_init_kwargs_nested_a_hundred_thousand_levels_deep_are_refused(tmp_path, bounded):
    path = official_pickle(tmp_path, official_network({"channel_mult": "DEEP"}))
    with_placeholder_replaced(path, "DEEP", nested_lists(100_000))
    refused(load_denoiser, path, "nests deeper than 100 levels")


def test_a_list_inside_itself_is_refused(tmp_path, bounded):
    loop = []
    loop.append(loop)
    refused(read_official_pickle, official_pickle(tmp_path, official_network({"channel_mult": loop})),
            "a container contains itself")
    cyclic = {}
    cyclic["fid"] = cyclic
    path = tmp_path / "cyclic.pkl"
    path.write_bytes(pickle.dumps(cyclic))
    refused(load_reference, path, "a container contains itself")


def test_a_module_tree_that_contains_itself_or_shares_a_submodule_is_refused(tmp_path, bounded):
    module_list = official.Global("torch.nn.modules.container", "ModuleList")
    container = official.NewObject(module_list, state={})
    container.state.update({"_modules": {"0": container}, "_parameters": {}, "_buffers": {}})  # itself, via the memo
    refused(read_official_pickle, official_pickle(tmp_path, official_network({}, {"blocks": container})),
            "module tree is cyclic, shared or implausibly deep at 'blocks.0.'")

    level = official.NewObject(module_list, state={"_modules": {}, "_parameters": {}, "_buffers": {}})
    for _ in range(60):  # every level shared twice: 2^60 paths through 60 objects
        level = official.NewObject(module_list,
                                   state={"_modules": {"0": level, "1": level}, "_parameters": {}, "_buffers": {}})
    path = official_pickle(tmp_path, official_network({}, {"blocks": level}))
    refused(read_official_pickle, path, "module tree is cyclic, shared or implausibly deep")


def test_a_config_json_nested_beyond_what_json_can_parse_is_refused(tmp_path, bounded):
    tiny_edm().save_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(load_denoiser, tmp_path / "unet", "config.json nests its JSON too deeply")


# ---- .npz and .npy headers -------------------------------------------------------------------------------------------

def npy_claiming(shape, data=b"\0" * 8, descr="<f8"):
    """A .npy file whose header declares `shape` but which holds `data`."""
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def write_npz(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_an_npz_member_declaring_256_gigabytes_in_8_bytes_is_refused(tmp_path, bounded):
    path = write_npz(tmp_path / "cifar10-32x32.npz", {"mu.npy": npy_claiming((1 << 35,)),
                                                       "sigma.npy": npy_claiming(())})
    message = refused(load_reference, path, "[mu.npy] declares a float64 array of shape [34359738368]",
                      "(274,877,906,944 bytes) but holds 8 bytes of data")
    assert "truncated or forged" in message


def test_label_files_with_lying_headers_are_refused(tmp_path, bounded):
    npz = write_npz(tmp_path / "labels.npz", {"labels.npy": npy_claiming((1 << 40,), descr="<i8")})
    refused(load_label_pool, npz, "[labels.npy] declares", "holds 8 bytes")
    npy = tmp_path / "labels.npy"
    npy.write_bytes(npy_claiming((1 << 40,), descr="<i8"))
    refused(load_label_pool, npy, "labels.npy declares", "holds 8 bytes")


def test_an_npz_member_larger_than_its_compressed_bytes_can_inflate_to_is_refused(tmp_path, bounded):
    path = write_npz(tmp_path / "ref.npz", {"mu.npy": npy_claiming((1,))})
    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central + 24:central + 28] = struct.pack("<I", 1 << 31)  # uncompressed size: 2 GiB of a stored member
    path.write_bytes(bytes(data))
    refused(load_reference, path, "[mu.npy] declares 2,147,483,648 bytes, more than its", "stored bytes can hold")


def test_pickled_object_arrays_in_an_npz_are_refused(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, mu=np.array([{"a": 1}], dtype=object), allow_pickle=True)
    refused(load_reference, path, "holds Python objects")


def test_honest_npz_references_still_load(tmp_path):
    np.savez_compressed(tmp_path / "cifar10-32x32.npz", mu=np.ones(5), sigma=np.eye(5))
    reference = load_reference(tmp_path / "cifar10-32x32.npz")
    np.testing.assert_array_equal(reference.entries["fid"]["sigma"], np.eye(5))
    assert json.loads(json.dumps(reference.meta))["fid"]["inception_mode"] == "legacy_tensorflow"
