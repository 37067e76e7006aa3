"""MERT-v2: the 2026 MERT encoders (m-a-p/MERT-v2-30s, m-a-p/MERT-v2-FullSong) in one file, no transformers.

The architecture is the one in the checkpoints' own remote code (`modeling_mert2.py`,
`configuration_mert2.py`), which is the reference; the state dict keys are its keys, so the official
`model.safetensors` loads strictly:

    wav [B, L] 24 kHz, not normalised (L >= n_fft // 2 + 1 = 1,025 samples)
      --|STFT|^2 (n_fft 2048, Hann 2048, hop 240, centred, reflect) @ mel fb [1025, 128]
        -> 10 log10(max(., 1e-10)) -> drop the last frame -> (mel - mel_mean) / mel_std.clamp_min(1e-5)
                                                        [B, L // 240, 128]   100 Hz, float32 always
      --ConvNeXt-V2 stages (GRN), widths 128 -> 128 -> 512 -> 1024, strides 1, 2, 2, depths 3, 4, 5
                                                        [B, L // 960, 1024]  25 Hz  = state 0
      --24 macaron Conformer blocks (1/2 FFN, rotary MHSA, conv module, 1/2 FFN, LayerNorm)
                                                        [B, L // 960, 1024]  = states 1..24

Frames: the centred STFT gives L // 240 + 1 frames and the last is dropped; each stride-2 stage (kernel 2)
halves the count, so frames = (L // 240) // 4 = L // 960. Frame j's stride path covers mel frames
4j..4j+3, centred on samples 240 * (4j .. 4j+3), so we place frame j at (960 j + 360) / 24000 s
(`FRAME_GRID`, in the (hop, first centre, sample rate) form probe.py uses). Every frame sees the whole
input, though: the GRN of each ConvNeXt layer divides by an L2 norm over the whole time axis and the
attention is global, so a chunk's features differ from the same frames in one pass.

Design choices:
- States: `extract()` returns 25 states, state 0 the downsampler output (the input of block 1) and state
  i the output of block i. The reference's `hidden_states` holds only the 24 block outputs (its
  `hidden_states[i - 1]` is our state i; the model card's "L i" is our state i).
- The rotary `inv_freq` is computed in float32 at construction and registered non-persistent, as in the
  reference; it is never read from a checkpoint (a stray `embed_positions.inv_freq` key is ignored).
  transformers 5 leaves that buffer uninitialised when it loads the remote code, which is why the same
  file gives different features from run to run there.
- The front end always runs in float32 with the checkpoint's own window, filterbank, mel_mean and
  mel_std (their float32 values survive `model.to(torch.bfloat16)`, as in the reference); only a freshly
  built model computes the Hann window and the HTK mel filterbank (torchaudio's defaults) itself.
- Attention is F.scaled_dot_product_attention, non-causal and unmasked, only.
- Padded batches (`lengths`): the clips of each distinct length run together, apart from the others, as
  in the reference, so no clip sees another's padding: a clip whose length is its own gets exactly the
  features it gets alone, clips sharing a length get them to float rounding (matmuls block differently
  for several rows than for one: ~4e-6 in float32 here); padded frames come back as zeros.

Layout: config, the modules, `MERT2`, then the checkpoint reader and writer (a standard-library
safetensors reader/writer and the local Hugging Face cache lookup; nothing is ever downloaded).
Imports only torch and the standard library; copy it into your project as is.
"""

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SAMPLE_RATE = 24000
FRAME_GRID = (960, 360.0, SAMPLE_RATE)  # (hop, centre of frame 0, sample rate), in samples

# -----------------------------------------------------------------------------
# Configuration


class MERT2Error(ValueError):
    """A MERT-v2 checkpoint or input that cannot be used; the message is one line naming the problem."""


