"""MERT: a BERT-style music audio encoder (24 kHz waveform -> 75 Hz frame features), in one file.

HuBERT's architecture as MERT-v1 uses it (Li et al., 2023, "MERT: Acoustic Music Understanding Model with
Large-Scale Self-supervised Training"):

    wav [B, L] --7 strided convs (stride 320)--> [B, T, 512] --LayerNorm, Linear--> [B, T, d]
        --+ positional conv (kernel 128, 16 groups, weight norm)--> transformer (fused QKV, SDPA)
    T = floor((L - 400) / 320) + 1 frames, i.e. 75 per second at 24 kHz.

Design choices:
- One fused QKV projection; F.scaled_dot_product_attention is the fast path. Attention relaxation (MERT-330M's
  fp16 guard, softmax((s/a - max(s/a)) * a)) is mathematically the plain softmax, so it lives only on the
  unfused path (`attn_impl="math"`).
- Padded batches are exact: conv 0's GroupNorm takes its statistics over each clip's own samples, padded
  frames are zeroed before the positional conv and masked out of attention, so each clip gets the features
  it gets alone (transformers' HubertModel does not).
- Hidden states follow transformers 4.x `output_hidden_states` (used by MARBLE and published probes): index 0
  is layer 1's input, index i layer i's output; for pre-LN models (330M) the last is the final LayerNorm's.
- Reads our checkpoints, Hugging Face MERT folders (config.json + pytorch_model.bin, or model.safetensors read
  without the safetensors package) and hub ids in the local Hugging Face cache (never downloads): copied alone,
  it loads the official weights. A fairseq file raises NeedsConvert (convert.py reads it, and writes HF folders).

Layout, top-down: config and presets, attention and blocks, the conv front end, `MERT` (forward, loss, extract,
FLOPs), span masking, loading, CPU inference fast paths. Imports only torch, numpy and the standard library.
"""

import json
import math
import os
import pickle
import re
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class MERTConfig:
    """Encoder hyperparameters; PRESETS holds the official sizes."""

    dim: int = 768  # transformer width d
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int = 3072
    pre_ln: bool = False  # True: LayerNorm before attention/FFN, final LayerNorm at the end (330M)
    conv_dim: tuple = (512, 512, 512, 512, 512, 512, 512)
    conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    extractor_norm: str = "group"  # "group": GroupNorm after conv 0 only; "layer": LayerNorm after each conv
    proj_norm: bool = True  # LayerNorm on conv features before the projection
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    norm_eps: float = 1e-5
    dropout: float = 0.1  # residual, feature and projection dropout
    attn_dropout: float = 0.1
    act_dropout: float = 0.0
    layerdrop: float = 0.05
    attn_relax: float = 0.0  # > 0: relaxation constant alpha, used on the unfused path only
    attn_impl: str = "sdpa"  # "sdpa" (fused, fast) or "math" (unfused; needed for attn_relax)
    conv_grad_mult: float = 0.1  # gradient scale into the conv extractor during training
    sample_rate: int = 24000
    # pretraining heads and loss (HuBERT/MERT); n_codebooks = cqt_bins = 0 builds an encoder without heads
    n_codebooks: int = 8  # discrete label streams (RVQ codebooks)
    codebook_size: int = 1024
    final_dim: int = 64  # width of the cosine-similarity space per codebook
    logit_temp: float = 0.1
    cqt_bins: int = 336  # CQT reconstruction head (0: none)
    cqt_weight: float = 1.0
    feature_penalty: float = 10.0  # weight of mean(conv features^2)
    unmasked_weight: float = 0.0  # HuBERT's pred_nomask_weight: the same losses on unmasked frames, scaled (MERT: 0)
    mask_prob: float = 0.8  # fairseq compute_mask_indices: expected share of frames that start a span
    mask_length: int = 5
    min_masks: int = 2

    def __post_init__(self):
        # JSON round trips turn tuples into lists; keep them hashable and comparable.
        for name in ("conv_dim", "conv_kernel", "conv_stride"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        if not (len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride)):
            raise ValueError("conv_dim, conv_kernel and conv_stride must have the same length")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        for name, ok in (("extractor_norm", ("group", "layer")), ("attn_impl", ("sdpa", "math"))):
            if getattr(self, name) not in ok:
                raise ValueError(f"{name} must be {ok[0]!r} or {ok[1]!r}, not {getattr(self, name)!r}")

    @property
    def hop(self) -> int:
        """Samples per output frame (320 for MERT)."""
        return math.prod(self.conv_stride)

    @property
    def receptive_field(self) -> int:
        """Samples seen by one output frame of the conv extractor (400 for MERT)."""
        rf = 1
        for k, s in zip(reversed(self.conv_kernel), reversed(self.conv_stride)):
            rf = (rf - 1) * s + k
        return rf

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MERTConfig":
        """A named size from PRESETS with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown size {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "MERTConfig":
        """Build from a dict (e.g. a checkpoint's), rejecting unknown fields by name."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown MERTConfig field(s): {', '.join(unknown)}")
        return cls(**d)


# The official MERT-v1 sizes (m-a-p/MERT-v1-95M, m-a-p/MERT-v1-330M) and a tiny one for tests and CPUs.
PRESETS = {
    # tiny: a CPU-sized model; its narrow conv stack (128 channels) keeps the extractor from dominating
    "tiny": dict(dim=256, n_layers=4, n_heads=4, ffn_dim=1024, conv_dim=(128,) * 7, layerdrop=0.0),
    "95m": dict(),
    "330m": dict(dim=1024, n_layers=24, n_heads=16, ffn_dim=4096, pre_ln=True, dropout=0.0,
                 attn_dropout=0.0, act_dropout=0.0, layerdrop=0.0, attn_relax=32.0, final_dim=128,
                 conv_grad_mult=1.0),
}


# -----------------------------------------------------------------------------
# Attention and blocks; attribute names follow transformers' HuBERT, so its keys map 1:1 but for the fused qkv.


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection."""

    def __init__(self, cfg: MERTConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.attn_dropout
        self.relax, self.impl = cfg.attn_relax, cfg.attn_impl
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, d]; mask [B, 1, 1, T] bool, True where a key may be attended (None: all)."""
        B, T, D = x.shape
        q, k, v = linear(x, self.qkv).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        p = self.dropout if self.training else 0.0
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            y = self._math(q, k, v, mask, p)
        return linear(y.transpose(1, 2).reshape(B, T, D), self.out_proj)

    def _math(self, q, k, v, mask, p):
        # Unfused: materialises the (B, H, T, T) scores; relaxation alpha keeps fp16 scores in range (MERT-330M)
        s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        if self.relax > 0:
            s = s / self.relax
            s = (s - s.amax(dim=-1, keepdim=True).detach()) * self.relax
        a = F.dropout(s.softmax(dim=-1, dtype=torch.float32).to(q.dtype), p, self.training)
        return a @ v


class FeedForward(nn.Module):
    """Linear(d -> ffn) -> GELU -> dropout -> Linear(ffn -> d)."""

    def __init__(self, cfg: MERTConfig):
        super().__init__()
        self.intermediate_dense = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.output_dense = nn.Linear(cfg.ffn_dim, cfg.dim)
        self.act_dropout = nn.Dropout(cfg.act_dropout)

    def forward(self, x):
        return linear(self.act_dropout(linear(x, self.intermediate_dense, gelu=True)), self.output_dense)


class Layer(nn.Module):
    """A transformer layer, post-LN (95M) or pre-LN (330M)."""

    def __init__(self, cfg: MERTConfig):
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.attention = Attention(cfg)
        self.layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, mask):
        if self.pre_ln:
            x = x + self.dropout(self.attention(self.layer_norm(x), mask))
            return x + self.dropout(self.feed_forward(self.final_layer_norm(x)))
        x = self.layer_norm(x + self.dropout(self.attention(x, mask)))
        return self.final_layer_norm(x + self.dropout(self.feed_forward(x)))


