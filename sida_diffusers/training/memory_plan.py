"""The memory plan of a run (`--plan`, `sida-plan`; ALGORITHM.md §13.4): what one process holds, before anything is
allocated.

The networks are built on the meta device and run as fake tensors (`FakeTensorMode`: shapes and dtypes, no memory),
so a 1.5 B-parameter teacher is planned on a laptop. Static memory is counted from the parameter counts; the
activations of the generator phase (the peak: the generator's, the teacher's and the fake score's forward graphs are
alive together, §13.4) are measured at two small batches by counting the bytes of every tensor still alive after the
forward passes, and extrapolated linearly. `check_fits` stops a run before step 1 when the plan clearly exceeds the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import weakref
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from sida_diffusers.networks.base import Denoiser
from sida_diffusers.training.config import TrainConfig


ARCHITECTURES_FILE = Path(__file__).resolve().parent / "architectures.json"
GB = 1e9  # plans are printed in GB (10^9 bytes), as GPU memory is advertised
FP32 = 4
ACCURACY = 0.2  # the plan is within 20 % of the measured peak (benchmarks/RESULTS.md); "clearly too big" is beyond it
MEMORY_SIZES_GB = (24, 48, 80, 141)


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensors created under it that are still alive (`current`) and their maximum (`peak`),
    on meta tensors too. Storages that exist when it starts (`ignore`: weights, buffers) are never counted, views of
    them included."""

    def __init__(self, ignore=()):
        super().__init__()
        self.current = self.peak = 0
        self._seen = WeakIdKeyDictionary()
        for tensor in ignore:
            self._seen[tensor.untyped_storage()] = 0

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage not in self._seen:
                    self._seen[storage] = nbytes = storage.nbytes()
                    weakref.finalize(storage, self._free, nbytes)
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
        return out


