"""The EDM2 magnitude-preserving UNet (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models"), with SiDA's encoder / encoder-decoder outputs (ALGORITHM.md §1.3, §3).

Parameter names, shapes and constructor keywords equal NVlabs/edm2 `training/networks_edm2.py`, so official state
dicts load key for key. Two deliberate differences from the official code:

* `MPConv.forward` never writes to its weight. The official layer force-normalises its weight in place at every
  training-mode forward; with two forwards sharing one graph (SiDA's fake/real D step) that breaks autograd
  (ALGORITHM.md §1.3 warning, §10 item 13). Forced normalisation is `normalize_mpconv_weights_`, called once per
  phase by the trainer (`EDM2Precond.normalize_weights_`).
* Self-attention uses `scaled_dot_product_attention` (fused kernels on GPU, softmax accumulated in fp32) and the
  output clip is out of place, so activations can be kept for backward.

Everything is written so that torch.compile can fuse it: no data-dependent Python branches, no host syncs.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from sida_diffusers.networks.base import RETURN_FLAGS


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """Scale `x` to unit RMS over `dim` (default: all but the first); the norm is taken in fp32 (Equation 66)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU (Equation 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving weighted sum (Equation 88); `t` is the weight of `b`."""
    return a.lerp(b.to(a.dtype), t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation (Equation 103); `t` balances `a` (0) against `b` (1)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b.to(a.dtype) * (c / math.sqrt(nb) * t)], dim=dim)


def resample(x: torch.Tensor, f: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """Down- or upsample by 2 with the separable filter `f` (normalised to unit sum), or keep `x` as it is."""
    if mode == "keep":
        return x
    if mode not in ("down", "up"):
        raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got {mode!r}.")
    if list(f) == [1, 1]:  # the only filter EDM2 uses: plain box filter, done with the fast pooling kernels
        return F.avg_pool2d(x, 2) if mode == "down" else F.interpolate(x, scale_factor=2.0, mode="nearest")
    if len(f) % 2:
        raise ValueError(f"resample filter must have an even number of taps, got {list(f)}.")
    taps = torch.as_tensor(f, dtype=torch.float32)
    kernel = torch.outer(taps, taps) / taps.sum() ** 2
    c, pad = x.shape[1], (len(f) - 1) // 2
    if mode == "down":
        kernel = kernel.to(x.device, x.dtype).expand(c, 1, -1, -1)
        return F.conv2d(x, kernel, groups=c, stride=2, padding=pad)
    kernel = (kernel * 4).to(x.device, x.dtype).expand(c, 1, -1, -1)  # x4 keeps the magnitude after zero-stuffing
    return F.conv_transpose2d(x, kernel, groups=c, stride=2, padding=pad)


class MPFourier(torch.nn.Module):
    """Magnitude-preserving Fourier features sqrt(2) cos(f c + phi) (Equation 75).

    The random `freqs` / `phases` are persistent buffers: a checkpoint's values must be loaded, never redrawn.
    Computed in fp32 whatever the input dtype or autocast state (a broadcast product, not an autocast matmul).
    """

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32)[:, None] * self.freqs.to(torch.float32) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution (`kernel=[k, k]`) or fully connected layer (`kernel=[]`) (Equation 47).

    The forward pass applies the "traditional" weight normalisation w / (eps + ||w_o|| / sqrt(fan_in)) and the
    factor gain / sqrt(fan_in), in fp32, then casts the weight to the activation dtype. It never writes to
    `weight`: forced normalisation is `normalize_mpconv_weights_` (ALGORITHM.md §1.3).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        w = normalize(self.weight.to(torch.float32))
        gain = gain.to(torch.float32) if torch.is_tensor(gain) else gain  # fp16 checkpoints hold fp16 gains
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


@torch.no_grad()
def normalize_mpconv_weights_(module: torch.nn.Module) -> torch.nn.Module:
    """Forced weight normalisation (Equation 66): rescale every MPConv weight in `module` to unit RMS per output
    channel, in place. Idempotent up to a factor 1/(1+1e-4); outputs barely move since forward re-normalises."""
    for layer in module.modules():
        if isinstance(layer, MPConv):
            layer.weight.copy_(normalize(layer.weight.to(torch.float32)))
    return module


class Block(torch.nn.Module):
    """Encoder or decoder residual block with optional self-attention (Figure 21)."""

    def __init__(
        self,
        in_channels: int,                 # Input channels.
        out_channels: int,                # Output channels.
        emb_channels: int,                # Embedding channels.
        flavor: str = "enc",              # "enc": skip conv + pixel norm before the residual; "dec": skip conv after.
        resample_mode: str = "keep",      # "keep", "up" or "down".
        resample_filter=(1, 1),           # Separable resampling filter.
        attention: bool = False,          # Self-attention after the residual branch?
        channels_per_head: int = 64,      # Channels per attention head.
        dropout: float = 0,               # Dropout probability in the residual branch.
        res_balance: float = 0.3,         # Balance between main branch (0) and residual branch (1).
        attn_balance: float = 0.3,        # Balance between main branch (0) and self-attention (1).
        clip_act: Optional[float] = 256,  # Clip output activations to +-clip_act. None = no clipping.
    ):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"Block flavor must be 'enc' or 'dec', got {flavor!r}.")
        if attention and out_channels % channels_per_head:
            raise ValueError(
                f"an attention block with {out_channels} channels cannot be split into heads of channels_per_head="
                f"{channels_per_head}; choose channels_per_head dividing every channel count with attention."
            )
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Main branch: the encoder projects and pixel-normalises before the residual branch.
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)

        # Residual branch, modulated by the embedding (scale = 1 + gain * linear(emb)).
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.dropout:
            y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            x = mp_sum(x, self.attention(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over pixels with pixel-normalised q, k, v (cosine attention)."""
        n, c, h, w = x.shape
        # Fused qkv channels are ordered (head, channel, q/k/v), as in the official checkpoints.
        qkv = self.attn_qkv(x).reshape(n, self.num_heads, c // self.num_heads, 3, h * w)
        # Pixel-normalise per head, then lay q, k, v out contiguously as [n, heads, pixels, channels] for the
        # fused attention kernels (they want a unit stride in the last dimension).
        q, k, v = normalize(qkv, dim=2).permute(3, 0, 1, 4, 2).contiguous().unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(channels per head), as the official einsum
        return self.attn_proj(y.transpose(2, 3).reshape(n, c, h, w))


class UNet(torch.nn.Module):
    """EDM2 UNet (Figure 21): raw network F(x, c_noise, class_labels) with SiDA's discriminator outputs.

    `forward(x, noise_labels, class_labels, return_flag="decoder")` returns F_x for "decoder"; for "encoder" it
    runs the embedding and the `enc` blocks only and returns the channel mean of the last encoder block output,
    `[N,1,h,w]`; "encoder_decoder" returns `(F_x, logits)` from one pass (ALGORITHM.md §3).
    `gradient_checkpointing` (set by Diffusers' `enable_gradient_checkpointing()` on the denoiser) recomputes each
    Block in backward instead of keeping its activations (ALGORITHM.md §13.4).
    """

    gradient_checkpointing = False

    def __init__(
        self,
        img_resolution: int,                          # Image resolution.
        img_channels: int,                            # Image channels.
        label_dim: int,                               # Class label dimensionality. 0 = unconditional.
        model_channels: int = 192,                    # Base multiplier for the number of channels.
        channel_mult: Sequence[int] = (1, 2, 3, 4),   # Per-resolution multipliers for the number of channels.
        channel_mult_noise: Optional[int] = None,     # Noise embedding multiplier. None = channel_mult[0].
        channel_mult_emb: Optional[int] = None,       # Final embedding multiplier. None = max(channel_mult).
        num_blocks: int = 3,                          # Residual blocks per resolution.
        attn_resolutions: Sequence[int] = (16, 8),    # Resolutions with self-attention.
        label_balance: float = 0.5,                   # Balance between noise embedding (0) and class embedding (1).
        concat_balance: float = 0.5,                  # Balance between skip connections (0) and main path (1).
        resample_filter: Sequence[float] = (1, 1),    # Block: resampling filter.
        channels_per_head: int = 64,                  # Block: channels per attention head.
        dropout: float = 0,                           # Block: dropout probability.
        res_balance: float = 0.3,                     # Block: main branch (0) vs residual branch (1).
        attn_balance: float = 0.3,                    # Block: main branch (0) vs self-attention (1).
        clip_act: Optional[float] = 256,              # Block: clip output activations. None = no clipping.
    ):
        super().__init__()
        channel_mult, attn_resolutions = list(channel_mult), list(attn_resolutions)
        if not channel_mult or img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(
                f"img_resolution={img_resolution} must be divisible by 2**(len(channel_mult)-1) for "
                f"channel_mult={channel_mult} (each level halves the resolution); use fewer levels or another size."
            )
        block_kwargs = dict(resample_filter=resample_filter, channels_per_head=channels_per_head, dropout=dropout,
                            res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act)
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        # Encoder; the input gets a constant channel of ones (hence img_channels + 1).
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, channels, kernel=[3, 3])
                cout = channels
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down",
                                                      **block_kwargs)
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = Block(cout, channels, cemb, flavor="enc",
                                                            attention=res in attn_resolutions, **block_kwargs)
                cout = channels

        # Decoder: bottleneck (in0 with attention, in1) or upsampling, then blocks eating the encoder skips.
        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up",
                                                    **block_kwargs)
            for idx in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{idx}"] = Block(cout + skips.pop(), channels, cemb, flavor="dec",
                                                            attention=res in attn_resolutions, **block_kwargs)
                cout = channels
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def _block(self, block, x, emb):
        """One Block, through activation checkpointing when it is on and gradients are being recorded."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, x, emb)
        return block(x, emb)

    def forward(self, x, noise_labels, class_labels=None, return_flag: str = "decoder"):
        if return_flag not in RETURN_FLAGS:
            raise ValueError(f"return_flag must be one of {RETURN_FLAGS}, got {return_flag!r}.")
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            if class_labels is None:
                raise ValueError("this UNet is class-conditional: pass one-hot class_labels [N, label_dim].")
            # one-hot * sqrt(label_dim) has unit magnitude.
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for block in self.enc.values():
            x = block(x) if isinstance(block, MPConv) else self._block(block, x, emb)
            skips.append(x)
        if return_flag != "decoder":
            # The discriminator map: channel mean of the last encoder block, before the bottleneck (ALGORITHM.md §3).
            logits = x.mean(dim=1, keepdim=True)
            if return_flag == "encoder":
                return logits

        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = self._block(block, x, emb)
        x = self.out_conv(x, gain=self.out_gain)
        return x if return_flag == "decoder" else (x, logits)