class Encoder(nn.Module):
    """Positional conv, the layers, and the encoder LayerNorm (before the layers for post-LN, after for pre-LN)."""

    def __init__(self, cfg: MERTConfig):
        super().__init__()
        self.pos_conv_embed = PositionalConvEmbedding(cfg)
        self.layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.dropout = nn.Dropout(cfg.dropout)


# -----------------------------------------------------------------------------
# Front end: the strided conv extractor, the feature projection, the positional conv


def conv_out_len(n, kernel: int, stride: int):
    """Output length of an unpadded strided conv (0 where the input is shorter than the kernel)."""
    if isinstance(n, torch.Tensor):
        return torch.div(n - kernel, stride, rounding_mode="floor").add(1).clamp(min=0)
    return max((n - kernel) // stride + 1, 0)


class ConvLayer(nn.Module):
    """One conv of the feature extractor, with its optional norm, then GELU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, bias: bool, norm: str | None, eps: float):
        super().__init__()
        self.kernel, self.stride, self.norm, self.eps = kernel, stride, norm, eps
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias)
        if norm == "group":  # one group per channel: normalise each channel over time
            self.layer_norm = nn.GroupNorm(c_out, c_out, eps=eps, affine=True)
        elif norm == "layer":  # normalise each frame over channels
            self.layer_norm = nn.LayerNorm(c_out, eps=eps)

    def forward(self, x: torch.Tensor, n: torch.Tensor | None, stats=None) -> torch.Tensor:
        """x [B, C_in, T_in] -> [B, C_out, T_out]; n [B] valid output frames (None: all valid); stats (mean, var)
        [B, C_out] float64 for the GroupNorm instead of x's own (a long file run in chunks normalises every chunk
        with the whole file's statistics, as one forward would)."""
        if self.norm is None:
            return conv1d_gelu(x, self.conv)
        x = self.conv(x)
        if self.norm == "group":
            if stats is not None:
                scale, shift = _norm_affine(stats, self.layer_norm.weight, self.layer_norm.bias, self.eps, x.dtype)
                x = torch.addcmul(shift, x, scale)
            elif n is None:
                x = self.layer_norm(x)
            else:
                x = masked_channel_norm(x, n, self.layer_norm.weight, self.layer_norm.bias, self.eps)
        elif self.norm == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        # x is a fresh buffer: at inference GELU in place saves a (B, C, T) allocation
        return F.gelu(x) if torch.is_grad_enabled() else torch.ops.aten.gelu_(x)


class FeatureExtractor(nn.Module):
    """The strided conv stack: waveform [B, L] -> conv features [B, C, T]."""

    def __init__(self, cfg: MERTConfig):
        super().__init__()
        c_in, layers = 1, []
        for i, (c, k, s) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride)):
            norm = "layer" if cfg.extractor_norm == "layer" else ("group" if i == 0 else None)
            layers.append(ConvLayer(c_in, c, k, s, cfg.conv_bias, norm, cfg.norm_eps))
            c_in = c
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None, stats=None) -> torch.Tensor:
        """wav [B, L] -> [B, C, T]; stats: conv 0's GroupNorm (mean, var) [B, C] to use instead of wav's own."""
        x = wav[:, None, :]  # (B, 1, L)
        n, first = lengths, 0
        if lengths is None and not torch.is_grad_enabled() and self.conv_layers[0].norm == "group" \
                and self.conv_layers[1].norm is None:
            x, first = _first_two_in_blocks(self, x, stats), 2
        for i, layer in enumerate(self.conv_layers[first:], first):
            n = None if n is None else conv_out_len(n, layer.kernel, layer.stride)
            x = layer(x, n, stats if i == 0 else None)
        return x

    def norm_stats(self, wav: torch.Tensor, block: int = 1024):
        """(mean, var) [B, C] float64 over time of conv 0's output for wav [B, L] (its GroupNorm's), or None."""
        return _norm_stats_in_blocks(self.conv_layers[0], wav, block)


