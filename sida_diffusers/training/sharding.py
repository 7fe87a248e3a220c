"""Sharded training (`--fsdp`): torch's FSDP2 `fully_shard` on the process group Accelerate set up (ALGORITHM.md §13).

One code path for CPU (gloo) and GPU (NCCL): Accelerate launches the processes and creates the group, this module
shards. Accelerate's own FSDP plugin is not used: it does not shard on CPU, and its FSDP configuration is mapped onto
`--fsdp` by `launch.make_accelerator`.

* Sharded: the generator, the fake score, the frozen teacher and the generator's EMA, each block of the class named in
  the network's `_no_split_modules` a unit, the rest of the network (embeddings, output layer, logvar head) the root
  unit (§13.1). Parameters stay float32; the networks apply their own precision (§1.4), so every gathered weight is
  the weight a DDP run uses.
* Not sharded: 0-d parameters (EDM2's gains, which `fully_shard` refuses) stay replicated; their gradients are
  averaged by `reduce_replicated_grads`, in parameter order, before each optimizer step.
* Checkpoints hold full tensors in the package's layout (§13.3): `full_state_dict` / `full_optimizer_state` gather
  them (collectives: every process calls them), `load_full_state_dict` / `load_full_optimizer_state` cut this
  process's shards out of them, so a checkpoint does not depend on how the run that wrote it was laid out.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def ensure_process_group(device: torch.device) -> None:
    """A one-process group when no launcher made one: `--fsdp` then runs (and is tested) on a single device."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


def device_mesh(device: torch.device) -> DeviceMesh:
    """The 1-d mesh of every process of the run, on `device`'s type (the group Accelerate initialised)."""
    ensure_process_group(device)
    return init_device_mesh(device.type, (dist.get_world_size(),))


def is_sharded(net: torch.nn.Module) -> bool:
    return isinstance(net, FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (the tensor itself otherwise), for element-wise work in place."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def replicated_params(net: torch.nn.Module) -> list:
    """The parameters `fully_shard` cannot shard (0-d), in the network's parameter order."""
    return [p for p in net.parameters() if p.ndim == 0]


def shard_network(net: torch.nn.Module, mesh: DeviceMesh) -> torch.nn.Module:
    """`fully_shard` every block named in `net._no_split_modules`, then `net` itself (ALGORITHM.md §13.1)."""
    replicated = set(replicated_params(net))
    block_names = set(getattr(net, "_no_split_modules", None) or ())
    # Every unit, the root too, is resharded after its forward: the generator also runs under no_grad (no backward
    # to reshard it), and the EMA update reads the shards right after the generator phase.
    options = dict(mesh=mesh, ignored_params=replicated, reshard_after_forward=True)
    for module in net.modules():
        if type(module).__name__ in block_names:
            fully_shard(module, **options)
    fully_shard(net, **options)
    return net


def reduce_replicated_grads(net: torch.nn.Module) -> None:
    """Average the gradients of the replicated parameters over the processes (FSDP reduces all others)."""
    params = [p for p in replicated_params(net) if p.requires_grad]
    if not params or dist.get_world_size() == 1:
        return
    flat = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat):
        p.grad = g.clone()


# ---- full tensors in, full tensors out (checkpoints, sampling) ---------------------------------------------------

def _full_cpu(tensor: torch.Tensor, keep: bool) -> Optional[torch.Tensor]:
    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # all-gather: every process takes part
    return full.detach().to("cpu", copy=True) if keep else None


def full_state_dict(net: torch.nn.Module, keep: bool) -> Optional[dict]:
    """Every tensor of `net` at its full shape, on the CPU, where `keep` (the main process); None elsewhere."""
    state = {name: _full_cpu(value, keep) for name, value in net.state_dict().items()}
    return state if keep else None


def load_full_state_dict(net: torch.nn.Module, state: dict) -> None:
    """Load full-shape tensors (every process holds them) into `net`, each process keeping its own shards."""
    with torch.no_grad():
        for name, target in net.state_dict(keep_vars=True).items():
            value = state[name].to(device=target.device, dtype=target.dtype)
            if isinstance(target, DTensor):
                value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
            target.copy_(value)


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> Optional[dict]:
    """`optimizer.state_dict()` with every sharded state tensor gathered to its full shape (main process: `keep`):
    the state a DDP run of the same networks would hold."""
    state = optimizer.state_dict()
    per_param = {index: {slot: (_full_cpu(value, keep) if torch.is_tensor(value) else value)
                         for slot, value in slots.items()}
                 for index, slots in sorted(state["state"].items())}
    return {"state": per_param, "param_groups": state["param_groups"]} if keep else None


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state (as `full_optimizer_state` or a DDP run writes it), cutting out this process's
    shard of every state tensor of a sharded parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {}
    for index, slots in state["state"].items():
        param = params[int(index)]
        per_param[index] = {
            slot: (distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
                   if isinstance(param, DTensor) and torch.is_tensor(value) and value.ndim > 0 else value)
            for slot, value in slots.items()}
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})


