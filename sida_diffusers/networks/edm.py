"""Raw EDM UNets: SongUNet (DDPM++ / NCSN++) and DhariwalUNet (ADM); their layers are in `edm_layers.py`.

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
from sida_diffusers.networks.edm_layers import (
    Conv2d,
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
)


class _EncoderDecoderUNet(torch.nn.Module):
    """The `return_flag` dispatch shared by both UNets (ALGORITHM.md §3).

    Subclasses provide `embed(noise_labels, class_labels, augment_labels, batch)`, `encode(x, emb, keep_skips)`
    returning the last encoder activation and the skip list, and `decode(x, emb, skips)`.

    `gradient_checkpointing` (set by Diffusers' `enable_gradient_checkpointing()` on the denoiser) recomputes each
    UNetBlock in backward instead of keeping its activations (ALGORITHM.md §13.4).
    """

    gradient_checkpointing = False

    def _block(self, block, x, emb):
        """One UNetBlock, through activation checkpointing when it is on and gradients are being recorded."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, x, emb)
        return block(x, emb)

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
                x = self._block(block, x, emb) if isinstance(block, UNetBlock) else block(x)
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
                x = self._block(block, self._join_skip(x, block, skips), emb)
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
            x = self._block(block, x, emb) if isinstance(block, UNetBlock) else block(x)
            if keep_skips:
                skips.append(x)
        return x, skips

    def decode(self, x, emb, skips):
        """Run the `dec` blocks and the output head."""
        for block in self.dec.values():
            x = self._block(block, self._join_skip(x, block, skips), emb)
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