class FeatureProjection(nn.Module):
    """LayerNorm(conv dim) -> Linear(conv dim -> d) -> dropout."""

    def __init__(self, cfg: MERTConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.conv_dim[-1], eps=cfg.norm_eps) if cfg.proj_norm else None
        self.projection = nn.Linear(cfg.conv_dim[-1], cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        x = x if self.layer_norm is None else self.layer_norm(x)
        return self.dropout(linear(x, self.projection))


class WeightNormConv1d(nn.Module):
    """Conv1d with weight g * v / ||v||, the norm over all dims but the kernel axis (dim=2). Explicit weight_g /
    weight_v parameters (fairseq's and older transformers' keys): no parametrization machinery, every layout loads."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.groups, self.padding = groups, kernel // 2
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel))
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel))
        self.bias = nn.Parameter(torch.zeros(channels))

    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))

    def forward(self, x):
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)


class PositionalConvEmbedding(nn.Module):
    """Relative positions from a wide grouped conv: x [B, T, d] -> GELU(conv(x)) [B, T, d]."""

    def __init__(self, cfg: MERTConfig):
        super().__init__()
        self.conv = WeightNormConv1d(cfg.dim, cfg.pos_conv_kernel, cfg.pos_conv_groups)
        self.trim = 1 if cfg.pos_conv_kernel % 2 == 0 else 0  # an even kernel with padding k//2 adds a frame

    def forward(self, x):
        y = self.conv(x.transpose(1, 2))  # (B, d, T + trim)
        y = y[:, :, :-self.trim] if self.trim else y
        return F.gelu(y).transpose(1, 2)


# -----------------------------------------------------------------------------
# The model


class MERT(nn.Module):
    """The MERT encoder. `extract` gives all hidden states; `from_pretrained` loads ours or a Hugging Face folder."""

    def __init__(self, cfg: MERTConfig):
        super().__init__()
        self.config = cfg
        self.feature_extractor = FeatureExtractor(cfg)
        self.feature_projection = FeatureProjection(cfg)
        self.encoder = Encoder(cfg)
        self.masked_spec_embed = nn.Parameter(torch.empty(cfg.dim))  # replaces masked frames in pretraining
        if cfg.n_codebooks > 0:
            # K untied Linear(d -> final_dim) projections, computed as one Linear(d -> K * final_dim)
            self.final_proj = nn.Linear(cfg.dim, cfg.n_codebooks * cfg.final_dim)
            self.label_embs = nn.Parameter(torch.empty(cfg.n_codebooks, cfg.codebook_size, cfg.final_dim))
        if cfg.cqt_bins > 0:
            self.cqt_head = nn.Linear(cfg.dim, cfg.cqt_bins)
        if cfg.attn_impl != "sdpa":
            warnings.warn("MERT: attn_impl='math' is the slow unfused attention path", stacklevel=2)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """fairseq's initialisation: BERT-style normal(0.02) linears, Kaiming convs, scaled positional conv."""
        cfg = self.config
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        pc = self.encoder.pos_conv_embed.conv
        std = math.sqrt(4.0 * (1.0 - cfg.dropout) / (cfg.pos_conv_kernel * cfg.dim))
        nn.init.normal_(pc.weight_v, 0.0, std)
        nn.init.zeros_(pc.bias)
        pc.weight_g.copy_(pc.weight_v.norm(dim=(0, 1), keepdim=True))  # so that weight == v at init
        nn.init.uniform_(self.masked_spec_embed)
        if cfg.n_codebooks > 0:
            nn.init.uniform_(self.label_embs)  # fairseq's label_embs_concat init

    # -- shapes ---------------------------------------------------------------

    def num_frames(self, n_samples):
        """Frames for n_samples (int or tensor): floor((n - 400) / 320) + 1 for MERT, 0 if too short."""
        for k, s in zip(self.config.conv_kernel, self.config.conv_stride):
            n_samples = conv_out_len(n_samples, k, s)
        return n_samples

    @property
    def num_states(self) -> int:
        """Number of hidden states extract() returns: layers + 1."""
        return self.config.n_layers + 1

    def estimate_flops(self, n_samples: int) -> float:
        """Forward + backward FLOPs for one clip: 3 x (2 x multiply-adds) of convs, linears and attention."""
        cfg, macs, n, c_in = self.config, 0, n_samples, 1
        for c, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride):
            n = (n - k) // s + 1
            macs += n * c * c_in * k
            c_in = c
        T, d = n, cfg.dim
        macs += T * cfg.conv_dim[-1] * d  # feature projection
        macs += T * d * (d // cfg.pos_conv_groups) * cfg.pos_conv_kernel  # positional conv
        macs += cfg.n_layers * (T * (4 * d * d + 2 * d * cfg.ffn_dim) + 2 * T * T * d)  # linears + QK^T and AV
        # heads: an upper bound (the loss runs them on masked frames only); the cosine logits are not counted
        macs += T * d * (cfg.n_codebooks * cfg.final_dim + cfg.cqt_bins)
        return 3 * 2 * macs  # backward costs about twice the forward

    # -- forward ----------------------------------------------------------------

    def _embed(self, wav, lengths, norm_stats=None):
        """wav [B, L] -> (conv features [B, T, C], frame mask [B, T] or None); norm_stats as in extract."""
        wav = wav[None] if wav.dim() == 1 else wav
        if wav.dim() != 2:
            raise ValueError(f"expected a waveform [batch, samples], got shape {tuple(wav.shape)}")
        B, L = wav.shape
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=wav.device).long().reshape(B)
            if bool((lengths > L).any()) or bool((lengths < 1).any()):
                raise ValueError(f"lengths must lie in [1, {L}], got {lengths.tolist()}")
            if bool((lengths == L).all()):
                lengths = None  # nothing is padded: take the plain fast path
        if self.num_frames(L) < 1:
            raise ValueError(f"input of {L} samples is shorter than one frame ({self.config.receptive_field})")
        feats = self.feature_extractor(wav, lengths, norm_stats).transpose(1, 2)  # (B, T, C)
        frame_mask = None
        if lengths is not None:
            n = self.num_frames(lengths)
            if bool((n < 1).any()):
                raise ValueError(f"a clip is shorter than one frame ({self.config.receptive_field} samples)")
            frame_mask = torch.arange(feats.shape[1], device=wav.device)[None, :] < n[:, None]  # (B, T)
        if self.training and self.config.conv_grad_mult != 1.0:
            # fairseq's feature_grad_mult: scale gradients into the conv stack, keep the forward value
            feats = feats * self.config.conv_grad_mult + feats.detach() * (1.0 - self.config.conv_grad_mult)
        return feats, frame_mask

    def _encode(self, x, frame_mask, out=None, upto=None):
        """Positional conv and layers on projected features x [B, T, d]; writes hidden state i (0..upto) into
        out[i] when out is given, and returns the last state computed."""
        cfg, enc = self.config, self.encoder
        upto = cfg.n_layers if upto is None else upto
        attn_mask = None
        if frame_mask is not None:
            x = x * frame_mask[..., None].to(x.dtype)  # padding must not leak into the positional conv
            attn_mask = frame_mask[:, None, None, :]  # (B, 1, 1, T)
        x = x + enc.pos_conv_embed(x)
        if not cfg.pre_ln:
            x = enc.layer_norm(x)
        x = enc.dropout(x)
        if out is not None:
            out[0] = x
        for i, layer in enumerate(enc.layers[:upto]):
            # layerdrop skips the layer, never the final LayerNorm after it (fairseq wav2vec2.py
            # TransformerEncoder.forward applies it after the loop, whichever layers ran)
            if not (self.training and cfg.layerdrop > 0 and torch.rand(()) < cfg.layerdrop):
                x = layer(x, attn_mask)
            if cfg.pre_ln and i == cfg.n_layers - 1:
                x = enc.layer_norm(x)  # the last hidden state of a pre-LN model is the normed one
            if out is not None:
                out[i + 1] = x
        return x

    def forward(self, wav: torch.Tensor, lengths=None, targets: dict | None = None, mask=None):
        """wav [B, L] at 24 kHz (unnormalised) -> (last hidden state [B, T, d], loss, loss parts).

        Without targets: loss is None and parts {}. With targets, a dict holding "codes" (LongTensor [B, K, T])
        and/or "cqt" ([B, T, cqt_bins]) from the teachers, frames are masked (`mask` [B, T] bool, else drawn with
        compute_mask_indices) and replaced by the learned mask embedding, and the loss is: sum over codebooks of
        the cross-entropy of cosine logits / logit_temp on masked frames + cqt_weight * MSE of the CQT head on
        masked frames + feature_penalty * mean(conv features^2), plus unmasked_weight times the same code and CQT
        losses on the unmasked (valid) frames when it is > 0."""
        cfg = self.config
        feats, frame_mask = self._embed(wav, lengths)
        x = self.feature_projection(feats)
        if targets is None:
            return self._encode(x, frame_mask), None, {}
        B, T, _ = x.shape
        if mask is None:
            n = None if frame_mask is None else frame_mask.sum(1).tolist()
            mask = compute_mask_indices(B, T, cfg.mask_prob, cfg.mask_length, cfg.min_masks, lengths=n)
        mask = torch.as_tensor(mask, device=x.device, dtype=torch.bool)
        if frame_mask is not None:
            mask = mask & frame_mask  # padding is never masked, labelled or scored
        x = torch.where(mask[..., None], self.masked_spec_embed.to(x.dtype), x)
        x = self._encode(x, frame_mask)
        parts = {"features_pen": self._feature_penalty(feats, frame_mask)}
        loss = cfg.feature_penalty * parts["features_pen"] + self._frame_losses(x, mask, targets, parts, "")
        if cfg.unmasked_weight > 0:
            keep = ~mask if frame_mask is None else ~mask & frame_mask  # padding is never a target
            if bool(keep.any()):
                loss = loss + cfg.unmasked_weight * self._frame_losses(x, keep, targets, parts, "_u")
        valid = B * T if frame_mask is None else frame_mask.sum()
        n_masked = mask.sum().detach()  # fairseq's sample_size: train.py weights micro-batches by it
        parts["mask_frac"] = (n_masked / valid).float()  # of the valid frames
        parts["n_masked"] = n_masked
        return x, loss, parts

    @staticmethod
    def _feature_penalty(feats, frame_mask):
        """mean(conv features^2) over the valid frames only (padding would pull it towards 0)."""
        if frame_mask is None:
            return feats.float().pow(2).mean()
        sq = feats.float().pow(2).sum(-1)  # (B, T)
        return (sq * frame_mask).sum() / (frame_mask.sum() * feats.shape[-1])

    def _frame_losses(self, x, sel, targets, parts, suffix):
        """Summed code cross-entropies + cqt_weight * CQT MSE over the frames sel [B, T] of x; parts gain suffix.

        Heads and losses run in float32 even under autocast: bf16 cosine logits / 0.1 err by up to ~0.03
        (fairseq's fp16 run took the cosine in float32), and the heads are a sliver of a step's work."""
        T, loss = x.shape[1], 0.0
        with torch.autocast(x.device.type, enabled=False):
            xs = x[sel]  # (N, d)
            if "codes" in targets:
                ce = self.code_loss(xs, targets["codes"][..., :T].transpose(1, 2)[sel])
                for k, v in enumerate(ce):
                    parts[f"ce_{k}{suffix}"] = v.detach()
                parts["ce" + suffix] = ce.sum()
                loss = loss + parts["ce" + suffix]
            if "cqt" in targets:
                pred = _head(self.cqt_head, xs)  # (N, cqt_bins)
                parts["cqt" + suffix] = F.mse_loss(pred, targets["cqt"][:, :T][sel].to(pred.dtype))
                loss = loss + self.config.cqt_weight * parts["cqt" + suffix]
        return loss

    def code_loss(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Per-codebook cross-entropy [K] of cosine(proj_k(x), emb_k) / temp for x [N, d], codes [N, K]: one
        normalised batched matmul (K, N, F) x (K, F, V), never a (codes, frames, dim) expansion; this equals fairseq
        HuBERT's positive/negative NCE with every other code as a negative."""
        cfg, K, Fd = self.config, self.config.n_codebooks, self.config.final_dim
        if codes.shape[-1] != K:
            raise ValueError(f"targets have {codes.shape[-1]} codebooks, the model's heads {K}")
        with torch.autocast(x.device.type, enabled=False):  # float32 logits and cross-entropy under any autocast
            z = _head(self.final_proj, x).view(-1, K, Fd)
            z = F.normalize(z, dim=-1).transpose(0, 1)  # (K, N, F)
            e = F.normalize(self.label_embs.to(z.dtype), dim=-1)  # (K, V, F)
            logits = torch.bmm(z, e.transpose(1, 2)) / cfg.logit_temp  # (K, N, V)
            return F.cross_entropy(logits.flatten(0, 1), codes.t().reshape(-1), reduction="none").view(K, -1).mean(1)

    @torch.inference_mode()
    def extract(self, wav: torch.Tensor, lengths=None, layers=None, norm_stats=None) -> torch.Tensor:
        """All hidden states [layers + 1, B, T, d] for wav [B, L] or [L]; padded frames come back as zeros.

        `lengths` [B]: each clip's true sample count in a zero-padded batch (each clip then gets exactly the
        features it gets alone). `layers` (indices): only those states, the transformer stopped after the deepest.
        `norm_stats` (from `norm_stats()` of a longer signal, [B, C] each) replaces the statistics of conv 0's
        GroupNorm, so that a chunk of a file is normalised as the whole file is in one forward."""
        feats, frame_mask = self._embed(wav.to(self.masked_spec_embed.dtype), lengths, norm_stats)  # [L] -> [1, L]
        x = self.feature_projection(feats)
        del feats
        B, T, D = x.shape
        keep = list(range(self.num_states)) if layers is None else [int(i) for i in layers]
        if bad := [i for i in keep if not 0 <= i < self.num_states]:
            raise ValueError(f"layer index {bad[0]} out of range 0..{self.num_states - 1}")
        upto = max(keep)
        out = x.new_empty(upto + 1, B, T, D)
        self._encode(x, frame_mask, out=out, upto=upto)
        if frame_mask is not None:
            out.mul_(frame_mask[None, :, :, None].to(out.dtype))
        return out if keep == list(range(upto + 1)) else out[keep]

    @torch.inference_mode()
    def norm_stats(self, wav: torch.Tensor):
        """(mean, var) [B, C] float64: the statistics the GroupNorm after conv 0 takes over wav [B, L] or [L]
        in one forward (None for a model without it), computed in blocks of time with little memory."""
        wav = wav[None] if wav.dim() == 1 else wav
        return self.feature_extractor.norm_stats(wav.to(self.masked_spec_embed.dtype))

    # -- checkpoints ------------------------------------------------------------

    def save(self, path, heads: bool = True, dtype: torch.dtype | None = None, **extra):
        """Write {"config", "model", **extra} atomically (temp file, then rename). heads=False drops the pretraining
        heads (an encoder for feature extraction); dtype=torch.float16 stores the weights at half size (cast back
        to the model's dtype when loaded)."""
        path = Path(path)
        cfg, state = asdict(self.config), self.state_dict()
        if not heads:
            cfg.update(n_codebooks=0, cqt_bins=0)
            own = MERT(MERTConfig(**cfg)).state_dict().keys()
            state = {k: v for k, v in state.items() if k in own}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        tmp = path.with_name(path.name + ".tmp")
        try:
            torch.save({"config": cfg, "model": state, **extra}, tmp)
            os.replace(tmp, path)
        except BaseException:  # a full disk, Ctrl-C: no half-written temp file stays behind
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def from_pretrained(cls, path, map_location="cpu", **overrides) -> "MERT":
        """Load a Hugging Face MERT folder or hub id (local cache only) or our own .pt, in eval mode; `overrides`
        replace config fields (e.g. attn_impl="math"). A fairseq checkpoint raises NeedsConvert:
        convert.from_pretrained reads it (and every format this reads)."""
        cfg, state, src = load_checkpoint(path, map_location)
        cfg = replace(cfg, **overrides) if overrides else cfg
        model = cls(cfg)
        load_state_strict(model, state, src)
        return model.eval()


# Dense bf16 peaks for MFU (NVIDIA datasheets list them with sparsity, twice these), by a substring of the device
# name; the first match counts, so the PCIe and NVL boards (lower clocks and power) come before their SXM namesakes.
GPU_PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12),
                  ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12), ("L40", 181e12), ("4090", 165e12))