@dataclasses.dataclass(frozen=True)
class NetworkSizes:
    """Parameter counts of the three networks, and of the largest FSDP unit and the root unit of the generator."""

    generator: int
    fake_score: int
    teacher: int
    largest_block: int
    root: int


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-process bytes of a run (ALGORITHM.md §13.4). `activations(B)` = fixed + per_image * B."""

    sizes: NetworkSizes
    act_fixed: float
    act_per_image: float
    precision: str
    gradient_checkpointing: bool
    fused_adam: bool

    def activations(self, batch: int) -> float:
        return self.act_fixed + self.act_per_image * batch

    def components(self, fsdp: bool, processes: int, batch: int, rounds: int = 1) -> dict:
        """Bytes per process, by what holds them. Sharded terms are divided by the process count under FSDP."""
        s, n = self.sizes, processes if fsdp else 1
        trained, stepped = s.generator + s.fake_score, max(s.generator, s.fake_score)
        parts = {"generator + fake score": FP32 * trained / n, "gradients": FP32 * stepped / n,
                 "Adam states": 2 * FP32 * trained / n, "EMA": FP32 * s.generator / n, "teacher": FP32 * s.teacher / n,
                 "DDP buckets": FP32 * trained if not fsdp and processes > 1 else 0.0,
                 # FSDP: three root units kept unsharded through the G phase, the block in use and the prefetched one,
                 # and the block's unsharded gradient before its reduce-scatter
                 "FSDP gathered": FP32 * (3 * s.root + 3 * s.largest_block) if fsdp else 0.0,
                 f"activations (B={batch})": self.activations(batch)}
        # The peak is the G phase, or the optimizer step (foreach Adam's temporaries) if that is larger; gradients of
        # earlier accumulation rounds are alive during the later rounds' forward passes.
        step = 0.0 if self.fused_adam else FP32 * stepped / n
        phase = parts[f"activations (B={batch})"] + (parts["gradients"] if rounds > 1 else 0.0)
        parts["peak"] = (sum(v for k, v in parts.items() if k not in ("gradients", f"activations (B={batch})"))
                         + max(phase, parts["gradients"] + step))
        return parts

    def peak(self, fsdp: bool, processes: int, batch: int, rounds: int = 1) -> float:
        return self.components(fsdp, processes, batch, rounds)["peak"]

    def max_batch(self, fsdp: bool, processes: int, memory_bytes: float, total_batch: Optional[int] = None,
                  limit: int = 4096) -> int:
        """The largest per-process batch whose planned peak fits `memory_bytes` (0: not even one image)."""
        best = 0
        for batch in range(1, limit + 1):
            rounds = max(1, (total_batch or batch * processes) // (batch * processes))
            if self.peak(fsdp, processes, batch, rounds) > memory_bytes:
                break
            best = batch
        return best


# ---- building the networks as fake tensors ---------------------------------------------------------------------

def load_architectures() -> dict:
    return {k: v for k, v in json.loads(ARCHITECTURES_FILE.read_text()).items() if not k.startswith("_")}


def teacher_factory(source: str):
    """A function building the teacher named by `--teacher` without its weights: a preset teacher (its official
    architecture), a shipped teacher or a Diffusers folder (its config.json)."""
    from sida_diffusers.networks import denoiser_classes, denoiser_from_official
    from sida_diffusers.networks.unet2d import UNet2DDenoiser, check_scheduler_config, check_unet_config
    from sida_diffusers.safe_io.files import read_json
    from sida_diffusers.safe_io.model_files import check_model_folder, read_model_config
    from sida_diffusers.safe_io.unet2d_files import find_unet2d
    from sida_diffusers.shipped import SHIPPED_TEACHERS, shipped_teacher_path

    name = source.removesuffix("-fid").removesuffix("-dino")
    architectures = load_architectures()
    if name in architectures:
        spec = architectures[name]
        if spec["class_name"] == "UNet2DDenoiser":
            return lambda: UNet2DDenoiser(**spec["init_kwargs"])
        return lambda: denoiser_from_official(spec["class_name"], spec["init_kwargs"])
    folder = shipped_teacher_path(source) if source in SHIPPED_TEACHERS else Path(source)
    unet2d = find_unet2d(folder) if folder.is_dir() else None
    if unet2d is not None:  # a DDPM/DDIM teacher: its UNet2DModel config and scheduler config
        unet_config = check_unet_config(read_model_config(unet2d[0]), str(unet2d[0]))
        scheduler_config = check_scheduler_config(read_json(unet2d[1]), str(unet2d[1]))
        return lambda: UNet2DDenoiser(unet_config=unet_config, scheduler_config=scheduler_config)
    if (folder / "unet" / "config.json").is_file() and not (folder / "config.json").is_file():
        folder = folder / "unet"
    if not (folder / "config.json").is_file():
        raise ValueError(f"--plan needs the teacher's architecture without reading its weights: {source!r} is neither "
                         f"a preset teacher ({', '.join(sorted(architectures))}) nor a Diffusers folder; convert it "
                         "once with `sida-convert SRC DIR` and plan with --teacher DIR.")
    config = read_json(folder / "config.json")
    cls = denoiser_classes().get(config.get("_class_name") if isinstance(config, dict) else None)
    if cls is None:
        raise ValueError(f"{folder}/config.json does not name a sida_diffusers denoiser; point --teacher at one.")
    check_model_folder(cls, folder)
    return lambda: cls.from_config(config)


def _sizes(teacher: Denoiser, fake: Denoiser, gen: Denoiser) -> NetworkSizes:
    count = lambda module: sum(p.numel() for p in module.parameters())
    blocks = [m for m in gen.modules() if type(m).__name__ in set(gen._no_split_modules or ())]
    return NetworkSizes(generator=count(gen), fake_score=count(fake), teacher=count(teacher),
                        largest_block=max((count(b) for b in blocks), default=0),
                        root=count(gen) - sum(count(b) for b in blocks))


@contextlib.contextmanager
def _fused_attention_on_meta():
    """Meta tensors take attention's math path, which keeps the [L, L] attention weights for backward; GPUs (and
    CPUs) run a fused kernel that keeps only the output and its log-sum-exp. Plans count the fused kernel's tensors."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def fused(q, k, v, *args, **kwargs):
        plain = not args and kwargs.get("attn_mask") is None and not kwargs.get("dropout_p") \
            and not kwargs.get("is_causal") and kwargs.get("scale") is None
        if q.device.type == "meta" and q.dim() == 4 and plain:  # fused kernels take 4-d only
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]
        return original(q, k, v, *args, **kwargs)

    functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def _generator_phase_bytes(cfg: TrainConfig, teacher, fake, gen, batch: int, device: str) -> int:
    """Bytes alive after the forward passes of the generator phase (`SiDATrainer.generator_phase`): G with gradients,
    the teacher and the fake score frozen but differentiated through, for `batch` images (ALGORITHM.md §13.4)."""
    from sida_diffusers.losses import generator_sigma

    weights = [t for net in (teacher, fake, gen) for t in (*net.parameters(), *net.buffers())]
    c, r = teacher.img_channels, teacher.img_resolution
    labels = torch.zeros(batch, teacher.label_dim, device=device) if teacher.label_dim else None
    augment = torch.zeros(batch, teacher.augment_dim, device=device) if teacher.augment_dim else None
    with LiveTensorBytes(ignore=weights) as tracker, \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
        x_g = gen(torch.randn(batch, c, r, r, device=device) * cfg.init_sigma, cfg.init_sigma, labels, augment)
        sigma = generator_sigma(batch, cfg.tmax, device=device)
        x_t = x_g + torch.randn_like(x_g) * sigma
        outputs = (x_g, teacher(x_t, sigma, labels, augment),
                   fake(x_t, sigma, labels, augment, return_flag="encoder_decoder" if cfg.is_adversarial else "decoder",
                        return_logvar=cfg.use_logvar))
        alive = tracker.current
    del outputs
    return alive