def unsharded_class(net: torch.nn.Module) -> type:
    """The network's own class (FSDP2 swaps in a subclass named FSDP<class>)."""
    cls = type(net)
    return next(base for base in cls.__bases__ if base is not FSDPModule) if is_sharded(net) else cls


def plain_copy(net: torch.nn.Module, state: dict, device) -> torch.nn.Module:
    """An ordinary (unsharded) copy of `net` holding the full tensors `state`, frozen, in eval mode: what the main
    process samples, evaluates and exports with (built on meta, so nothing is allocated twice)."""
    with torch.device("meta"):
        copy = unsharded_class(net).from_config(net.config)
    copy.load_state_dict(state, assign=True)
    return copy.to(device).eval().requires_grad_(False)


class FullStateView:
    """A sharded network or optimizer as `checkpointing.load_checkpoint` sees it: shapes and parameters at full size
    (DTensors report their global shape), `load_state_dict` taking the full tensors a checkpoint holds."""

    def __init__(self, target):
        self.target = target

    def state_dict(self) -> dict:
        return self.target.state_dict()

    @property
    def param_groups(self):
        return self.target.param_groups

    def load_state_dict(self, state: dict) -> None:
        if isinstance(self.target, torch.optim.Optimizer):
            load_full_optimizer_state(self.target, state)
        else:
            load_full_state_dict(self.target, state)


class NetworkLayout:
    """How a run's networks are spread over its processes, the one place the trainer asks: DDP through Accelerate
    (`accelerator.prepare`, the default) or FSDP2 (`--fsdp`). Methods marked collective are called by every process."""

    def __init__(self, accelerator, fsdp: bool):
        self.accelerator, self.sharded = accelerator, fsdp
        self.main = accelerator.is_main_process

    def shard(self, networks, device: torch.device) -> None:
        """FSDP: shard every network in place over one mesh (before their optimizers exist); DDP: nothing."""
        if self.sharded:
            mesh = device_mesh(device)
            for net in networks:
                shard_network(net, mesh)

    def prepare(self, *trained):
        """The trained networks as the loop calls them: DDP-wrapped, or the sharded modules themselves."""
        return trained if self.sharded else self.accelerator.prepare(*trained)

    def no_sync(self, model):
        """DDP: defer the all-reduce to the last accumulation round (§5.3). FSDP: nothing deferred; gradients are
        reduce-scattered at every backward, so they stay sharded between rounds (ALGORITHM.md §13.1)."""
        return contextlib.nullcontext() if self.sharded else self.accelerator.no_sync(model)

    def gradients(self, net: torch.nn.Module) -> list:
        """The gradients of `net` ready for the optimizer step, as tensors this process may change in place: under FSDP
        its shards, after the replicated parameters' gradients are averaged over the processes."""
        if self.sharded:
            reduce_replicated_grads(net)
        return [local(p.grad) for p in net.parameters() if p.grad is not None]

    def full_copy(self, net: torch.nn.Module, device):
        """Collective. The network unsharded: a copy on `device` on the main process, None elsewhere (FSDP); the
        network itself (DDP)."""
        if not self.sharded:
            return net
        state = full_state_dict(net, keep=self.main)
        return plain_copy(net, state, device) if self.main else None

    @contextlib.contextmanager
    def gathered(self, net: torch.nn.Module, device, active: bool = True):
        """Collective. `full_copy` for the duration of the block (`active`; otherwise nothing is gathered and the
        block gets None under FSDP)."""
        yield self.full_copy(net, device) if active or not self.sharded else None

    def full_states(self, networks: dict, **optimizers) -> tuple:
        """Collective. ``(networks, optimizer state dicts)`` as a checkpoint holds them, with full tensors (under FSDP:
        CPU copies on the main process)."""
        full = {name: self.full_copy(net, "cpu") for name, net in networks.items()}
        if not self.sharded:
            return full, {name: opt.state_dict() for name, opt in optimizers.items()}
        return full, {name: full_optimizer_state(opt, keep=self.main) for name, opt in optimizers.items()}

    def checkpoint_views(self, networks: dict, **optimizers) -> tuple:
        """``(networks, optimizers)`` as `checkpointing.load_checkpoint` loads full tensors into them (§13.3)."""
        view = FullStateView if self.sharded else (lambda target: target)
        return ({name: view(n) for name, n in networks.items()}, {name: view(o) for name, o in optimizers.items()})