def gpu_peak_flops(device) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU (GPU_PEAK_FLOPS) by its torch.cuda.get_device_name or its torch.device; None
    for an unknown GPU or a device that is not CUDA."""
    if isinstance(device, torch.device):
        if device.type != "cuda":
            return None
        device = torch.cuda.get_device_name(device)
    return next((flops for key, flops in GPU_PEAK_FLOPS if key in device), None)


# -----------------------------------------------------------------------------
# Span masking (fairseq's compute_mask_indices)


def _head(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) in float32 at least (float64 in a float64 model), whatever x's and the layer's dtype."""
    dt = torch.promote_types(layer.weight.dtype, torch.float32)
    return F.linear(x.to(dt), layer.weight.to(dt), None if layer.bias is None else layer.bias.to(dt))


def compute_mask_indices(B: int, T: int, mask_prob: float, mask_length: int, min_masks: int = 0,
                         lengths=None, rng: np.random.Generator | None = None) -> np.ndarray:
    """Span masks [B, T] bool with fairseq's compute_mask_indices semantics ("static" lengths, overlap allowed).

    Per clip of n valid frames: int(mask_prob * n / mask_length + u) span starts (u ~ U[0, 1)), at least min_masks,
    drawn without replacement from [0, n - mask_length); each masks mask_length frames. Then, as fairseq's
    require_same_masks, every clip keeps a random subset of its masked frames as large as the smallest clip's, so
    that all B rows mask the same number of frames. fairseq applies this to one device's batch (the model's
    forward), so pass one device's micro-batch, not the global batch: the cut grows with the rows. At T = 374,
    0.8 / 5 masks 58.3% of a lone row, 54.7% of each of 8 rows, 52.2% at 64 rows (docs/recipe.md)."""
    rng = rng if rng is not None else np.random.default_rng()
    lengths = [T] * B if lengths is None else [int(n) for n in lengths]
    chosen = []
    for n in lengths:
        num = max(min_masks, int(mask_prob * n / float(mask_length) + rng.random()))
        span = mask_length
        if n - span <= num:  # too short for that many spans: fairseq shrinks the start range
            span = max(n - num - 1, 0)
        starts = rng.choice(max(n - span, 1), min(num, max(n - span, 1)), replace=False)
        idx = (starts[:, None] + np.arange(mask_length)[None, :]).ravel()
        chosen.append(np.unique(idx[idx < n]))
    keep = min(len(c) for c in chosen)
    mask = np.zeros((B, T), dtype=bool)
    for b, c in enumerate(chosen):
        if len(c) > keep:
            c = rng.choice(c, keep, replace=False)
        mask[b, c] = True
    return mask


