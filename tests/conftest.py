import functools
import gzip
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from sida_diffusers.data.datasets import build_dataset
from sida_diffusers.networks import denoiser_from_official
from sida_diffusers.networks.edm_layers import UNetBlock
from sida_diffusers.networks.precond import EDMPrecond
from sida_diffusers.networks.precond_edm2 import EDM2Precond
from sida_diffusers.training import make_config

import official_pickles


REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"  # the parity fixtures: tests/fixtures/README.md


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


@pytest.fixture(autouse=True)
def _feature_metric_registry(monkeypatch):
    """Each test sees the metric registry as importing the package leaves it: what a test (or a training run inside
    it) registers is gone afterwards, so no test passes because an earlier one registered its metric."""
    from sida_diffusers.evaluation import suite

    monkeypatch.setattr(suite, "_FEATURE_METRICS", dict(suite._FEATURE_METRICS))


BOUNDED_BYTES, BOUNDED_SECONDS = 1 << 30, 5


@pytest.fixture
def bounded():
    """Run a hostile-input case within the issue's bounds: 1 GiB of address space above the current use, 5 seconds.

    A bomb that gets through fails the test (MemoryError, TimeoutError) instead of swapping or hanging the machine.
    """
    import resource
    import signal

    def on_alarm(signum, frame):
        raise TimeoutError(f"the case ran longer than {BOUNDED_SECONDS} s")

    vm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm_kb * 1024 + BOUNDED_BYTES, hard))
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(BOUNDED_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---- the parity fixtures: tiny official networks, their inputs and outputs (tests/fixtures/README.md) -------------

def fixture_info(name: str) -> dict:
    """`official_class`, `init_kwargs` and how the weights are regenerated, for fixture NAME."""
    return json.loads((FIXTURES_DIR / f"{name}.json").read_text())


def fixture_io(name: str) -> dict:
    """The fixed inputs and the official outputs of fixture NAME (float32 tensors by name)."""
    return load_file(str(FIXTURES_DIR / f"{name}_io.safetensors"))


@functools.lru_cache(maxsize=None)
def _gzip_json(filename: str):
    return json.loads(gzip.decompress((FIXTURES_DIR / filename).read_bytes()))


def full_size_shapes() -> dict:
    """Official full-size configurations: `official_class`, `init_kwargs`, `num_params`, `buffers`, `state_dict`."""
    return _gzip_json("full_size_shapes.json.gz")


def fixture_state_dict(name: str) -> dict:
    """The official float32 state dict of fixture NAME, key for key (a fresh copy)."""
    return {key: value.clone() for key, value in _fixture_state_dict(name).items()}


def _redraw(key: str, shape, generator):
    # The fixtures' redraw of every parameter, in named_parameters() order (tests/fixtures/README.md).
    if len(shape) == 0:
        return 0.5 + 0.5 * torch.rand([], generator=generator)
    if len(shape) == 1 and key.rsplit(".", 1)[-1] == "weight":
        return 1 + 0.2 * torch.randn(shape, generator=generator)
    if len(shape) == 1:
        return 0.1 * torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))