@dataclass
class MERT2Config:
    """The fields of MERT-v2's config.json (its names); defaults are the released 632M models."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_mel_bins: int = 128
    sampling_rate: int = 24000
    n_fft: int = 2048
    win_length: int = 2048
    hop_length: int = 240
    subsampling_channels: tuple = (128, 512, 1024)  # stage outputs; stage 0's input is num_mel_bins
    subsampling_depths: tuple = (3, 4, 5)
    conv_depthwise_kernel_size: int = 31
    rotary_embedding_base: int = 10000
    layer_norm_eps: float = 1e-5
    subsampling_layer_norm_eps: float = 1e-6
    variant: str = "30s"  # "30s" or "fs" (FullSong); the same network, trained on different lengths
    context_seconds: float | None = None  # longest input trained on: 30 s, 360 s for "fs"

    def __post_init__(self):
        self.subsampling_channels = tuple(int(c) for c in self.subsampling_channels)
        self.subsampling_depths = tuple(int(d) for d in self.subsampling_depths)
        if self.context_seconds is None:
            self.context_seconds = 360.0 if self.variant == "fs" else 30.0
        # the reference config's own checks, as one-line errors
        problems = []
        if min(self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.num_attention_heads) <= 0:
            problems.append("encoder sizes must be positive")
        elif self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2:
            problems.append(f"hidden_size {self.hidden_size} must split into {self.num_attention_heads} heads "
                            f"of even size")
        if len(self.subsampling_channels) != 3 or len(self.subsampling_depths) != 3:
            problems.append("subsampling_channels and subsampling_depths need three entries each")
        elif (self.subsampling_channels[0] != self.num_mel_bins
              or self.subsampling_channels[-1] != self.hidden_size):
            problems.append(f"subsampling_channels {list(self.subsampling_channels)} must start at num_mel_bins "
                            f"{self.num_mel_bins} and end at hidden_size {self.hidden_size}")
        if self.n_fft % 2 or not 0 < self.win_length <= self.n_fft or self.hop_length <= 0:
            problems.append("n_fft must be even, 0 < win_length <= n_fft and hop_length > 0")
        if self.conv_depthwise_kernel_size <= 0 or self.conv_depthwise_kernel_size % 2 != 1:
            problems.append("conv_depthwise_kernel_size must be positive and odd")
        if self.variant not in ("30s", "fs"):
            problems.append(f"variant must be '30s' or 'fs', got {self.variant!r}")
        if problems:
            raise MERT2Error("MERT-v2 config: " + "; ".join(problems))

    @property
    def hop(self) -> int:
        """Input samples per output frame: hop_length * 4 (960, i.e. 25 frames per second)."""
        return self.hop_length * 4

    @property
    def min_samples(self) -> int:
        """Shortest input: n_fft // 2 + 1 samples (the centred STFT's reflect padding needs more than n_fft/2)."""
        return self.n_fft // 2 + 1

    @classmethod
    def from_dict(cls, d: dict, src: str = "config.json") -> "MERT2Config":
        """A config.json dict -> MERT2Config; refuses another model_type, ignores transformers' own fields."""
        kind = d.get("model_type")
        if kind != "mert2":
            raise MERT2Error(f"{src}: model_type {kind!r} is not MERT-v2 (expected 'mert2')")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if kw.get("subsampling_channels") is None:  # the reference's default: [mels, 512, hidden]
            kw["subsampling_channels"] = (d.get("num_mel_bins", 128), 512, d.get("hidden_size", 1024))
        if kw.get("subsampling_depths") is None:
            kw.pop("subsampling_depths", None)
        try:
            return cls(**kw)
        except MERT2Error as e:
            raise MERT2Error(f"{src}: {e}") from None
        except (TypeError, ValueError) as e:
            raise MERT2Error(f"{src}: bad MERT-v2 config ({' '.join(str(e).split())})") from None

    def to_hf(self) -> dict:
        """This config as the config.json the official remote code reads."""
        d = asdict(self)
        d.update(subsampling_channels=list(self.subsampling_channels),
                 subsampling_depths=list(self.subsampling_depths), model_type="mert2",
                 architectures=["MERT2Model"])
        return d