# -----------------------------------------------------------------------------
# Checkpoint loading


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read or mapped onto the model; the message names the key or file."""


class NeedsConvert(CheckpointError):
    """A fairseq checkpoint (or another pickle beyond tensors): convert.py reads it, this file does not. `path` is
    the file; `obj` what torch.load(weights_only=True) made of it, or None where it refused the pickle (fairseq's
    pickled config and Dictionary objects), so that convert.py need not read it twice."""

    def __init__(self, path, obj=None):
        self.path, self.obj = Path(path), obj
        what = "a fairseq checkpoint" if obj is not None else \
            "a pickle with objects beyond tensors (as fairseq checkpoints are)"
        super().__init__(f"{path}: {what}, which mert.py does not read; convert it once with "
                         f"`python convert.py {path} OUT.pt`, or load it with convert.load_checkpoint")


def load_state_strict(model: nn.Module, state: dict, src: str):
    """load_state_dict that names every missing, unexpected or mis-shaped key in one error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [what + sep.join(keys) for what, sep, keys in (("missing key(s): ", ", ", missing),
                ("unexpected key(s): ", ", ", unexpected), ("shape mismatch: ", "; ", shapes)) if keys]
    if problems:
        raise CheckpointError(f"{src}: " + " | ".join(problems))
    model.load_state_dict(state, strict=True)