def _largest_block_bytes(net, batch: int, device: str) -> int:
    """The most bytes one block keeps for its backward (what checkpointing recomputes at once), at `batch` images."""
    deltas, names = [], set(net._no_split_modules or ())
    blocks = [m for m in net.modules() if type(m).__name__ in names]
    switches = [m for m in net.modules() if getattr(m, "gradient_checkpointing", False)]
    with LiveTensorBytes(ignore=[*net.parameters(), *net.buffers()]) as tracker:
        hooks = [b.register_forward_pre_hook(lambda *a: deltas.append(-tracker.current)) for b in blocks]
        hooks += [b.register_forward_hook(lambda *a: deltas.append(deltas.pop() + tracker.current)) for b in blocks]
        for module in switches:
            module.gradient_checkpointing = False
        try:
            labels = torch.zeros(batch, net.label_dim, device=device) if net.label_dim else None
            net(torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, device=device), 1.0,
                labels)
        finally:
            for module in switches:
                module.gradient_checkpointing = True
            for hook in hooks:
                hook.remove()
    return max(deltas, default=0)


def make_plan(cfg: TrainConfig, factory, fused_adam: Optional[bool] = None) -> MemoryPlan:
    """The plan of `cfg` with the teacher `factory()` builds; nothing is allocated. fp32 and fp16 runs are measured on
    meta tensors (fp16: the networks' CUDA float16 path), bf16 runs as fake CPU tensors under CPU autocast (the same
    lists for the convolutions and matrix products that hold the activations; meta tensors cannot autocast)."""
    from sida_diffusers.training.students import student_networks

    with torch.device("meta"):
        teacher = factory().eval().requires_grad_(False)
        fake, gen = student_networks(cfg, teacher, None)
    fake.eval().requires_grad_(False)
    gen.train().requires_grad_(True)
    for net in (teacher, fake, gen):
        if cfg.gradient_checkpointing:
            net.enable_gradient_checkpointing()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if cfg.mixed_precision == "bf16" else None
    with fake_mode or _fused_attention_on_meta():
        if fake_mode is not None:
            for net in (teacher, fake, gen):  # meta (no data) to fake CPU tensors (no data either, but autocast)
                net.to_empty(device="cpu")
        device = "cpu" if fake_mode is not None else "meta"
        one, two = (_generator_phase_bytes(cfg, teacher, fake, gen, b, device) for b in (1, 2))
        if cfg.gradient_checkpointing:  # backward recomputes one block at a time, on top of what is kept
            one, two = (a + _largest_block_bytes(gen, b, device) for a, b in ((one, 1), (two, 2)))
    fused = fused_adam if fused_adam is not None else (cfg.adam_fused if cfg.adam_fused is not None else True)
    return MemoryPlan(_sizes(teacher, fake, gen), act_fixed=2 * one - two, act_per_image=two - one,
                      precision=cfg.mixed_precision, gradient_checkpointing=cfg.gradient_checkpointing,
                      fused_adam=fused)