# -----------------------------------------------------------------------------
# Modules. Submodules sit at the positions the reference's nn.Sequential containers gave them
# (e.g. `pointwise_block.3` is the GRN), so that the key names are the checkpoint's.


class _Slots(nn.Module):
    """Submodules under numeric names, like an nn.Sequential whose forward we write out ourselves."""

    def __init__(self, slots: dict):
        super().__init__()
        for i, m in slots.items():
            self.add_module(str(i), m)

    def __getitem__(self, i):
        return self._modules[str(i)]


class _Buffer(nn.Module):
    """Holds one buffer under a given name (torchaudio's Spectrogram.window, MelScale.fb)."""

    def __init__(self, name: str, value: torch.Tensor):
        super().__init__()
        self.register_buffer(name, value)


def _keep_float32_buffers(module: nn.Module, apply, fn, recurse):
    """Run nn.Module._apply but give floating buffers back their float32 values (moved, never rounded)."""
    saved = [(m, k, v) for m in module.modules() for k, v in m._buffers.items()
             if v is not None and v.is_floating_point()]
    apply(fn, recurse=recurse)
    for m, k, v in saved:
        m._buffers[k] = v.to(device=m._buffers[k].device, dtype=torch.float32)
    return module


def htk_mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """[n_freqs, n_mels] triangular HTK mel filters, 0 Hz to sample_rate // 2, no norm (torchaudio's MelScale)."""
    hz_to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    mels = torch.linspace(hz_to_mel(0.0), hz_to_mel(float(sample_rate // 2)), n_mels + 2)
    f_pts = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - freqs[:, None]  # (n_freqs, n_mels + 2)
    down, up = -slopes[:, :-2] / f_diff[:-1], slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0)


class MelFrontend(nn.Module):
    """Waveform [B, L] -> normalised log-mel [B, L // hop_length, n_mels], in float32 whatever the model dtype."""

    def __init__(self, cfg: MERT2Config):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mel_mean", torch.zeros(cfg.num_mel_bins))
        self.register_buffer("mel_std", torch.ones(cfg.num_mel_bins))
        # a fresh model's front end; loading a checkpoint replaces all four buffers with its own
        self.spectrogram = _Buffer("window", torch.hann_window(cfg.win_length))
        self.mel_scale = _Buffer("fb", htk_mel_filterbank(cfg.n_fft // 2 + 1, cfg.num_mel_bins, cfg.sampling_rate))

    def _apply(self, fn, recurse=True):
        return _keep_float32_buffers(self, super()._apply, fn, recurse)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        with torch.autocast(device_type=wav.device.type, enabled=False):
            spec = torch.stft(wav.float(), cfg.n_fft, cfg.hop_length, cfg.win_length, self.spectrogram.window,
                              center=True, pad_mode="reflect", normalized=False, onesided=True,
                              return_complex=True).abs().pow(2.0)  # (B, F, T + 1) power
            mel = torch.matmul(spec.transpose(-1, -2), self.mel_scale.fb)  # (B, T + 1, M)
            mel = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))
            return (mel[:, :-1] - self.mel_mean) / self.mel_std.clamp_min(1e-5)  # last frame dropped


class GRN(nn.Module):
    """ConvNeXt-V2 global response norm over [B, T, C]: the L2 norm of each channel over all of time."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x):
        g = torch.norm(x, p=2, dim=1, keepdim=True)  # (B, 1, C): whole input, so chunks differ from one pass
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.weight * (x * n) + self.bias + x


class ConvNeXtLayer(nn.Module):
    """x + Linear(GRN(GELU(Linear_4x(LN(depthwise conv k7 (x)))))) on [B, T, C]."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.depthwise_block = _Slots({1: nn.Conv1d(dim, dim, 7, padding=3, groups=dim)})
        self.pointwise_block = _Slots({0: nn.LayerNorm(dim, eps=eps), 1: nn.Linear(dim, 4 * dim),
                                       3: GRN(4 * dim), 4: nn.Linear(4 * dim, dim)})

    def forward(self, x):
        p = self.pointwise_block
        h = self.depthwise_block[1](x.transpose(1, 2)).transpose(1, 2)
        h = p[4](p[3](F.gelu(p[1](p[0](h)))))
        return x + h


class ConvNeXtStage(nn.Module):
    """Optional resampling (LayerNorm, Conv1d kernel 2 with the stage's stride), then ConvNeXt layers."""

    def __init__(self, c_in: int, c_out: int, stride: int, depth: int, eps: float):
        super().__init__()
        if c_in != c_out or stride > 1:  # else the reference's nn.Identity: no keys
            self.resampling_layer = _Slots({0: nn.LayerNorm(c_in, eps=eps),
                                            2: nn.Conv1d(c_in, c_out, 2, stride=stride)})
        else:
            self.resampling_layer = None
        self.convnext_layers = nn.ModuleList(ConvNeXtLayer(c_out, eps) for _ in range(depth))

    def forward(self, x):
        if self.resampling_layer is not None:
            r = self.resampling_layer
            x = r[2](r[0](x).transpose(1, 2)).transpose(1, 2)  # T -> (T - 2) // stride + 1
        for layer in self.convnext_layers:
            x = layer(x)
        return x


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary tables for positions 0..T-1, from a float32 inv_freq that no checkpoint holds."""

    def __init__(self, cfg: MERT2Config):
        super().__init__()
        hd = cfg.hidden_size // cfg.num_attention_heads
        inv_freq = 1.0 / (float(int(cfg.rotary_embedding_base)) ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        return _keep_float32_buffers(self, super()._apply, fn, recurse)

    def forward(self, T: int, dtype: torch.dtype):
        """(cos, sin), each [1, T, 1, head_dim] in dtype, computed in float32 (positions start at 0 every call)."""
        pos = torch.arange(T, device=self.inv_freq.device, dtype=torch.float32)
        ang = torch.outer(pos, self.inv_freq)
        ang = torch.cat((ang, ang), dim=-1)[None, :, None, :]
        return ang.cos().to(dtype), ang.sin().to(dtype)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary q/k, biases on q/k/v/out, plain SDPA (no mask, not causal)."""

    def __init__(self, cfg: MERT2Config):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.query_proj, self.key_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.value_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, cos, sin):
        B, T, D = x.shape
        shape = (B, T, self.n_heads, D // self.n_heads)
        q = self.query_proj(x).reshape(shape)
        k = self.key_proj(x).reshape(shape)
        v = self.value_proj(x).reshape(shape)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    def __init__(self, cfg: MERT2Config):
        super().__init__()
        self.w_1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.w_2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.w_2(F.gelu(self.w_1(x)))


class ConvModule(nn.Module):
    """LN, pointwise conv 2x + GLU, depthwise conv k31, LN, GELU, pointwise conv; no conv biases."""

    def __init__(self, cfg: MERT2Config):
        super().__init__()
        d, k, eps = cfg.hidden_size, cfg.conv_depthwise_kernel_size, cfg.layer_norm_eps
        self.layer_norm = nn.LayerNorm(d, eps=eps)
        self.conv_block = _Slots({
            1: nn.Conv1d(d, 2 * d, 1, bias=False),
            3: nn.Conv1d(d, d, k, padding=(k - 1) // 2, groups=d, bias=False),
            4: _Slots({1: nn.LayerNorm(d, eps=eps)}),
            6: nn.Conv1d(d, d, 1, bias=False),
        })

    def forward(self, x):
        c = self.conv_block
        h = F.glu(c[1](self.layer_norm(x).transpose(1, 2)), dim=1)  # (B, D, T)
        h = c[4][1](c[3](h).transpose(1, 2)).transpose(1, 2)
        return c[6](F.gelu(h)).transpose(1, 2)  # (B, T, D)


class ConformerBlock(nn.Module):
    """Macaron Conformer: x + FFN/2, + MHSA, + conv module, + FFN/2, then a final LayerNorm."""

    def __init__(self, cfg: MERT2Config):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.ffn1_layer_norm, self.ffn1 = nn.LayerNorm(d, eps=eps), FeedForward(cfg)
        self.attn_layer_norm, self.attn = nn.LayerNorm(d, eps=eps), SelfAttention(cfg)
        self.conv_module = ConvModule(cfg)
        self.ffn2_layer_norm, self.ffn2 = nn.LayerNorm(d, eps=eps), FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x, cos, sin):
        x = x + 0.5 * self.ffn1(self.ffn1_layer_norm(x))
        x = self.attn(self.attn_layer_norm(x), cos, sin) + x
        x = self.conv_module(x) + x
        x = x + 0.5 * self.ffn2(self.ffn2_layer_norm(x))
        return self.final_layer_norm(x)


# -----------------------------------------------------------------------------
# The model


class MERT2(nn.Module):
    """MERT-v2 encoder: waveform [B, L] at 24 kHz -> 25 hidden states [B, L // 960, 1024] at 25 Hz."""

    def __init__(self, cfg: MERT2Config):
        super().__init__()
        self.config = cfg
        self.feature_extractor = MelFrontend(cfg)
        ch = (cfg.num_mel_bins,) + cfg.subsampling_channels
        self.subsampling_module = nn.ModuleList(
            ConvNeXtStage(ch[i], ch[i + 1], (1, 2, 2)[i], cfg.subsampling_depths[i], cfg.subsampling_layer_norm_eps)
            for i in range(3))
        self.layers = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.embed_positions = RotaryEmbedding(cfg)

    @property
    def num_states(self) -> int:
        """Number of hidden states extract() returns: blocks + 1 (state 0 is the downsampler output)."""
        return self.config.num_hidden_layers + 1

    def num_frames(self, n_samples):
        """Frames for n_samples (int or tensor): n // 960, 0 below the 1,025-sample minimum."""
        n = n_samples // self.config.hop
        if isinstance(n_samples, torch.Tensor):
            return torch.where(n_samples >= self.config.min_samples, n, torch.zeros_like(n))
        return n if n_samples >= self.config.min_samples else 0

    def _states(self, wav: torch.Tensor, upto: int, keep: list, out: torch.Tensor, rows: torch.Tensor):
        """Run clips of one length wav [b, n]; write state keep[j] into out[j, rows, :frames]."""
        dtype = self.subsampling_module[0].convnext_layers[0].depthwise_block[1].weight.dtype
        x = self.feature_extractor(wav).to(dtype)  # (b, n // 240, M), float32 front end
        for stage in self.subsampling_module:
            x = stage(x)  # (b, n // 960, D) after the two stride-2 stages
        T = x.shape[1]
        if 0 in keep:
            out[keep.index(0), rows, :T] = x.to(out.dtype)
        cos, sin = self.embed_positions(T, x.dtype)
        for i, block in enumerate(self.layers[:upto]):
            x = block(x, cos, sin)
            if i + 1 in keep:
                out[keep.index(i + 1), rows, :T] = x.to(out.dtype)

    @torch.inference_mode()
    def extract(self, wav: torch.Tensor, layers=None, lengths=None) -> torch.Tensor:
        """Hidden states [n_states, B, L // 960, D] for wav [B, L] or [L]; padded frames come back as zeros.

        `layers` (indices 0..24) returns only those states, in that order, and stops after the deepest;
        state 0 is the downsampler output, state i the output of block i. `lengths` [B] gives each clip's
        true sample count in a right-padded batch: the clips of each distinct length run together and apart
        from the rest, so each gets the features it gets alone (exactly if no other clip has its length, to
        float rounding if some do); what lies past a length is never read.
        """
        cfg = self.config
        if wav.dim() == 1:
            wav = wav[None]
        if wav.dim() != 2 or not wav.is_floating_point() or wav.shape[0] == 0:
            raise MERT2Error(f"expected a float waveform [batch, samples], got {wav.dtype} of shape {tuple(wav.shape)}")
        B, L = wav.shape
        if lengths is None:
            lengths = torch.full((B,), L, dtype=torch.long)
        lengths = torch.as_tensor(lengths).long().reshape(-1).cpu()
        if lengths.numel() != B or bool((lengths > L).any()):
            raise MERT2Error(f"lengths must be {B} sample counts of at most {L}, got {lengths.tolist()}")
        if bool((lengths < cfg.min_samples).any()):
            short = int(lengths.min())
            raise MERT2Error(f"input of {short} samples ({short / cfg.sampling_rate:.3f} s) is too short: "
                             f"MERT-v2 needs at least {cfg.min_samples} samples (n_fft // 2 + 1)")
        valid = torch.arange(L, device=wav.device)[None, :] < lengths.to(wav.device)[:, None]
        if not bool(torch.isfinite(torch.where(valid, wav, 0.0)).all()):
            rows = [i for i in range(B) if not bool(torch.isfinite(wav[i, :int(lengths[i])]).all())]
            raise MERT2Error(f"non-finite samples (NaN or inf) in the input (batch row(s) {rows})")
        keep = list(range(self.num_states)) if layers is None else [int(i) for i in layers]
        bad = [i for i in keep if not 0 <= i < self.num_states]
        if bad or not keep:
            raise MERT2Error(f"layer index {bad or keep} out of range 0..{self.num_states - 1}")
        dtype = self.subsampling_module[0].convnext_layers[0].depthwise_block[1].weight.dtype
        out = torch.zeros(len(keep), B, L // cfg.hop, cfg.hidden_size, dtype=dtype, device=wav.device)
        for n in torch.unique(lengths).tolist():  # one run per distinct length (GRN, attention see it all)
            rows = torch.nonzero(lengths == n).flatten()
            self._states(wav[rows.to(wav.device), :n], max(keep), keep, out, rows.to(wav.device))
        return out

    def forward(self, wav: torch.Tensor, lengths=None) -> torch.Tensor:
        """The last hidden state [B, L // 960, D] (the reference's last_hidden_state, zeros past each length)."""
        return self.extract(wav, layers=[self.num_states - 1], lengths=lengths)[0]

    # -- checkpoints ------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, map_location="cpu") -> "MERT2":
        """Load a MERT-v2 folder (config.json + model.safetensors or pytorch_model.bin), a hub id found in the
        local Hugging Face cache (never downloads), or a .safetensors file with config.json beside it."""
        cfg, state, src = load_checkpoint(path, map_location)
        model = cls(cfg)
        load_state_strict(model, state, src)
        return model.eval()

    def save_pretrained(self, folder, dtype: torch.dtype = torch.float32) -> Path:
        """Write config.json and model.safetensors in the official layout (atomically; no safetensors package)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.to(dtype) if v.is_floating_point() and not k.startswith("feature_extractor.") else v
                 for k, v in self.state_dict().items()}
        write_safetensors(folder / "model.safetensors", state, {"format": "pt"})
        cfg = dict(self.config.to_hf(), torch_dtype=str(dtype).replace("torch.", ""))
        tmp = folder / "config.json.tmp"
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")
        os.replace(tmp, folder / "config.json")
        return folder


# -----------------------------------------------------------------------------
# Checkpoint reading and writing


def load_state_strict(model: nn.Module, state: dict, src: str):
    """load_state_dict that names every missing, unexpected or mis-shaped key in one line.

    `embed_positions.inv_freq` is dropped if a checkpoint carries it: the reference registers it
    non-persistent, so its value always comes from the config, never from the file."""
    state = {k: v for k, v in state.items() if k != "embed_positions.inv_freq"}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            problems.append(f"{len(keys)} {what} key(s): " + ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else ""))
    if problems:
        raise MERT2Error(f"{src}: not this MERT-v2 layout: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


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
    found = sorted((d for d in snaps.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime) \
        if snaps.is_dir() else []
    if found:
        return found[-1]
    raise MERT2Error(f"{repo_id}: not in the local Hugging Face cache ({root}); nothing is downloaded at run time "
                     f"(fetch it once with `hf download {repo_id}`, or pass a folder)")


def _resolve(path) -> tuple[Path, Path]:
    """path, hub id or weight file -> (config.json, weight file or index); raises MERT2Error naming what is missing."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
            p = hf_cache_snapshot(str(path))
        else:
            raise MERT2Error(f"{path}: no such file or folder")
    folder = p if p.is_dir() else p.parent
    cfg = folder / "config.json"
    if not cfg.exists():
        raise MERT2Error(f"{p}: no config.json {'in the folder' if p.is_dir() else 'beside the weight file'}")
    if not p.is_dir():
        return cfg, p
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (folder / name).exists():
            return cfg, folder / name
    raise MERT2Error(f"{folder}: neither model.safetensors nor pytorch_model.bin found")


def read_config(path) -> MERT2Config:
    """The MERT2Config of a folder, hub id (local cache) or weight file; MERT2Error if it is not MERT-v2."""
    cfg_file, _ = _resolve(path)
    try:
        d = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise MERT2Error(f"{cfg_file}: unreadable config ({' '.join(str(e).split())})") from None
    if not isinstance(d, dict):
        raise MERT2Error(f"{cfg_file}: expected a JSON object")
    return MERT2Config.from_dict(d, str(cfg_file))


def is_mert2(path) -> bool:
    """True if path (folder, hub id in the local cache, weight file) has a config.json with model_type 'mert2'."""
    try:
        cfg_file, _ = _resolve(path)
        return json.loads(cfg_file.read_text()).get("model_type") == "mert2"
    except (MERT2Error, OSError, ValueError, AttributeError):
        return False


def load_checkpoint(path, map_location="cpu") -> tuple[MERT2Config, dict, str]:
    """(config, state dict, source) of a MERT-v2 folder, hub id (local cache) or weight file."""
    cfg = read_config(path)
    _, wfile = _resolve(path)
    if wfile.name.endswith(".index.json"):  # sharded safetensors
        try:
            shards = sorted(set(json.loads(wfile.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise MERT2Error(f"{wfile}: unreadable shard index ({' '.join(str(e).split())})") from None
        state = {}
        for s in shards:
            state.update(read_safetensors(wfile.parent / s))
    elif wfile.suffix == ".safetensors":
        state = read_safetensors(wfile)
    else:
        try:
            state = torch.load(wfile, map_location=map_location, weights_only=True)
        except Exception as e:  # truncated zip, a pickle with objects, ...
            raise MERT2Error(f"{wfile}: cannot read checkpoint ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:120]})") from None
        if not isinstance(state, dict):
            raise MERT2Error(f"{wfile}: expected a state dict, found {type(state).__name__}")
    return cfg, state, str(wfile)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path) -> dict:
    """A .safetensors file -> {name: tensor}, with the standard library, one tensor read at a time."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            base, size = 8 + n, path.stat().st_size
            out = {}
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta["dtype"] not in _ST_DTYPES:
                    raise MERT2Error(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
                a, b = meta["data_offsets"]
                if base + b > size:
                    raise MERT2Error(f"{path}: truncated (tensor {name} ends past the end of the file)")
                f.seek(base + a)
                buf = bytearray(f.read(b - a))  # writable: torch.frombuffer warns on read-only memory
                t = torch.frombuffer(buf, dtype=_ST_DTYPES[meta["dtype"]]) if b > a else \
                    torch.empty(0, dtype=_ST_DTYPES[meta["dtype"]])
                out[name] = t.reshape(meta["shape"])
    except MERT2Error:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise MERT2Error(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:120]})") from None
    return out


def write_safetensors(path, tensors: dict, metadata: dict | None = None):
    """Write {name: tensor} as .safetensors with the standard library, atomically (temp file, then rename)."""
    names = {v: k for k, v in _ST_DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # align the data to 8 bytes, as the safetensors package does
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)