def load_checkpoint(path, map_location="cpu", for_training: bool = False) -> tuple[MERTConfig, dict, str]:
    """Resolve `path` and read it into (config, state dict in our key layout, source description).

    for_training (train.py --init): leave out what a source lacks (a Hugging Face folder without mask embedding)
    instead of filling it, so it starts fresh. A fairseq file raises NeedsConvert; convert.load_checkpoint reads
    it (its pretraining heads too, for training) and everything this reads."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
            p = hf_cache_snapshot(str(path))
        else:
            raise CheckpointError(f"{path}: no such file or folder")
    if p.is_dir():
        return _load_hf_folder(p, map_location, fill=not for_training)
    if p.suffix == ".safetensors" or p.name in ("pytorch_model.bin",):
        if (p.parent / "config.json").exists():
            return _load_hf_folder(p.parent, map_location, fill=not for_training)
        raise CheckpointError(f"{p}: a Hugging Face weight file needs its config.json beside it")
    if not_torch := not_a_torch_file(p):
        raise CheckpointError(f"{p}: {not_torch}")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # fairseq checkpoints pickle their config and Dictionary objects, which weights_only refuses.
        raise NeedsConvert(p) from None
    except Exception as e:  # truncated zip, ...
        raise CheckpointError(f"{p}: cannot read checkpoint, truncated or damaged? ({_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: expected a dict checkpoint, found {type(obj).__name__}")
    if "config" in obj and "model" in obj and isinstance(obj["config"], dict):
        return MERTConfig.from_dict(obj["config"]), dict(obj["model"]), str(p)
    if is_fairseq(obj):
        raise NeedsConvert(p, obj)
    raise CheckpointError(f"{p}: not a MERT checkpoint (ours needs 'config' and 'model'; "
                          f"fairseq needs 'model' with encoder.layers.*.self_attn.* keys)")


def is_fairseq(obj) -> bool:
    """Whether a loaded checkpoint dict has fairseq's layout: 'model' with encoder.layers.*.self_attn.* keys."""
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and any(
        isinstance(k, str) and k.startswith("encoder.layers.") and ".self_attn." in k for k in obj["model"])


