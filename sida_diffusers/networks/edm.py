"""Raw EDM UNets: SongUNet (DDPM++ / NCSN++) and DhariwalUNet (ADM), with their layers.

Re-implementation of NVlabs/edm `training/networks.py` with the SiDA encoder/decoder split (ALGORITHM.md §3). Module
names, constructor keywords, defaults and state-dict keys equal the official ones, so official weights load key for
key. Every layer casts its weights to the activation dtype (the official `use_fp16` path, ALGORITHM.md §1.4); the
attention softmax always runs in float32. Plain `torch.nn.Module`s: the preconditioners in `precond.py` wrap them.
"""

from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch
from torch.nn.functional import silu

from sida_diffusers.networks.base import RETURN_FLAGS

# ----------------------------------------------------------------------------------------------------------------
# Layers.


def weight_init(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random weights of `shape` with the official EDM initialisation `mode`."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init_mode {mode!r}; use one of xavier_uniform, xavier_normal, kaiming_uniform, "
                     "kaiming_normal.")


class Linear(torch.nn.Module):
    """Fully connected layer whose weights follow the activation dtype."""

    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


class Conv2d(torch.nn.Module):
    """Convolution with optional FIR up/downsampling; `kernel=0` makes it a pure resampler (no weights).

    Only resampling layers own a `resample_filter` buffer (the normalised outer product of the 1-d filter), as in
    the official state dicts.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 fused_resample=False, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        if up and down:
            raise ValueError("Conv2d can upsample or downsample, not both; set at most one of up/down.")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = torch.nn.Parameter(weight_init(shape, **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def _resample(self, x, f, channels, padding):
        """Depthwise FIR resampling by 2 (transposed, with gain 4, when upsampling)."""
        if self.up:
            return torch.nn.functional.conv_transpose2d(x, f.mul(4).tile([channels, 1, 1, 1]), groups=channels,
                                                        stride=2, padding=padding)
        return torch.nn.functional.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:  # resample into the conv's padding (NCSN++)
            x = torch.nn.functional.conv2d(self._resample(x, f, self.in_channels, w_pad + f_pad), w)
        elif self.fused_resample and self.down and w is not None:
            x = self._resample(torch.nn.functional.conv2d(x, w, padding=w_pad + f_pad), f, self.out_channels, 0)
        else:
            if f is not None:
                x = self._resample(x, f, self.in_channels, f_pad)
            if w is not None:
                x = torch.nn.functional.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(torch.nn.Module):
    """Group normalisation with at most `num_groups` groups of at least `min_channels_per_group` channels."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return torch.nn.functional.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype),
                                              self.eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q^T k / sqrt(c)) applied to v, for [B, c, L] tensors; logits and softmax in float32 (§1.4).

    Autocast is switched off so that bf16/fp16 autocast cannot lower the softmax precision.
    """
    with torch.autocast(q.device.type, enabled=False):
        a = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float())
    return a.transpose(1, 2).to(v.dtype)


class UNetBlock(torch.nn.Module):
    """Residual block with optional up/downsampling and multi-head self-attention (DDPM++, NCSN++ and ADM).

    `init`, `init_zero` and `init_attn` are keyword dicts for the convolutions of the main path, of the
    output-side layers and of the qkv projection (None: `init_zero` = zero weights, `init_attn` = `init`).
    """

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5, resample_filter=(1, 1),
                 resample_proj=False, adaptive_scale=True, init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_weight=0) if init_zero is None else dict(init_zero)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        # ADM gives a block out_channels // 64 heads, so narrow levels silently have none (fixtures README, quirks).
        self.num_heads = (0 if not attention else num_heads if num_heads is not None
                          else out_channels // channels_per_head)
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter,
                            **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x + params))
        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            n, c = x.shape[:2]
            # qkv channels are head-major, then channel, then q/k/v interleaved (official layout).
            q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            x = (self.proj(attention(q, k, v).reshape(x.shape)) + x) * self.skip_scale
        return x


class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal noise-level embedding [cos, sin] (DDPM++ and ADM)."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        x = torch.outer(x, ((1 / self.max_positions) ** freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier-feature noise-level embedding [cos, sin] (NCSN++); the frequencies are a buffer."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# UNets.


class _EncoderDecoderUNet(torch.nn.Module):
    """The `return_flag` dispatch shared by both UNets (ALGORITHM.md §3).

    Subclasses provide `embed(noise_labels, class_labels, augment_labels, batch)`, `encode(x, emb, keep_skips)`
    returning the last encoder activation and the skip list, and `decode(x, emb, skips)`.
    """

    def forward(self, x, noise_labels, class_labels, augment_labels=None, return_flag="decoder"):
        """F(x, c_noise, c): "decoder" -> F_x, "encoder" -> logits [N,1,h,w], "encoder_decoder" -> (F_x, logits)."""
        if return_flag not in RETURN_FLAGS:
            raise ValueError(f"return_flag must be one of {RETURN_FLAGS}, got {return_flag!r}.")
        emb = self.embed(noise_labels, class_labels, augment_labels, x.shape[0])
        x, skips = self.encode(x, emb, keep_skips=return_flag != "encoder")
        logits = x.mean(dim=1, keepdim=True) if return_flag != "decoder" else None  # in the UNet's dtype (§1.4)
        if return_flag == "encoder":
            return logits
        out = self.decode(x, emb, skips)
        return out if logits is None else (out, logits)

    def _drop_labels(self, labels: torch.Tensor, batch: int) -> torch.Tensor:
        """Zero whole label rows with probability `label_dropout` in training (classifier-free guidance)."""
        if self.training and self.label_dropout:
            keep = torch.rand([batch, 1], device=labels.device) >= self.label_dropout
            labels = labels * keep.to(labels.dtype)
        return labels

    @staticmethod
    def _join_skip(x, block, skips):
        """Concatenate the next skip when `block` expects more channels than x has (decoder blocks)."""
        return torch.cat([x, skips.pop()], dim=1) if x.shape[1] != block.in_channels else x


class SongUNet(_EncoderDecoderUNet):
    """DDPM++ / NCSN++ UNet of Song et al. (score-SDE), as re-implemented in EDM."""

    def __init__(self,
        img_resolution: int,                            # Image resolution at input/output.
        in_channels: int,                               # Number of color channels at input.
        out_channels: int,                              # Number of color channels at output.
        label_dim: int = 0,                             # Number of class labels, 0 = unconditional.
        augment_dim: int = 0,                           # Augmentation label dimensionality, 0 = no augmentation.
        model_channels: int = 128,                      # Base multiplier for the number of channels.
        channel_mult: Sequence[int] = (1, 2, 2, 2),     # Per-resolution multipliers for the number of channels.
        channel_mult_emb: int = 4,                      # Multiplier for the dimensionality of the embedding vector.
        num_blocks: int = 4,                            # Number of residual blocks per resolution.
        attn_resolutions: Sequence[int] = (16,),         # List of resolutions with self-attention.
        dropout: float = 0.10,                          # Dropout probability of intermediate activations.
        label_dropout: float = 0,                       # Dropout probability of class labels (for CFG).
        embedding_type: str = "positional",             # 'positional' for DDPM++, 'fourier' for NCSN++.
        channel_mult_noise: int = 1,                    # Noise embedding size multiplier: 1 DDPM++, 2 NCSN++.
        encoder_type: str = "standard",                 # 'standard' for DDPM++, 'residual' for NCSN++, or 'skip'.
        decoder_type: str = "standard",                 # 'standard' for DDPM++ and NCSN++, or 'skip'.
        resample_filter: Sequence[int] = (1, 1),        # Resampling filter: [1,1] DDPM++, [1,3,3,1] NCSN++.
    ):
        for name, value, allowed in (("embedding_type", embedding_type, ("positional", "fourier")),
                                     ("encoder_type", encoder_type, ("standard", "skip", "residual")),
                                     ("decoder_type", decoder_type, ("standard", "skip"))):
            if value not in allowed:
                raise ValueError(f"SongUNet {name} must be one of {allowed}, got {value!r}.")
        super().__init__()
        self.label_dropout = label_dropout
        self.augment_dim = augment_dim
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network.
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder; the aux_* layers carry the downsampled input (skip) or a residual stream (NCSN++).
        self.enc = torch.nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder; the output is the sum of the aux_conv heads (one per level for decoder_type='skip').
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=idx == num_blocks and res in attn_resolutions, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def embed(self, noise_labels, class_labels, augment_labels, batch):
        """Noise, label and augmentation embedding shared by every block."""
        cos, sin = self.map_noise(noise_labels).chunk(2, dim=1)
        emb = torch.cat([sin, cos], dim=1)  # DDPM++/NCSN++ order the features [sin, cos]
        if self.map_label is not None:
            labels = self._drop_labels(class_labels, batch)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return silu(self.map_layer1(silu(self.map_layer0(emb))))

    def encode(self, x, emb, keep_skips=True):
        """Run the `enc` blocks; the aux paths update x (and the last skip only when skips are kept)."""
        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
                continue
            if "aux_skip" in name:
                x = x + block(aux)
            elif "aux_residual" in name:
                x = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            if keep_skips and "aux" in name:
                skips[-1] = x  # an aux layer replaces the skip of the block it follows
            elif keep_skips:
                skips.append(x)
        return x, skips

    def decode(self, x, emb, skips):
        """Run the `dec` blocks and sum the output heads."""
        out = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                out = block(out)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(silu(tmp))
                out = tmp if out is None else tmp + out
            else:
                x = block(self._join_skip(x, block, skips), emb)
        return out


class DhariwalUNet(_EncoderDecoderUNet):
    """ADM UNet of Dhariwal & Nichol (guided diffusion), as re-implemented in EDM."""

    def __init__(self,
        img_resolution: int,                            # Image resolution at input/output.
        in_channels: int,                               # Number of color channels at input.
        out_channels: int,                              # Number of color channels at output.
        label_dim: int = 0,                             # Number of class labels, 0 = unconditional.
        augment_dim: int = 0,                           # Augmentation label dimensionality, 0 = no augmentation.
        model_channels: int = 192,                      # Base multiplier for the number of channels.
        channel_mult: Sequence[int] = (1, 2, 3, 4),     # Per-resolution multipliers for the number of channels.
        channel_mult_emb: int = 4,                      # Multiplier for the dimensionality of the embedding vector.
        num_blocks: int = 3,                            # Number of residual blocks per resolution.
        attn_resolutions: Sequence[int] = (32, 16, 8),  # List of resolutions with self-attention.
        dropout: float = 0.10,                          # Dropout probability of intermediate activations.
        label_dropout: float = 0,                       # Dropout probability of class labels (for CFG).
    ):
        super().__init__()
        self.label_dropout = label_dropout
        self.augment_dim = augment_dim
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)

        # Mapping network.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def embed(self, noise_labels, class_labels, augment_labels, batch):
        """Noise, augmentation and label embedding shared by every block (labels join after map_layer1)."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(self._drop_labels(class_labels, batch))
        return silu(emb)

    def encode(self, x, emb, keep_skips=True):
        """Run the `enc` blocks, keeping every activation as a skip unless `keep_skips=False`."""
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            if keep_skips:
                skips.append(x)
        return x, skips

    def decode(self, x, emb, skips):
        """Run the `dec` blocks and the output head."""
        for block in self.dec.values():
            x = block(self._join_skip(x, block, skips), emb)
        return self.out_conv(silu(self.out_norm(x)))


UNETS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


def build_unet(model_type: str, **kwargs) -> torch.nn.Module:
    """Construct the raw UNet named `model_type` ("SongUNet" or "DhariwalUNet") with its official keywords."""
    if model_type not in UNETS:
        raise ValueError(f"unknown EDM model_type {model_type!r}; use one of {sorted(UNETS)}.")
    accepted = set(inspect.signature(UNETS[model_type].__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"{model_type} does not take {unknown}; its keywords are {sorted(accepted)}.")
    return UNETS[model_type](**kwargs)
