"""Tensor and array records that lie about their size are refused before anything is allocated.

Each file here is a few hundred bytes; read naively, each would allocate from gigabytes to terabytes. Every case runs
under the `bounded` fixture (4 GiB of address space above the current use, 20 s), so a bomb that got through would
fail with MemoryError or TimeoutError rather than pass.
"""

import collections
import io
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch

from sida_diffusers.evaluation import load_reference
from sida_diffusers.pretrained import load_denoiser, read_official_pickle
from sida_diffusers.safe_io.pickles import load_official_pickle

from conftest import Call
from conftest import refused_file as refused


def float_storage(numel):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation: official pickles use the legacy storage format
        return torch.zeros(numel).storage()


def tensor_record(storage, offset, size, stride):
    return Call(torch._utils._rebuild_tensor_v2, storage, offset, size, stride, False, collections.OrderedDict())


def checkpoint(tmp_path, entry, name="net.pkl"):
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"ema": entry}, protocol=4))
    return path


# ---- views of a storage ----------------------------------------------------------------------------------------------

def test_a_zero_stride_cannot_turn_four_floats_into_eight_gigabytes(tmp_path, bounded):
    path = checkpoint(tmp_path, tensor_record(float_storage(4), 0, (1 << 31,), (0,)))
    refused(load_denoiser, path, "size [2147483648] and stride [0]", "more than once")


def test_overlapping_strides_cannot_square_a_storage(tmp_path, bounded):
    # 2^18 floats (1 MiB) viewed as a 2^17 x 2^17 matrix with strides (1, 1): 64 GiB if copied.
    path = checkpoint(tmp_path, tensor_record(float_storage(1 << 18), 0, (1 << 17, 1 << 17), (1, 1)))
    refused(read_official_pickle, path, "views storage elements more than once")


def test_a_view_reaching_past_its_storage_is_refused(tmp_path, bounded):
    path = checkpoint(tmp_path, tensor_record(float_storage(4), 0, (1 << 20, 1 << 20), (1 << 20, 1)))
    refused(read_official_pickle, path, "size [1048576, 1048576] reaches outside its storage of 4 elements")


@pytest.mark.parametrize("offset, size, stride",
                         [(-1, (2,), (1,)), (0, (2,), (-1,)), (0, (-2,), (1,)), (9, (1,), (1,))])
def test_negative_geometry_or_an_offset_past_the_storage_is_refused(tmp_path, bounded, offset, size, stride):
    path = checkpoint(tmp_path, tensor_record(float_storage(4), offset, size, stride))
    refused(read_official_pickle, path, "negative offset, size or stride, or an offset past its storage")


def test_transposed_and_sliced_views_of_a_storage_still_load(tmp_path):
    # Views that respect their storage, as torch.save writes them, read exactly as torch reads them.
    base = float_storage(12)
    base.copy_(torch.arange(12.0).storage())
    records = {"transposed": tensor_record(base, 0, (3, 4), (1, 3)), "sliced": tensor_record(base, 2, (2, 2), (4, 1)),
               "gapped": tensor_record(base, 1, (3,), (5,)), "empty": tensor_record(base, 12, (0, 5), (1, 1))}
    path = tmp_path / "views.pkl"
    path.write_bytes(pickle.dumps(records, protocol=4))
    ours, torchs = load_official_pickle(path), pickle.loads(path.read_bytes())
    assert all(torch.equal(ours[k], torchs[k]) for k in records)
    assert ours["sliced"].tolist() == [[2.0, 3.0], [6.0, 7.0]] and ours["gapped"].tolist() == [1.0, 6.0, 11.0]


# ---- element and byte counts -----------------------------------------------------------------------------------------

def storage_blob(count, values=b"\0" * 16):
    """A legacy torch.save of one float storage that announces `count` elements but holds `values`."""
    marker = object()

    class Writer(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", count) if obj is marker else None

    pid = io.BytesIO()
    Writer(pid, protocol=2).dump(marker)
    headers = (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True})
    return (b"".join(pickle.dumps(h, protocol=2) for h in headers) + pid.getvalue() + pickle.dumps(["0"], protocol=2)
            + struct.pack("<q", count) + values)


def test_a_storage_announcing_a_terabyte_over_sixteen_bytes_is_refused(tmp_path, bounded):
    storage = Call(torch.storage._load_from_bytes, storage_blob(1 << 40))
    path = checkpoint(tmp_path, tensor_record(storage, 0, (4,), (1,)))
    refused(load_denoiser, path, "declares 1099511627776 elements", "holds 16 bytes")


def test_a_bytes_object_longer_than_the_file_is_refused_before_it_is_allocated(tmp_path, bounded):
    # BINBYTES8 with a 1 TiB length: CPython's unpickler would allocate the terabyte before reading three bytes.
    path = tmp_path / "bytes8.pkl"
    path.write_bytes(b"\x80\x04" + b"\x8e" + struct.pack("<Q", 1 << 40) + b"abc")
    refused(load_denoiser, path, "is truncated", "BINBYTES8 at byte 2 declares 1099511627776 bytes but only 3 remain",
            "download it again")


def test_a_memo_slot_beyond_the_file_is_refused(tmp_path, bounded):
    # LONG_BINPUT 2^31: the unpickler would grow (and zero) a 16 GiB memo table for a 9-byte file.
    path = tmp_path / "memo.pkl"
    path.write_bytes(b"\x80\x02]r" + struct.pack("<I", 1 << 31) + b".")
    refused(read_official_pickle, path, "memo slot 2147483648", "more than a file of 9 bytes can fill")


# ---- numpy records (reference statistics, EDM2 encoder settings) -----------------------------------------------------

def forged_array(shape, raw=b""):
    """A numpy array record (protocol 2-4 spelling) whose shape does not match its bytes."""
    return Call(np._core.multiarray._reconstruct, np.ndarray, (0,), b"b",
                state=(1, shape, np.dtype("float64"), False, raw))


@pytest.mark.parametrize("record", [
    forged_array((1 << 40,)),
    forged_array((1 << 32, 1 << 32)),  # 2^64 elements: np.prod would wrap around to 0 and match the empty buffer
    Call(np._core.numeric._frombuffer, b"", np.dtype("float64"), (1 << 40,), "C"),  # protocol 5 spelling
], ids=["terabyte", "wrapping-shape", "frombuffer"])
def test_reference_arrays_whose_shape_exceeds_their_bytes_are_refused(tmp_path, bounded, record):
    path = tmp_path / "img512.pkl"
    path.write_bytes(pickle.dumps({"fid": {"mu": record, "sigma": np.eye(2)}}, protocol=4))
    refused(load_reference, path, "needs", "bytes but its record holds 0")


def test_numpy_arrays_in_official_pickles_are_checked_the_same_way(tmp_path, bounded):
    # EDM2 pickles keep the latent scale/bias of their encoder as numpy arrays.
    path = checkpoint(tmp_path, {"scale": forged_array((1 << 40,))})
    refused(read_official_pickle, path, "numpy array of shape [1099511627776] needs 8796093022208 bytes", "holds 0")