def _one_line(e: BaseException) -> str:
    """An exception as one short line: its type and the first sentence of its message."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: " + (msg.split(". ")[0] if len(msg) > 120 else msg)


def not_a_torch_file(p: Path) -> str | None:
    """Why p cannot be a torch.save file, or None if it may be one. torch.save writes a zip archive (torch
    >= 1.6) or, in the legacy format, a pickle, whose first byte is the PROTO opcode 0x80; anything else
    would only fail deep inside the unpickler with a message about opcodes."""
    try:
        with open(p, "rb") as f:
            head = f.read(64)
    except OSError as e:
        return f"cannot read ({_one_line(e)})"
    if not head:
        return "empty file, not a checkpoint"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    what = "a JSON file" if head.lstrip()[:1] in (b"{", b"[") else (
        "a text file" if all(32 <= c < 127 or c in (9, 10, 13) for c in head) else "an unknown binary file")
    hint = "; for a Hugging Face model pass its folder" if p.suffix == ".json" else ""
    return (f"not a PyTorch checkpoint ({what}, {p.stat().st_size} bytes; torch.save writes a zip archive "
            f"or a pickle){hint}")


def hf_cache_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a hub id in the Hugging Face cache; never downloads."""
    if os.environ.get("HF_HUB_CACHE"):
        root = Path(os.environ["HF_HUB_CACHE"])
    elif os.environ.get("HF_HOME"):
        root = Path(os.environ["HF_HOME"]) / "hub"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snaps, ref = repo / "snapshots", repo / "refs" / "main"
    if ref.exists() and (snaps / ref.read_text().strip()).is_dir():
        return snaps / ref.read_text().strip()
    if snaps.is_dir():
        found = sorted((d for d in snaps.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
        if found:
            return found[-1]
    raise CheckpointError(
        f"{repo_id}: not in the local Hugging Face cache ({root}); nothing is downloaded at run time. "
        f"Fetch it once with `hf download {repo_id}` (`huggingface-cli download {repo_id}` with an older "
        f"huggingface_hub), or pass a folder path.")


def _read_safetensors(path: Path) -> dict:
    """Read a .safetensors file with the standard library: 8-byte header size, JSON header, raw tensors."""
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in dtypes:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        a, b = meta["data_offsets"]
        buf = bytearray(data[a:b])  # writable copy: torch.frombuffer warns on read-only memory
        t = torch.frombuffer(buf, dtype=dtypes[meta["dtype"]]) if b > a else torch.empty(0, dtype=dtypes[meta["dtype"]])
        out[name] = t.reshape(meta["shape"])
    return out


# transformers' HubertConfig / MERTConfig name -> ours
_HF_FIELDS = {
    "hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
    "intermediate_size": "ffn_dim", "do_stable_layer_norm": "pre_ln", "conv_dim": "conv_dim",
    "conv_kernel": "conv_kernel", "conv_stride": "conv_stride", "conv_bias": "conv_bias",
    "feat_extract_norm": "extractor_norm", "feat_proj_layer_norm": "proj_norm",
    "num_conv_pos_embeddings": "pos_conv_kernel", "num_conv_pos_embedding_groups": "pos_conv_groups",
    "layer_norm_eps": "norm_eps", "hidden_dropout": "dropout", "attention_dropout": "attn_dropout",
    "activation_dropout": "act_dropout", "layerdrop": "layerdrop", "sample_rate": "sample_rate",
}


def config_from_hf(hf: dict, src: str = "config.json") -> MERTConfig:
    """Map a transformers HubertConfig / MERTConfig dict onto MERTConfig, refusing what we don't implement."""
    unsupported = [k for k in ("feature_extractor_cqt", "deepnorm", "conv_pos_batch_norm") if hf.get(k)]
    unsupported += [f"{act}={hf[act]}" for act in ("hidden_act", "feat_extract_activation")
                    if hf.get(act, "gelu") != "gelu"]
    if unsupported:
        raise CheckpointError(f"{src}: unsupported MERT option(s): {', '.join(unsupported)}")
    kw = {ours: hf[theirs] for theirs, ours in _HF_FIELDS.items() if theirs in hf}
    relax = hf.get("attention_relax", -1.0)
    kw["attn_relax"] = float(relax) if relax and relax > 0 else 0.0
    return MERTConfig(**kw, n_codebooks=0, cqt_bins=0)  # the released weights carry no pretraining heads


def fuse_qkv(state: dict, q: str, k: str, v: str, out: str):
    """Concatenate separate q/k/v projection tensors into one fused qkv tensor (order q, k, v)."""
    for suffix in ("weight", "bias"):
        parts = [state.pop(f"{n}.{suffix}", None) for n in (q, k, v)]
        if all(p is not None for p in parts):
            state[f"{out}.{suffix}"] = torch.cat(parts, dim=0)
        elif any(p is not None for p in parts):  # leave them in place so the strict check names them
            for n, p in zip((q, k, v), parts):
                if p is not None:
                    state[f"{n}.{suffix}"] = p


def _load_hf_folder(folder: Path, map_location, fill: bool = True) -> tuple[MERTConfig, dict, str]:
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{folder}: no config.json (expected a Hugging Face MERT folder)")
    cfg = config_from_hf(json.loads(cfg_file.read_text()), str(cfg_file))
    st, pt = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.exists():
        wfile, state = st, _read_safetensors(st)
    elif pt.exists():
        wfile, state = pt, torch.load(pt, map_location=map_location, weights_only=True)
    else:
        raise CheckpointError(f"{folder}: neither model.safetensors nor pytorch_model.bin found")
    return cfg, hf_state_to_ours(state, cfg, fill=fill), str(wfile)


def hf_state_to_ours(state: dict, cfg: MERTConfig, fill: bool = True) -> dict:
    """transformers HuBERT/MERT key layout -> ours (fused qkv, weight_g/weight_v positional conv)."""
    state = dict(state)
    for prefix in ("hubert.", "model.", "mert."):  # heads-wrapped models nest the encoder
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    pc = "encoder.pos_conv_embed.conv."
    for new, old in (("weight_g", "parametrizations.weight.original0"), ("weight_v", "parametrizations.weight.original1")):
        if pc + old in state:
            state[pc + new] = state.pop(pc + old)
    if pc + "weight" in state and pc + "weight_v" not in state:  # weight norm already folded away
        w = state.pop(pc + "weight")
        state[pc + "weight_v"], state[pc + "weight_g"] = w, w.norm(dim=(0, 1), keepdim=True)
    for i in range(cfg.n_layers):
        a = f"encoder.layers.{i}.attention."
        fuse_qkv(state, a + "q_proj", a + "k_proj", a + "v_proj", a + "qkv")
    if "masked_spec_embed" not in state and fill:  # absent when mask_time_prob == 0; only pretraining uses it
        state["masked_spec_embed"] = torch.zeros(cfg.dim)
    return state


# -----------------------------------------------------------------------------
# CPU inference fast path. oneDNN's fused linear/conv + GELU kernels run the same fp32 arithmetic 1.1-1.7x faster
# than torch's default CPU GEMM followed by a separate GELU pass (measured on a 2-core AVX-512 machine, see
# bench.py). They have no autograd, so they serve only gradient-free CPU calls; all else takes F.linear / F.conv1d.

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
    and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
# oneDNN builds no bfloat16 primitive on CPUs without AVX-512 ("could not create a primitive descriptor")
_ONEDNN_BF16 = _ONEDNN and getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()


def _fast(x: torch.Tensor, layer: nn.Module, kind: type) -> bool:
    """True when the fused oneDNN op may stand in for `layer`: a plain nn.Linear/nn.Conv1d (not a quantised,
    LoRA or other module in its place: quantize_dynamic's Linear has a weight() method, not a tensor) with a
    float32 (or native bf16) weight of x's dtype, on the CPU, at inference, outside autocast and torch.compile."""
    # under autocast F.linear would cast the weight; the fused ops do not, so they take only matching dtypes
    weight = getattr(layer, "weight", None)
    return _ONEDNN and type(layer) is kind and type(weight) in (torch.Tensor, nn.Parameter) \
        and x.device.type == "cpu" and x.dtype == weight.dtype \
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _ONEDNN_BF16)) \
        and not torch.is_autocast_enabled("cpu") and not torch.is_grad_enabled() \
        and not torch.compiler.is_compiling()