def rounds_for(cfg: TrainConfig, processes: int) -> int:
    total = cfg.total_batch_size or cfg.train_batch_size * processes
    return max(1, total // (cfg.train_batch_size * processes))


# ---- the printed plan and the check before step 1 -------------------------------------------------------------

def format_plan(cfg: TrainConfig, plan: MemoryPlan, processes: Sequence[int], memory_gb: Sequence[float]) -> str:
    """The table `--plan` prints: per-process GB under DDP and FSDP for each process count, and the largest
    per-process batch that fits each memory size."""
    layouts = [(fsdp, n) for n in processes for fsdp in (False, True) if not (fsdp and n == 1) or len(processes) == 1]
    head = [f"{'FSDP' if fsdp else 'DDP'} x{n}" for fsdp, n in layouts]
    s, b = plan.sizes, cfg.train_batch_size
    lines = [f"memory plan for {cfg.preset or 'custom'} ({cfg.method}), teacher {cfg.teacher}: "
             f"{s.generator / 1e6:.1f} M generator / {s.fake_score / 1e6:.1f} M fake score / {s.teacher / 1e6:.1f} M "
             f"teacher parameters, precision {cfg.mixed_precision}, gradient checkpointing "
             f"{'on' if cfg.gradient_checkpointing else 'off'}, per-process batch B={b}",
             f"activations of the generator phase: {plan.act_per_image / GB:.3f} GB per image + "
             f"{plan.act_fixed / GB:.3f} GB (measured at B=1 and 2 on meta tensors, extrapolated"
             f"{'; with the largest block recomputed in backward' if cfg.gradient_checkpointing else ''})",
             "", f"{'GB per process':<28}" + "".join(f"{h:>11}" for h in head)]
    rows = [plan.components(fsdp, n, b, rounds_for(cfg, n)) for fsdp, n in layouts]
    for key in rows[0]:
        lines.append(f"{key:<28}" + "".join(f"{row[key] / GB:>11.2f}" for row in rows))
    lines.append("")
    for gb in memory_gb:
        fits = [plan.max_batch(fsdp, n, gb * GB, cfg.total_batch_size) for fsdp, n in layouts]
        lines.append(f"{f'largest B on {gb:g} GB':<28}" + "".join(f"{f:>11}" for f in fits))
    lines.append("(B = per-process batch; 0: not even one image fits. Keep the preset's B to reproduce the paper: "
                 "it is part of SiDA's objective; more processes or accumulation rounds keep the global batch.)")
    return "\n".join(lines)


def check_fits(cfg: TrainConfig, teacher: Denoiser, device: torch.device, processes: int) -> None:
    """Before step 1: raise when the plan exceeds the memory of one process by more than the plan's accuracy
    (`--gpu_memory_gb`, else the GPU's own memory; CPU runs are checked only when the flag is given)."""
    if cfg.gpu_memory_gb is not None:
        memory = cfg.gpu_memory_gb * GB
    elif device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        return
    plan = make_plan(cfg, lambda: type(teacher).from_config(teacher.config),
                     fused_adam=cfg.adam_fused if cfg.adam_fused is not None else device.type == "cuda")
    rounds = rounds_for(cfg, processes)
    peak = plan.peak(cfg.fsdp, processes, cfg.train_batch_size, rounds)
    if peak <= memory * (1 + ACCURACY):
        return
    fits = plan.max_batch(cfg.fsdp, processes, memory, cfg.total_batch_size)
    other = plan.max_batch(not cfg.fsdp, processes, memory, cfg.total_batch_size) if processes > 1 else 0
    advice = [f"--train_batch_size {fits}" if fits else None,
              f"{'--no-fsdp' if cfg.fsdp else '--fsdp'} (B up to {other})" if other > fits else None,
              None if cfg.gradient_checkpointing else "--gradient_checkpointing"]
    raise ValueError(f"this launch will not fit: the memory plan needs {peak / GB:.1f} GB per process "
                     f"({'FSDP' if cfg.fsdp else 'DDP'} over {processes}, B={cfg.train_batch_size}) but "
                     f"{memory / GB:.1f} GB are available; try {' or '.join(a for a in advice if a) or 'more processes'}"
                     " (`--plan` prints the whole plan).")
