import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from sida_diffusers.data.datasets import build_dataset
from sida_diffusers.networks.precond import EDMPrecond
from sida_diffusers.networks.precond_edm2 import EDM2Precond
from sida_diffusers.training import make_config


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("SIDA_SHARED_DIR", REPO_ROOT.parent / "shared"))
FIXTURES_DIR = SHARED_DIR / "fixtures"

FIXTURES_MISSING = (f"parity fixtures not found at {FIXTURES_DIR} (they live in ../shared/fixtures beside the repo; "
                    "set SIDA_SHARED_DIR to point elsewhere)")
requires_fixtures = pytest.mark.skipif(not (FIXTURES_DIR / "README.md").exists(), reason=FIXTURES_MISSING)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The suite runs single-threaded: its tiny networks gain nothing from threads, the 2-core CI machine stays free
    for the subprocesses some tests start, and in-process float results match those 1-thread subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fixtures_dir():
    if not (FIXTURES_DIR / "README.md").exists():
        pytest.skip(FIXTURES_MISSING)
    return FIXTURES_DIR


@pytest.fixture
def bounded():
    """Run a hostile-input case within the issue's bounds: 4 GiB of address space above the current use, 20 seconds.

    A bomb that gets through fails the test (MemoryError, TimeoutError) instead of swapping or hanging the machine.
    """
    import resource
    import signal

    def on_alarm(signum, frame):
        raise TimeoutError("the case ran longer than 20 s")

    vm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm_kb * 1024 + (4 << 30), hard))
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---- helpers shared by the test modules (import them with `from conftest import ...`) ---------------------------

ID2LABEL = {0: "zero, nought", 1: "one", 2: "two"}


def tiny_edm(label_dim=0, channels=3, augment_dim=9, resolution=8, seed=0):
    """A real EDMPrecond + SongUNet small enough to run in milliseconds.

    Weights are redrawn N(0, 0.3^2): EDM's zero-initialised output layer would otherwise make F ~ 1e-5, so images
    would not depend on labels or on the network at all.
    """
    net = EDMPrecond(img_resolution=resolution, img_channels=channels, label_dim=label_dim, model_type="SongUNet",
                     model_kwargs=dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[],
                                       augment_dim=augment_dim, dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return net.eval()


def tiny_vae():
    """A random AutoencoderKL with 4 latent channels and a 2x upsampling decoder."""
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=16).eval()

def tiny_teacher(label_dim=10, augment_dim=0, channels=1, resolution=8, seed=0):
    """An EDM-preconditioned DDPM++ SongUNet small enough for a CPU step in well under a second."""
    torch.manual_seed(seed)
    return EDMPrecond(img_resolution=resolution, img_channels=channels, label_dim=label_dim, model_type="SongUNet",
                      model_kwargs=dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[],
                                        augment_dim=augment_dim, dropout=0.1)).eval()


def tiny_edm2(dropout=0.2, logvar_channels=16, seed=0):
    """A real EDM2Precond (8x8x4 latents, 10 classes, attention at 4x4) with weights redrawn N(0, 0.3^2): EDM2's
    zero-initialised gains would otherwise leave most outputs and gradients zero."""
    torch.manual_seed(seed)
    net = EDM2Precond(img_resolution=8, img_channels=4, label_dim=10, model_channels=16, channel_mult=[1, 2],
                      num_blocks=1, attn_resolutions=[4], channels_per_head=8, dropout=dropout,
                      logvar_channels=logvar_channels, use_fp16=False)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape))
    return net.eval()


def write_latents(root, moments, labels):
    """An EDM2 dataset_tool-style latent folder: 00000/img-mean-std-XXXXXXXX.npy plus dataset.json."""
    entries = []
    for i, m in enumerate(moments):
        name = f"00000/img-mean-std-{i:08d}.npy"
        (root / "00000").mkdir(parents=True, exist_ok=True)
        np.save(root / name, m)
        entries.append([name, int(labels[i])])
    (root / "dataset.json").write_text(json.dumps({"labels": entries}))


def tiny_config(tmp_path, **overrides):
    values = dict(teacher="tiny", method="sida", train_data="digits", resolution=8, train_batch_size=4,
                  total_batch_size=8, warmup_kimg=0.008, adversarial_start_kimg=0.016, max_train_kimg=0.032,
                  checkpointing_kimg=0.016, log_every_kimg=0.008, ema_halflife_kimg=0.05, lr=1e-3, glr=1e-3,
                  sample_grid_size=2, seed=1, cpu=True, output_dir=str(tmp_path / "run"))
    return make_config(**{**values, **overrides})


@pytest.fixture(scope="module")
def digits8():
    return build_dataset("digits", resolution=8)


@pytest.fixture(scope="module")
def digits16():
    return build_dataset("digits")


def params(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()]).clone()

def pixel_features():
    """A fixed random projection of 8x8 grey images: a stand-in feature network for the metric wiring."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8)).eval().requires_grad_(False)

def png_header(width, height):
    """A PNG whose header declares width x height 8-bit grey pixels, in 70 bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")

class Call:
    """Pickles as `func(*args)` (then BUILD with `state`): how official pickles record tensors and numpy arrays."""

    def __init__(self, func, *args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)

def refused_file(load, path, *problem):
    """`load(path)` raises a ValueError naming the file and every word of the problem."""
    with pytest.raises(ValueError) as error:
        load(path)
    message = str(error.value)
    assert str(path) in message and all(word in message for word in problem), message
    return message