def _state_dict_sha256(state: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + b"\0" + state[key].to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def _fixture_state_dict(name: str) -> dict:
    info = fixture_info(name)
    class_name = info["official_class"].rsplit(".", 1)[1]
    with torch.device("meta"):  # only the parameter names, order and shapes are needed
        net = (UNetBlock(**info["init_kwargs"]) if class_name == "UNetBlock"
               else denoiser_from_official(class_name, info["init_kwargs"]))
    generator = torch.Generator().manual_seed(info["reinit_generator_seed"])
    state = {key: _redraw(key, p.shape, generator) for key, p in net.named_parameters()}
    if "round_to" in info:  # EDM2 fixtures: every value was rounded to float16 after the redraw
        state = {key: value.to(getattr(torch, info["round_to"])).float() for key, value in state.items()}
    buffers = FIXTURES_DIR / f"{name}_buffers.safetensors"
    if buffers.exists():
        state.update((key, value.float()) for key, value in load_file(str(buffers)).items())
    if _state_dict_sha256(state) != info["sha256"]:
        raise AssertionError(f"the regenerated weights of fixture {name} are not the official ones (sha256 differs): "
                             f"the parameter names or order of our {class_name}, or torch's random numbers, changed")
    return state


def official_pickle_bytes(name: str, **init_kwargs) -> bytes:
    """Fixture NAME as an official network pickle (tests/official_pickles.py), with the fixture's weights.

    `init_kwargs` changes entries of the network's recorded configuration, not its weights. The embedded module
    source appends to $EDM_PICKLE_PAYLOAD_MARKER if it is ever executed.
    """
    if not init_kwargs:
        return _unchanged_official_pickle(name)
    recipe = _gzip_json(f"{name}_pickle_recipe.json.gz")
    return official_pickles.network_pickle(recipe, _fixture_state_dict(name), name, init_kwargs)


@functools.lru_cache(maxsize=None)
def _unchanged_official_pickle(name: str) -> bytes:
    return official_pickles.network_pickle(_gzip_json(f"{name}_pickle_recipe.json.gz"), _fixture_state_dict(name), name)


def official_pickle(folder: Path, name: str, **init_kwargs) -> Path:
    """`official_pickle_bytes(name, **init_kwargs)` written to `folder/NAME.pkl`."""
    path = folder / f"{name}.pkl"
    path.write_bytes(official_pickle_bytes(name, **init_kwargs))
    return path


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


def edm_uint8(x):
    """ALGORITHM.md §2: (x * 127.5 + 128).clamp(0, 255), truncated; NHWC."""
    return (x.double() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def edm_np(x):
    """What output_type="np" holds for generator output x: EDM's uint8 image / 255 as float32 (Diffusers' range)."""
    return edm_uint8(x).astype(np.float32) / 255


def params(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()]).clone()

def pixel_features():
    """A fixed random projection of 8x8 grey images: a stand-in feature network for the metric wiring."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8)).eval().requires_grad_(False)

def grey_png(size=8):
    """The bytes of a black size x size grey PNG."""
    import io

    import numpy as np
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray(np.zeros((size, size), np.uint8)).save(buf, format="png")
    return buf.getvalue()


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


def fails_in_one_line(capsys, command, argv, *problem):
    """`command.main(argv)` exits with code 2 after one line `PROG: error: ...` naming the problem; nothing else."""
    with pytest.raises(SystemExit) as exited:
        command.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert exited.value.code == 2, err
    assert err.count("\n") == 1 and (err.startswith("sida-") or err.startswith("train_sida")) and ": error: " in err, err
    assert all(str(word) in err for word in problem), err
    assert "wrote" not in out and "exported" not in out, out
    return err


def saved_pipeline(folder, **kwargs):
    """A conditional SiDAPipeline over a tiny EDM generator, saved to `folder` (with its standalone module)."""
    from sida_diffusers.pipelines import SiDAPipeline

    SiDAPipeline(unet=tiny_edm(label_dim=3), id2label={0: "a", 1: "b", 2: "c"}, **kwargs).save_pretrained(folder)
    return folder


# ---- a finished run's checkpoint, which the resume cases damage (each a copy of it) -------------------------------

@pytest.fixture(scope="session")
def finished_checkpoint(tmp_path_factory):
    """A finished tiny SiDA run to 0.016 kimg (two iterations): its one checkpoint folder."""
    from sida_diffusers.training import SiDATrainer

    out = tmp_path_factory.mktemp("finished")
    cfg = tiny_config(out, max_train_kimg=0.016, checkpointing_kimg=0.016, sample_grid_size=0)
    SiDATrainer(cfg, teacher=tiny_teacher(), dataset=build_dataset("digits", resolution=8)).train()
    return out / "run" / "checkpoints" / "checkpoint-000000016"


def copy_of(checkpoint, tmp_path):
    import shutil

    return shutil.copytree(checkpoint, tmp_path / checkpoint.name)


def resume(tmp_path, folder, digits, **overrides):
    """A trainer resuming from checkpoint `folder` into a new output folder under `tmp_path`."""
    from sida_diffusers.training import SiDATrainer

    cfg = tiny_config(tmp_path, resume_from_checkpoint=str(folder), **overrides)
    return SiDATrainer(cfg, teacher=tiny_teacher(), dataset=digits)


def tiny_unet2d(label_dim=0, channels=1, resolution=8, seed=0, scale=0.1, dropout=0.0):
    """A real Diffusers UNet2DModel (attention at the second level) small enough for a CPU step in milliseconds;
    weights redrawn N(0, scale^2) so that outputs depend on the input, the timestep and the label."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=resolution, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
                       num_class_embeds=label_dim or None, dropout=dropout)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return unet.eval()


def save_ddpm_folder(path, unet, **scheduler_kwargs):
    """A Diffusers DDPMPipeline folder (model_index.json, unet/, scheduler/) as DDPMPipeline.save_pretrained writes
    it, the layout of a Hub DDPM checkpoint such as google/ddpm-cifar10-32; returns the scheduler."""
    from diffusers import DDPMPipeline, DDPMScheduler

    scheduler = DDPMScheduler(**scheduler_kwargs)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path, safe_serialization=True)
    return scheduler


# ---- two processes over gloo ------------------------------------------------------------------------------------------

# Trains the run its arguments describe, then saves each rank's flattened generator, EMA and fake-score parameters as
# params_rank{r}.pt in the output folder (so a test can compare the ranks).
RANK_PARAMETERS_SCRIPT = """
import sys, torch
from sida_diffusers.training import SiDATrainer, parse_args

trainer = SiDATrainer(parse_args(sys.argv[1:]))
trainer.train()
nets = {name: torch.cat([p.detach().flatten() for p in trainer.unwrap(getattr(trainer, name)).parameters()])
        for name in ("generator", "generator_ema", "fake_score")}
torch.save(nets, f"{trainer.output_dir}/params_rank{trainer.accelerator.process_index}.pt")
"""


def torchrun(tmp_path, script: str, *args, processes: int = 2, timeout: int = 600):
    """Runs `script` (written to tmp_path/script.py) with `args` in `processes` processes of torch.distributed.run, one
    thread each, and returns the finished process; fails the test with its stderr when it did not succeed."""
    (tmp_path / "script.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), str(tmp_path / "script.py"), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