def linear(x: torch.Tensor, layer: nn.Module, gelu: bool = False) -> torch.Tensor:
    """layer(x), optionally followed by exact GELU, fused on the CPU inference path; any other module in the
    layer's place (quantised, wrapped) runs its own forward."""
    if _fast(x, layer, nn.Linear):
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "gelu" if gelu else "none",
                                                  [None], "none")
    y = layer(x)
    return F.gelu(y) if gelu else y


def conv1d_gelu(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """GELU(conv(x)) for an unpadded strided conv, fused on the CPU inference path."""
    if _fast(x, conv, nn.Conv1d):
        return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, [0], list(conv.stride), [1], 1,
                                                       "gelu", [None], "none")
    return F.gelu(conv(x))


# -----------------------------------------------------------------------------
# The conv front end's GroupNorm arithmetic: over each clip's own frames in a padded batch, with given statistics
# (a chunk of a long file), and at inference in blocks of time, so conv 0's output is never held whole.


def masked_channel_norm(x, n, weight, bias, eps):
    """GroupNorm with one group per channel whose statistics cover only each clip's first n[b] frames."""
    B, C, T = x.shape
    valid = (torch.arange(T, device=x.device)[None, :] < n[:, None]).to(torch.float32)[:, None, :]  # (B, 1, T)
    xf = x.float()
    count = n.clamp(min=1).to(torch.float32)[:, None, None]
    mean = (xf * valid).sum(-1, keepdim=True) / count  # (B, C, 1)
    var = ((xf - mean).square_() * valid).sum(-1, keepdim=True) / count
    y = (xf - mean) * torch.rsqrt(var + eps)
    return (y * weight[None, :, None] + bias[None, :, None]).to(x.dtype)


def _norm_stats_in_blocks(l0, wav: torch.Tensor, block: int = 1024):
    """FeatureExtractor.norm_stats for conv layer l0: the statistics of conv 0's GroupNorm (None when it has
    none), computed block by block, so conv 0's whole output is never held: per-block mean and variance
    merged with Chan's formula."""
    if l0.norm != "group":
        return None
    x = wav[:, None, :] if wav.dim() == 2 else wav  # (B, 1, L)
    w0, b0, k0, s0 = l0.conv.weight, l0.conv.bias, l0.kernel, l0.stride
    T0 = conv_out_len(x.shape[-1], k0, s0)
    n, mean, m2 = 0, None, None
    for a in range(0, T0, block):
        c = min(T0, a + block)
        y = F.conv1d(x[..., a * s0:(c - 1) * s0 + k0], w0, b0, stride=s0)  # frames [a, c) of conv 0
        var_b, mean_b = (t.double() for t in torch.var_mean(y, dim=-1, keepdim=True, correction=0))
        if mean is None:
            n, mean, m2 = c - a, mean_b, var_b * (c - a)
            continue
        nb = c - a
        delta = mean_b - mean
        mean = mean + delta * (nb / (n + nb))
        m2 = m2 + var_b * nb + delta.square() * (n * nb / (n + nb))
        n += nb
    return mean[..., 0], (m2 / n)[..., 0]


def _first_two_in_blocks(fx, x: torch.Tensor, stats=None, block: int = 1024) -> torch.Tensor:
    """Layers 0 and 1 at inference, in blocks of time, so conv 0's whole output (the largest activation: 512
    channels at 4800 frames/s) is never held. Pass 1 (norm_stats) runs conv 0 per block for the GroupNorm's
    statistics unless given; pass 2 runs it again per block, normalises, applies GELU and feeds conv 1. conv 0
    is cheap (one input channel); its memory traffic is not."""
    l0, l1 = fx.conv_layers[0], fx.conv_layers[1]
    w0, b0, k0, s0 = l0.conv.weight, l0.conv.bias, l0.kernel, l0.stride
    B, T1 = x.shape[0], conv_out_len(conv_out_len(x.shape[-1], k0, s0), l1.kernel, l1.stride)  # conv 1's frames
    if T1 < 1:
        return l1(l0(x, None, stats), None)
    stats = fx.norm_stats(x, block) if stats is None else stats
    scale, shift = _norm_affine(stats, l0.layer_norm.weight, l0.layer_norm.bias, l0.eps, x.dtype)
    out = x.new_empty(B, l1.conv.out_channels, T1)
    step = block // l1.stride
    for a in range(0, T1, step):
        c = min(T1, a + step)
        f0, f1 = a * l1.stride, (c - 1) * l1.stride + l1.kernel  # conv 0 frames that conv 1 needs
        y = F.conv1d(x[..., f0 * s0:(f1 - 1) * s0 + k0], w0, b0, stride=s0)
        y = torch.ops.aten.gelu_(torch.addcmul(shift, y, scale, out=y))
        out[..., a:c] = l1(y, None)
    return out


def _norm_affine(stats, weight, bias, eps, dtype):
    """GroupNorm with given statistics as y = x * scale + shift: (scale, shift) [B, C, 1] in dtype."""
    mean, var = stats
    scale = weight.double()[:, None] * torch.rsqrt(var.double()[..., None] + eps)  # (B, C, 1)
    shift = bias.double()[:, None] - mean.double()[..., None] * scale
    return scale.to(dtype), shift.to(dtype)
