"""RVQ-VAE acoustic teacher: a SEANet conv autoencoder with a residual vector quantiser.

MERT-v1 learns to predict 8 streams of discrete acoustic codes at 75 Hz. This file produces such
codes, either from a small model you train yourself (`python rvq.py --data DIR --out teacher.pt`)
or from EnCodec 24 kHz's own weights, which load into the `encodec24k` preset and give the very
same codes as the `encodec` package at 6 kbps.

    wav [B, L] @ 24 kHz ─ Encoder (strides 2,4,5,8 = hop 320) ─▶ z [B, 128, ceil(L/320)] @ 75 Hz
        ─ RVQ: codebook k quantises what codebooks 1..k-1 left over ─▶ codes [B, n_q, T] (int64)
        ─ sum of the chosen code vectors ─ Decoder (mirror image) ─▶ wav [B, 320·T]

Decisions:
- EnCodec's framing: weight-normalised convs that pad themselves so a stride-s layer turns L steps
  into exactly ceil(L/s); a clip of n·320 samples gives n frames.
- Codebooks learn by EMA (counts and vector sums), start from k-means on the first batch and restart
  dead codes on random vectors of the batch; under torch.distributed the statistics are all-reduced
  and random choices broadcast from rank 0, so every rank holds the same codebooks.
- Loss: waveform L1 + SNR + multi-resolution log-mel L1 + spectral convergence + commitment, with
  quantiser dropout so the first k codebooks are a code on their own; no discriminator (MERT needs
  the codes, not listening quality).
- Imports only torch, numpy and the standard library; `audio` only in the command-line part.

References: docs/teachers.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

SAMPLE_RATE = 24_000


# ----------------------------------------------------------------------------- configuration

@dataclass
class RVQConfig:
    """Architecture of an RVQ-VAE; `PRESETS` holds the named ones."""
    n_filters: int = 32                      # channels after the first conv; doubled at each downsampling
    ratios: tuple = (8, 5, 4, 2)             # decoder upsampling order; the encoder uses them reversed
    dimension: int = 128                     # latent / codebook vector size
    n_residual_layers: int = 1               # residual blocks per resolution
    residual_kernel_size: int = 3
    dilation_base: int = 2                   # dilation of residual block j is dilation_base**j
    compress: int = 2                        # residual branch width = channels // compress
    true_skip: bool = False                  # identity skip (True) or a 1x1 conv skip (False, EnCodec)
    kernel_size: int = 7                     # first conv
    last_kernel_size: int = 7                # last conv
    lstm: int = 2                            # LSTM layers at the bottleneck (0 = none)
    causal: bool = True                      # all padding on the left (EnCodec 24 kHz) or split
    n_q: int = 32                            # codebooks held (encode may use fewer)
    bins: int = 1024                         # codes per codebook
    decay: float = 0.99                      # EMA decay of the codebook statistics
    kmeans_iters: int = 50                   # k-means iterations of the first-batch initialisation
    dead_threshold: float = 2.0              # restart codes whose EMA count falls below this
    commitment: float = 1.0                  # weight of the commitment loss
    snr_weight: float = 0.0                  # weight of the waveform SNR loss (-SNR dB / 10, capped at 30 dB)
    quantizer_dropout: float = 0.0           # probability that a training step uses a random n_q
    sample_rate: int = SAMPLE_RATE

    @property
    def hop(self) -> int:
        """Samples per code frame (320 for strides 2·4·5·8)."""
        return int(np.prod(self.ratios))


PRESETS = {
    # EnCodec 24 kHz exactly: causal weight-norm SEANet, 2-layer LSTM, 32 codebooks (6 kbps = 8).
    "encodec24k": RVQConfig(),
    # A few million parameters, fast on a CPU: narrow at the audio rate, no LSTM, identity skips,
    # 8 codebooks. Dead-code threshold for 600 frames per step (8 x 1 s): a code's mean EMA count
    # is 600/1024 = 0.59; restart below 0.25, about EnCodec's ratio (threshold 2 at ~4.7).
    # The SNR term makes the decoder match the waveform (phase), not only the spectrum: with
    # spectral losses alone and a CPU-hour budget the output stays uncorrelated with the input.
    "small": RVQConfig(n_filters=16, lstm=0, true_skip=True, causal=False, n_q=8,
                       kmeans_iters=20, dead_threshold=0.25, quantizer_dropout=0.5, snr_weight=1.0),
}


# ----------------------------------------------------------------------------- building blocks

class Conv(nn.Module):
    """Weight-normalised Conv1d / ConvTranspose1d that pads (or trims) itself: L -> ceil(L/s)·... frames.

    Forward conv, stride s, kernel k (dilated: k_eff = (k-1)·d + 1), pad_total = k_eff - s:

        causal:      [pad_total zeros-by-reflection | x_0 ... x_{L-1} | extra]
        non-causal:  [pad_total - pad_total//2 | x_0 ... x_{L-1} | pad_total//2 + extra]
        extra = ceil(L/s)·s - L   (so the last window is full and the output has ceil(L/s) frames;
                                   without it the decoder could not rebuild all L samples)

    Transposed conv, stride s, kernel k: T frames -> (T-1)·s + k samples; the k - s overhanging
    samples are trimmed (all on the right when causal, split otherwise) -> exactly T·s samples.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1,
                 causal: bool = True, transpose: bool = False):
        super().__init__()
        # Borrow PyTorch's default initialisation, then split the weight into direction and norm.
        ref = (nn.ConvTranspose1d if transpose else nn.Conv1d)(cin, cout, kernel, stride)
        v = ref.weight.detach().clone()                   # (cout, cin, k) or (cin, cout, k) if transposed
        self.weight_g = nn.Parameter(v.flatten(1).norm(dim=1).view(-1, 1, 1))  # (dim0, 1, 1): weight == v at init
        self.weight_v = nn.Parameter(v)
        self.bias = nn.Parameter(ref.bias.detach().clone())
        self.kernel, self.stride, self.dilation = kernel, stride, dilation
        self.causal, self.transpose = causal, transpose

    def weight(self) -> torch.Tensor:
        """The effective weight g·v/‖v‖ (computed the way torch's weight_norm does, bit for bit)."""
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, L)
        k, s, d = self.kernel, self.stride, self.dilation
        if self.transpose:
            y = F.conv_transpose1d(x, self.weight(), self.bias, s)  # (B, C', (T-1)s + k)
            overhang = k - s
            right = overhang if self.causal else overhang // 2
            return y[..., overhang - right: y.shape[-1] - right]
        left, right = self.padding(x.shape[-1])
        return F.conv1d(_reflect_pad(x, left, right), self.weight(), self.bias, s, 0, d)

    def padding(self, length: int = 0) -> tuple[int, int]:
        """(left, right) samples a forward conv pads an input of `length` with (the diagram above)."""
        k_eff = (self.kernel - 1) * self.dilation + 1
        pad_total = k_eff - self.stride
        extra = -(-length // self.stride) * self.stride - length
        left = pad_total if self.causal else pad_total - pad_total // 2
        return left, pad_total - left + extra


def _reflect_pad(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Reflection padding that also works when the input is shorter than the padding."""
    length = x.shape[-1]
    short = max(left, right) - length + 1 if length <= max(left, right) else 0
    if short:
        # F.pad's reflect needs more samples than the pad; zero-extend first, drop it afterwards
        x = F.pad(x, (0, short))
    y = F.pad(x, (left, right), mode="reflect")
    return y[..., : y.shape[-1] - short]


class ResBlock(nn.Module):
    """SEANet residual unit: x + conv1x1(ELU(conv_k,dilated(ELU(x)))) with a 1x1-conv or identity skip."""

    def __init__(self, dim: int, cfg: RVQConfig, dilation: int):
        super().__init__()
        hidden = dim // cfg.compress
        self.conv1 = Conv(dim, hidden, cfg.residual_kernel_size, dilation=dilation, causal=cfg.causal)
        self.conv2 = Conv(hidden, dim, 1, causal=cfg.causal)
        self.skip = nn.Identity() if cfg.true_skip else Conv(dim, dim, 1, causal=cfg.causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L) -> (B, C, L)
        return self.skip(x) + self.conv2(F.elu(self.conv1(F.elu(x))))


class LSTMBlock(nn.Module):
    """Multi-layer LSTM over frames with a residual connection, on conv layout (B, C, T)."""

    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(2, 0, 1)                             # (T, B, C): the time-major layout EnCodec ran in
        y, _ = self.lstm(x)
        return (y + x).permute(1, 2, 0)                    # (B, C, T)


class ELU(nn.Module):
    """ELU as a module, so that layer indices line up with EnCodec's Sequential."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x)


class Encoder(nn.Module):
    """SEANet encoder: conv, then per stride [res blocks, ELU, strided conv], LSTM, ELU, conv."""

    def __init__(self, cfg: RVQConfig):
        super().__init__()
        ch = cfg.n_filters
        layers: list[nn.Module] = [Conv(1, ch, cfg.kernel_size, causal=cfg.causal)]
        for r in reversed(cfg.ratios):                     # 2, 4, 5, 8: cheapest where the rate is highest
            layers += [ResBlock(ch, cfg, cfg.dilation_base ** j) for j in range(cfg.n_residual_layers)]
            # kernel 2r: each output frame sees two strides of input
            layers += [ELU(), Conv(ch, 2 * ch, 2 * r, stride=r, causal=cfg.causal)]
            ch *= 2
        if cfg.lstm:
            layers.append(LSTMBlock(ch, cfg.lstm))
        layers += [ELU(), Conv(ch, cfg.dimension, cfg.last_kernel_size, causal=cfg.causal)]
        self.layers = nn.Sequential(*layers)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:  # (B, 1, L) -> (B, D, ceil(L/hop))
        return self.layers(wav)

    def reach(self) -> tuple[int, int]:
        """(left, right) samples of input beyond a frame's own hop that its convolutions see (exact; an LSTM,
        if any, sees the whole past on top): frame t depends on samples [t·hop - left, (t+1)·hop + right)."""
        lo, hi = 0, 0                                      # input span of frame 0, walked back layer by layer
        hop = 1
        for layer in reversed(self.layers):
            conv = layer.conv1 if isinstance(layer, ResBlock) else layer  # a ResBlock's 1x1 convs reach no further
            if not isinstance(conv, Conv):
                continue
            left, _ = conv.padding()
            lo = lo * conv.stride - left
            hi = hi * conv.stride - left + (conv.kernel - 1) * conv.dilation
            hop *= conv.stride
        return -lo, max(0, hi - (hop - 1))


class Decoder(nn.Module):
    """Mirror of the encoder: conv, LSTM, per stride [ELU, transposed conv, res blocks], ELU, conv."""

    def __init__(self, cfg: RVQConfig):
        super().__init__()
        ch = cfg.n_filters * 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [Conv(cfg.dimension, ch, cfg.kernel_size, causal=cfg.causal)]
        if cfg.lstm:
            layers.append(LSTMBlock(ch, cfg.lstm))
        for r in cfg.ratios:                               # 8, 5, 4, 2
            layers += [ELU(), Conv(ch, ch // 2, 2 * r, stride=r, causal=cfg.causal, transpose=True)]
            ch //= 2
            layers += [ResBlock(ch, cfg, cfg.dilation_base ** j) for j in range(cfg.n_residual_layers)]
        layers += [ELU(), Conv(ch, 1, cfg.last_kernel_size, causal=cfg.causal)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, D, T) -> (B, 1, T·hop)
        return self.layers(z)


# ----------------------------------------------------------------------------- residual VQ

def _distributed() -> bool:
    """True under an initialised torch.distributed group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sample_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """n random rows of x (without replacement when there are enough)."""
    if x.shape[0] >= n:
        return x[torch.randperm(x.shape[0], device=x.device)[:n]]
    return x[torch.randint(0, x.shape[0], (n,), device=x.device)]


def kmeans(x: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on rows of x (N, D) -> (centroids (k, D), cluster sizes (k,)); empty clusters keep their seed."""
    means = _sample_rows(x, k)
    for _ in range(iters):
        assign = torch.cdist(x, means).argmin(1)           # (N,)
        counts = torch.bincount(assign, minlength=k)       # (k,)
        sums = torch.zeros_like(means).index_add_(0, assign, x)
        means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], means)
    return means, counts.to(x.dtype)


class Codebook(nn.Module):
    """One codebook of `bins` vectors, trained by EMA (not by gradient), with dead-code restart."""

    def __init__(self, cfg: RVQConfig):
        super().__init__()
        self.bins, self.decay, self.iters = cfg.bins, cfg.decay, cfg.kmeans_iters
        self.threshold = cfg.dead_threshold
        # buffers, not parameters: the optimiser never touches them, the checkpoint holds them
        self.register_buffer("inited", torch.zeros(1))
        self.register_buffer("cluster_size", torch.zeros(cfg.bins))              # EMA of counts
        self.register_buffer("embed", torch.zeros(cfg.bins, cfg.dimension))      # the code vectors
        self.register_buffer("embed_sum", torch.zeros(cfg.bins, cfg.dimension))  # EMA of vector sums

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the closest code (Euclidean) for each row of x (N, D) -> (N,)."""
        # ‖x‖² - 2 x·e + ‖e‖², evaluated in this order, on e transposed, and picked with max of the
        # negation: the same float operations as EnCodec, so rounding, near-ties and exact ties
        # (duplicate codes) resolve to the same index
        # (in place, to spare three (N, bins) temporaries: a - b + c == (-b) + a + c exactly in IEEE)
        et = self.embed.t()                                 # (D, bins)
        d2 = (2 * x) @ et                                   # (N, bins)
        d2.neg_().add_(x.pow(2).sum(1, keepdim=True)).add_(et.pow(2).sum(0, keepdim=True))
        return d2.neg_().max(1).indices

    @torch.no_grad()
    def init_(self, x: torch.Tensor, count_scale: float = 1.0) -> None:
        """k-means initialisation from rows of x (N, D); rank 0's result is broadcast.

        count_scale turns the cluster sizes into per-step counts when x holds several batches, so
        that codes which the drifting encoder stops using expire after the usual ~100 steps.
        """
        means, counts = kmeans(x.float(), self.bins, self.iters)
        counts = counts * count_scale
        self.embed.copy_(means)
        self.cluster_size.copy_(counts)
        self.embed_sum.copy_(means * counts[:, None])
        self.inited.fill_(1)
        self._broadcast()

    def _broadcast(self) -> None:
        if _distributed():
            for b in (self.inited, self.cluster_size, self.embed, self.embed_sum):
                dist.broadcast(b, 0)

    @torch.no_grad()
    def update_(self, x: torch.Tensor, idx: torch.Tensor) -> None:
        """EMA update from rows x (N, D) assigned to codes idx (N,), then restart unused codes."""
        # per-code count and vector sum of this batch, packed so one all-reduce carries both
        stats = torch.zeros(self.bins, 1 + x.shape[1], device=x.device, dtype=x.dtype)
        stats[:, 0].index_add_(0, idx, torch.ones_like(idx, dtype=x.dtype))
        stats[:, 1:].index_add_(0, idx, x)
        if _distributed():
            dist.all_reduce(stats)                          # sums over ranks: every rank sees the global batch
        self.cluster_size.lerp_(stats[:, 0], 1 - self.decay)
        self.embed_sum.lerp_(stats[:, 1:], 1 - self.decay)
        # Laplace smoothing keeps rarely used codes from dividing by ~0
        n = self.cluster_size.sum()
        size = (self.cluster_size + 1e-5) / (n + self.bins * 1e-5) * n
        self.embed.copy_(self.embed_sum / size[:, None])
        dead = self.cluster_size < self.threshold          # identical on all ranks (all-reduced stats)
        if dead.any():
            # restart on random vectors of this batch; give them a count of 2·threshold so they
            # survive ~70 steps (at decay 0.99) to attract data before they can expire again
            new = _sample_rows(x, self.bins)
            self.embed[dead] = new[dead]
            self.cluster_size[dead] = 2 * self.threshold
            self.embed_sum[dead] = new[dead] * 2 * self.threshold
            self._broadcast()                               # rank 0's random picks win everywhere


class ResidualVQ(nn.Module):
    """n_q codebooks in cascade: codebook k quantises the residual left by codebooks 1..k-1."""

    def __init__(self, cfg: RVQConfig):
        super().__init__()
        self.cfg = cfg
        self.codebooks = nn.ModuleList(Codebook(cfg) for _ in range(cfg.n_q))

    def encode(self, z: torch.Tensor, n_q: int) -> torch.Tensor:
        """Latents z (B, D, T) -> codes (B, n_q, T)."""
        B, D, T = z.shape
        residual = z.transpose(1, 2).reshape(B * T, D)      # (B·T, D)
        codes = []
        for cb in self.codebooks[:n_q]:
            idx = cb.nearest(residual)
            residual = residual - F.embedding(idx, cb.embed)
            codes.append(idx)
        return torch.stack(codes, 1).view(B, T, -1).transpose(1, 2).contiguous()  # (B, n_q, T)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, n_q, T) -> summed code vectors (B, D, T)."""
        out = sum(F.embedding(codes[:, k], cb.embed) for k, cb in enumerate(self.codebooks[: codes.shape[1]]))
        return out.transpose(1, 2)                          # (B, T, D) -> (B, D, T)

    @torch.no_grad()
    def init_(self, z: torch.Tensor, count_scale: float = 1.0) -> None:
        """k-means-initialise every codebook on its own residual of latents z (B, D, T)."""
        residual = z.transpose(1, 2).reshape(-1, z.shape[1]).float()
        for cb in self.codebooks:
            cb.init_(residual, count_scale)
            residual = residual - F.embedding(cb.nearest(residual), cb.embed)

    def forward(self, z: torch.Tensor, n_q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: z (B, D, T) -> (straight-through quantised (B, D, T), codes (B, n_q, T), commitment loss)."""
        B, D, T = z.shape
        x = z.transpose(1, 2).reshape(B * T, D)             # (B·T, D)
        if not bool(self.codebooks[0].inited):
            self.init_(z.detach())
        residual, quantized = x, torch.zeros_like(x)
        codes, commit = [], x.new_zeros(())
        for cb in self.codebooks[:n_q]:
            idx = cb.nearest(residual.detach())
            q = F.embedding(idx, cb.embed)                  # chosen vectors (before this step's update)
            if self.training:
                commit = commit + F.mse_loss(residual, q)   # pulls the encoder towards its codes
                cb.update_(residual.detach(), idx)
            q = residual + (q - residual).detach()          # straight-through: value q, gradient identity
            quantized = quantized + q
            residual = residual - q
            codes.append(idx)
        codes_t = torch.stack(codes, 1).view(B, T, -1).transpose(1, 2)
        return quantized.view(B, T, D).transpose(1, 2), codes_t, commit


# ----------------------------------------------------------------------------- losses and metrics

def mel_filterbank(n_fft: int, n_mels: int, sr: int = SAMPLE_RATE, fmin: float = 0.0,
                   fmax: float | None = None) -> torch.Tensor:
    """Triangular mel filters (HTK mel scale), (n_mels, n_fft//2 + 1)."""
    fmax = fmax or sr / 2
    mel = lambda f: 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)      # noqa: E731
    hz = lambda m: 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)     # noqa: E731
    edges = hz(np.linspace(mel(fmin), mel(fmax), n_mels + 2))           # (n_mels + 2,)
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fb = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return torch.from_numpy(fb.astype(np.float32))


# (n_fft, n_mels) of the multi-resolution losses and the mel distance metric; hop = n_fft / 4
RESOLUTIONS = ((512, 64), (1024, 80), (2048, 128))
_MEL_CACHE: dict = {}


def _spectra(x: torch.Tensor, n_fft: int, n_mels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude STFT (B, n_fft//2+1, T) and mel magnitude (B, n_mels, T) of x (B, L)."""
    key = (n_fft, n_mels, x.device)
    if key not in _MEL_CACHE:
        _MEL_CACHE[key] = (torch.hann_window(n_fft, device=x.device), mel_filterbank(n_fft, n_mels).to(x.device))
    window, fb = _MEL_CACHE[key]
    mag = torch.stft(x.float(), n_fft, n_fft // 4, window=window, return_complex=True).abs()
    return mag, fb @ mag


def spectral_losses(est: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-resolution (log-mel L1, spectral convergence), each averaged over RESOLUTIONS; est, ref (B, L)."""
    mel_l1 = sc = est.new_zeros(())
    for n_fft, n_mels in RESOLUTIONS:
        m_est, mel_est = _spectra(est, n_fft, n_mels)
        m_ref, mel_ref = _spectra(ref, n_fft, n_mels)
        mel_l1 = mel_l1 + (torch.log(mel_est + 1e-5) - torch.log(mel_ref + 1e-5)).abs().mean()
        sc = sc + torch.linalg.norm(m_ref - m_est) / (torch.linalg.norm(m_ref) + 1e-7)
    return mel_l1 / len(RESOLUTIONS), sc / len(RESOLUTIONS)


@torch.no_grad()
def mel_distance(est: torch.Tensor, ref: torch.Tensor) -> float:
    """Multi-resolution mel distance: mean |log10 mel(est) - log10 mel(ref)| over RESOLUTIONS (lower is better)."""
    total = 0.0
    for n_fft, n_mels in RESOLUTIONS:
        a, b = _spectra(est, n_fft, n_mels)[1], _spectra(ref, n_fft, n_mels)[1]
        total += (torch.log10(a.clamp(min=1e-5)) - torch.log10(b.clamp(min=1e-5))).abs().mean().item()
    return total / len(RESOLUTIONS)


@torch.no_grad()
def si_snr(est: torch.Tensor, ref: torch.Tensor) -> float:
    """Scale-invariant SNR in dB of est against ref (both (L,) or (B, L), zero-meaned; mean over B)."""
    est = est - est.mean(-1, keepdim=True)
    ref = ref - ref.mean(-1, keepdim=True)
    target = (est * ref).sum(-1, keepdim=True) / (ref.pow(2).sum(-1, keepdim=True) + 1e-8) * ref
    noise = est - target
    return (10 * torch.log10(target.pow(2).sum(-1) / (noise.pow(2).sum(-1) + 1e-8) + 1e-8)).mean().item()


def perplexity(codes: torch.Tensor, bins: int) -> float:
    """Usage perplexity exp(H) of a flat tensor of codes: `bins` if all codes are equally used, 1 if one is."""
    return perplexity_of_counts(torch.bincount(codes.flatten(), minlength=bins))


def perplexity_of_counts(counts: torch.Tensor) -> float:
    """exp(entropy) of the distribution proportional to non-negative counts."""
    p = counts.double().clamp(min=0)
    p = p / p.sum()
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


# ----------------------------------------------------------------------------- the model

class RVQVAE(nn.Module):
    """Encoder -> residual VQ -> decoder; `encode`/`decode` for codes, `forward` for training."""

    def __init__(self, cfg: RVQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = ResidualVQ(cfg)
        self.decoder = Decoder(cfg)

    @torch.no_grad()
    def encode(self, wav: torch.Tensor, n_q: int = 8) -> torch.Tensor:
        """wav (B, samples) at 24 kHz -> codes (B, n_q, ceil(samples/320)) int64."""
        if wav.dim() != 2:
            raise ValueError(f"encode expects wav of shape [B, samples], got {list(wav.shape)}")
        if not 1 <= n_q <= self.cfg.n_q:
            raise ValueError(f"n_q must be in 1..{self.cfg.n_q}, got {n_q}")
        z = self.encoder(wav[:, None].to(self.quantizer.codebooks[0].embed.dtype))  # (B, D, T)
        return self.quantizer.encode(z, n_q)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, n_q, frames) -> wav (B, frames·320); trim to the input length yourself."""
        return self.decoder(self.quantizer.decode(codes))[:, 0]

    def forward(self, wav: torch.Tensor, n_q: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Training pass on wav (B, L) -> (reconstruction (B, L), total loss, dict of float loss terms)."""
        z = self.encoder(wav[:, None])                      # (B, D, T)
        zq, _, commit = self.quantizer(z, n_q or self.cfg.n_q)
        rec = self.decoder(zq)[:, 0, : wav.shape[-1]]       # (B, L): drop the frame-rounding tail
        l1 = (rec - wav).abs().mean()
        # -SNR in dB / 10 per clip. Floors: 1e-3·energy caps it at 30 dB; a mean-square floor of
        # 1e-5 (-50 dBFS) keeps silent crops (energy 0: log of 0 -> NaN) finite and harmless
        energy = wav.pow(2).sum(-1)
        floor = 1e-5 * wav.shape[-1]
        snr = -torch.log10((energy + floor) / ((rec - wav).pow(2).sum(-1) + 1e-3 * energy + floor)).mean()
        mel, sc = spectral_losses(rec, wav)
        loss = l1 + self.cfg.snr_weight * snr + mel + sc + self.cfg.commitment * commit
        terms = {"l1": l1.item(), "snr_db": -10 * snr.item(), "mel": mel.item(), "sc": sc.item(), "commit": commit.item()}
        return rec, loss, terms


# ----------------------------------------------------------------------------- loading

# EnCodec's state-dict names -> ours. Its layers sit in one Sequential per side with the same
# order as ours; its convs nest two wrappers deep (`.conv.conv.`), residual branches are
# `block.1`/`block.3` (the ELUs are `block.0`/`block.2`), and codebooks live in `quantizer.vq.layers`.
_ENCODEC_RENAMES = [
    (r"^(encoder|decoder)\.model\.", r"\1.layers."),
    (r"\.block\.1\.conv\.conv\.", ".conv1."),
    (r"\.block\.3\.conv\.conv\.", ".conv2."),
    (r"\.shortcut\.conv\.conv\.", ".skip."),
    (r"\.(conv\.conv|convtr\.convtr)\.", "."),
    (r"\.parametrizations\.weight\.original0$", ".weight_g"),   # torch's newer weight_norm layout
    (r"\.parametrizations\.weight\.original1$", ".weight_v"),
    (r"^quantizer\.vq\.layers\.(\d+)\._codebook\.embed_avg$", r"quantizer.codebooks.\1.embed_sum"),
    (r"^quantizer\.vq\.layers\.(\d+)\._codebook\.", r"quantizer.codebooks.\1."),
]


def from_encodec_state_dict(sd: dict) -> dict:
    """Rename an EnCodec 24 kHz state dict (as in `encodec_24khz-*.th`) to this module's key names."""
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in _ENCODEC_RENAMES:
            new = re.sub(pattern, repl, new)
        out[new] = value
    return out


def load_state(model: RVQVAE, sd: dict, source: str = "state dict") -> RVQVAE:
    """Load sd into model, raising KeyError/ValueError that names the first missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing:
        raise KeyError(f"{source}: missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise KeyError(f"{source}: unexpected key {unexpected[0]!r}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{source}: key {k!r} has shape {list(sd[k].shape)}, expected {list(v.shape)}")
    model.load_state_dict(sd)
    return model


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> RVQVAE:
    """A ready (eval-mode) model from our checkpoint ({"config", "model", ...}) or an EnCodec 24 kHz state dict."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:  # a missing or unreadable file: the caller names it
        raise
    except Exception as e:  # a text file, a truncated or foreign pickle: whatever torch.load raised for it
        raise ValueError(f"{path}: not a checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a checkpoint (got {type(obj).__name__})")
    if "config" in obj and "model" in obj:
        cfg = RVQConfig(**{**obj["config"], "ratios": tuple(obj["config"]["ratios"])})
        model = load_state(RVQVAE(cfg), obj["model"], str(path))
    elif any(k.startswith("encoder.model.") for k in obj):
        sd = from_encodec_state_dict(obj)
        n_q = len({k.split(".")[2] for k in sd if k.startswith("quantizer.codebooks.")})
        model = load_state(RVQVAE(dataclasses.replace(PRESETS["encodec24k"], n_q=n_q)), sd, str(path))
    else:
        raise ValueError(f"{path}: neither an rvq.py checkpoint nor an EnCodec state dict "
                         f"(first key {next(iter(obj), None)!r})")
    return model.eval()


def n_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- training

@dataclass
class TrainConfig:
    """Training run settings; every field is a command-line flag of the same name."""
    preset: str = "small"
    steps: int = 1800                # optimiser steps (the README recipe: ~1 h on one CPU thread)
    batch_size: int = 8              # crops per step
    crop_seconds: float = 1.0        # crop length
    lr: float = 1e-3                 # Adam peak learning rate
    warmup: int = 100                # linear warmup steps, then cosine decay to 10 %
    grad_clip: float = 1.0
    init_batches: int = 4            # batches whose latents seed the k-means initialisation
    ckpt_every: int = 100            # steps between checkpoints
    seed: int = 0
    device: str = "cpu"
    threads: int = 0                 # torch threads on CPU (0 = torch's default)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup then cosine decay from tc.lr to tc.lr/10 at tc.steps."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def random_crops(waves: list, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """n crops of `length` samples from random tracks at random offsets -> (n, length) float32."""
    out = torch.zeros(n, length)
    for i in range(n):
        w = waves[int(torch.randint(len(waves), (1,), generator=gen))]
        start = int(torch.randint(max(1, len(w) - length + 1), (1,), generator=gen))
        piece = torch.from_numpy(np.asarray(w[start: start + length], dtype=np.float32))
        out[i, : len(piece)] = piece                        # tracks shorter than a crop are zero-padded
    return out


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """torch.save to a temp file next to path, then rename: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no temp file stays, the previous checkpoint is untouched
        tmp.unlink(missing_ok=True)
        raise


def train(waves: list, out: str | os.PathLike, tc: TrainConfig, resume: bool = False,
          cfg: RVQConfig | None = None, progress: bool = True) -> RVQVAE:
    """Train an RVQ-VAE on in-memory waveforms (list of 1-D float arrays at 24 kHz), checkpointing to `out`.

    One process (CPU or one GPU). The quantiser itself is DDP-safe (see Codebook.update_), so a
    torchrun loop can reuse RVQVAE.forward unchanged; this entry point just does not launch one.
    """
    device = torch.device(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    ck = torch.load(out, map_location=device, weights_only=True) if resume and Path(out).exists() else None
    if ck is not None:                                      # the architecture is the checkpoint's, whatever --preset says
        cfg = RVQConfig(**{**ck["config"], "ratios": tuple(ck["config"]["ratios"])})
    cfg = cfg or PRESETS[tc.preset]
    torch.manual_seed(tc.seed)
    model = RVQVAE(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=(0.8, 0.99))
    gen = torch.Generator().manual_seed(tc.seed)            # crop positions: its own stream, saved for resume
    start = 0
    if ck is not None:
        load_state(model, ck["model"], str(out))
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["rng"]["crops"])
        torch.set_rng_state(ck["rng"]["torch"])
        if device.type == "cuda" and "cuda" in ck["rng"]:
            torch.cuda.set_rng_state(ck["rng"]["cuda"], device)
        start = ck["step"]
        print(f"resumed from {out} at step {start}", file=sys.stderr)
    print(f"rvq config: {asdict(cfg)}\ntrain config: {asdict(tc)}\nparameters: {n_params(model) / 1e6:.2f}M",
          file=sys.stderr)
    length = int(tc.crop_seconds * cfg.sample_rate)
    model.train()
    if not bool(model.quantizer.codebooks[0].inited):
        # k-means needs more vectors than codes: seed it from several batches' latents at once
        with torch.no_grad():
            z = torch.cat([model.encoder(random_crops(waves, tc.batch_size, length, gen).to(device)[:, None])
                           for _ in range(tc.init_batches)])
        model.quantizer.init_(z, count_scale=1 / tc.init_batches)

    def checkpoint(step: int) -> None:
        """Everything an exact resume needs: weights, codebooks, optimiser, step, RNG streams."""
        rng = {"crops": gen.get_state(), "torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        save_atomic({"config": asdict(cfg), "train": asdict(tc), "model": model.state_dict(),
                     "optimizer": opt.state_dict(), "step": step, "rng": rng}, out)

    bar = None
    if progress:
        from tqdm import tqdm  # lazy: tqdm is a CLI nicety, not a model dependency
        bar = tqdm(total=tc.steps, initial=start, desc="rvq", file=sys.stderr, mininterval=5)
    for step in range(start, tc.steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        wav = random_crops(waves, tc.batch_size, length, gen).to(device)
        # quantiser dropout: the same draw on every rank because every rank consumes `gen` alike
        n_q = cfg.n_q
        if cfg.quantizer_dropout and float(torch.rand((), generator=gen)) < cfg.quantizer_dropout:
            n_q = int(torch.randint(1, cfg.n_q + 1, (), generator=gen))
        _, loss, terms = model(wav, n_q)
        if not torch.isfinite(loss):
            # fail loudly: a NaN would otherwise poison the weights and every later checkpoint
            raise FloatingPointError(f"step {step}: loss is {loss.item()} ({terms}); last good checkpoint: {out}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        ms = (time.perf_counter() - t0) * 1e3
        last = step + 1 == tc.steps
        opt.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", mel=f"{terms['mel']:.3f}", refresh=False)
        if step % 50 == 0 or last:
            # usage perplexity of each codebook from its EMA counts: a collapse shows up here first
            ppl = " ".join(f"{perplexity_of_counts(cb.cluster_size):.0f}" for cb in model.quantizer.codebooks)
            print(f"step {step} loss {loss.item():.4f} l1 {terms['l1']:.4f} snr {terms['snr_db']:.2f}dB mel {terms['mel']:.4f} "
                  f"sc {terms['sc']:.4f} commit {terms['commit']:.4f} n_q {n_q} gnorm {float(gnorm):.2f} "
                  f"lr {lr_at(step, tc):.2e} {ms:.0f}ms ppl {ppl}", file=sys.stderr, flush=True)
        if (step + 1) % tc.ckpt_every == 0 or last:
            checkpoint(step + 1)
    if bar is not None:
        bar.close()
    if start >= tc.steps and not Path(out).exists():
        checkpoint(start)
    return model.eval()


@torch.no_grad()
def evaluate(model: RVQVAE, waves: list, n_qs=(1, 2, 4, 8), chunk_seconds: float = 10.0) -> dict:
    """Per n_q: mean SI-SNR (dB) and mel distance over tracks; per codebook: usage perplexity over all frames.

    Each track runs in whole chunks of chunk_seconds (a final partial chunk is left out); a track shorter
    than one chunk runs whole (in whole frames). Tracks too short for the metrics (under 2048 samples)
    are left out and listed by index in "skipped"."""
    model.eval()
    hop = model.cfg.hop
    chunk = int(chunk_seconds * model.cfg.sample_rate) // hop * hop
    shortest = -(-RESOLUTIONS[-1][0] // hop) * hop  # the widest STFT of the mel distance needs this much
    res = {n: {"si_snr": [], "mel": []} for n in n_qs}
    all_codes, skipped, samples = [], [], 0
    for i, w in enumerate(waves):
        # chunks of whole frames, batched, so long tracks fit in memory; the tail is dropped
        n, size = len(w) // chunk, chunk
        if n == 0:
            n, size = 1, len(w) // hop * hop
            if size < shortest:
                skipped.append(i)
                continue
        x = torch.from_numpy(np.asarray(w[: n * size], dtype=np.float32)).view(n, size)
        samples += x.numel()
        codes = torch.cat([model.encode(x[j: j + 8], n_q=max(n_qs)) for j in range(0, n, 8)])
        all_codes.append(codes.transpose(0, 1).reshape(codes.shape[1], -1))  # (n_q, chunks x frames)
        for k in n_qs:
            rec = torch.cat([model.decode(codes[j: j + 8, :k]) for j in range(0, n, 8)])
            res[k]["si_snr"].append(si_snr(rec.flatten(), x.flatten()))
            res[k]["mel"].append(mel_distance(rec, x))
    if not all_codes:
        raise ValueError(f"no track long enough to evaluate (each needs {shortest} samples)")
    codes = torch.cat(all_codes, dim=1)                     # (n_q, all frames)
    return {
        "tracks": len(all_codes), "seconds": samples / model.cfg.sample_rate, "skipped": skipped,
        "n_q": {k: {m: float(np.mean(v)) for m, v in d.items()} for k, d in res.items()},
        "perplexity": [perplexity(codes[k], model.cfg.bins) for k in range(codes.shape[0])],
    }


# ----------------------------------------------------------------------------- command line

def _read_tracks(paths: list, max_seconds: float | None = None) -> tuple[list, list, int]:
    """Load every audio file under paths at 24 kHz mono -> (waves, names, failures); bad files named once."""
    import audio  # the project's reader; only the CLI needs it
    waves, names, failed, files = [], [], 0, []
    passed = []  # files a folder walk passes over (.m4a, ...): named and counted as failures
    for p in paths:
        try:
            files += audio.find_audio([p], recursive=True, skipped=passed)
        except audio.AudioError as e:                      # a missing path: name it, keep the rest
            print(f"skipping {e}", file=sys.stderr)
            failed += 1
    for path, reason in passed:
        print(f"skipping {path}: {reason}", file=sys.stderr)
        failed += 1
    for p in files:
        try:
            w = audio.load(p, sr=SAMPLE_RATE)
        except audio.AudioError as e:
            print(f"skipping {e}", file=sys.stderr)
            failed += 1
            continue
        if max_seconds:
            # centre excerpt: skips intros/fade-outs and bounds evaluation time
            n = int(max_seconds * SAMPLE_RATE)
            s = max(0, (len(w) - n) // 2)
            w = w[s: s + n]
        waves.append(np.ascontiguousarray(w, dtype=np.float32))
        names.append(str(p))
    return waves, names, failed


def main(argv: list | None = None) -> int:
    """Command line: train (`--data DIR --out X.pt`) or evaluate (`--eval --ckpt X.pt --data DIR`)."""
    tc0 = TrainConfig()
    ap = argparse.ArgumentParser(
        description="Train or evaluate the RVQ-VAE acoustic teacher (24 kHz, 75 Hz codes).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python rvq.py --data music/ --out teacher.pt --preset small --steps 1800 --threads 1\n"
               "  python rvq.py --data music/ --out teacher.pt --resume            # continue a run\n"
               "  python rvq.py --eval --ckpt teacher.pt --data heldout/           # quality table\n"
               "Flags may be spelled with hyphens too (--batch-size); --data takes paths space- or comma-separated.\n")
    ap.add_argument("--data", nargs="+", required=True, help="audio files or folders (searched recursively)")
    ap.add_argument("--out", help="training: checkpoint to write (atomically, every --ckpt_every steps)")
    ap.add_argument("--resume", action="store_true", help="continue from --out if it exists (exact: model, optimiser, RNG)")
    ap.add_argument("--preset", default=tc0.preset, choices=sorted(PRESETS), help="architecture (default %(default)s)")
    ap.add_argument("--steps", type=int, default=tc0.steps, help="optimiser steps (default %(default)s)")
    ap.add_argument("--batch_size", "--batch-size", type=int, default=tc0.batch_size, help="crops per step (default %(default)s)")
    ap.add_argument("--crop_seconds", "--crop-seconds", type=float, default=tc0.crop_seconds, help="crop length in seconds (default %(default)s)")
    ap.add_argument("--lr", type=float, default=tc0.lr, help="peak Adam learning rate (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=tc0.warmup, help="linear warmup steps (default %(default)s)")
    ap.add_argument("--grad_clip", "--grad-clip", type=float, default=tc0.grad_clip, help="gradient-norm clip (default %(default)s)")
    ap.add_argument("--init_batches", "--init-batches", type=int, default=tc0.init_batches, help="batches seeding k-means (default %(default)s)")
    ap.add_argument("--ckpt_every", "--ckpt-every", type=int, default=tc0.ckpt_every, help="steps between checkpoints (default %(default)s)")
    ap.add_argument("--seed", type=int, default=tc0.seed, help="random seed (default %(default)s)")
    ap.add_argument("--device", default=tc0.device, help="torch device, e.g. cpu or cuda (default %(default)s)")
    ap.add_argument("--threads", type=int, default=tc0.threads, help="CPU threads, 0 = torch default (default %(default)s)")
    ap.add_argument("--eval", action="store_true", help="evaluate --ckpt on --data instead of training")
    ap.add_argument("--ckpt", help="--eval: our checkpoint or an EnCodec 24 kHz state dict")
    ap.add_argument("--eval_seconds", "--eval-seconds", type=float, default=60.0, help="--eval: centre excerpt per track in seconds (default %(default)s)")
    args = ap.parse_args(argv)
    args.data = [x.strip() for d in args.data for x in d.split(",") if x.strip()]  # "a,b c" -> a, b, c
    if args.eval and not args.ckpt:
        ap.error("--eval needs --ckpt")
    if not args.eval and not args.out:
        ap.error("training needs --out")
    import audio  # the command's checks and reader (the module itself needs only torch)
    try:
        audio.pick_device(args.device)
    except ValueError as e:
        print(f"rvq.py: {e}", file=sys.stderr)
        return 2
    if args.eval and not Path(args.ckpt).is_file():
        print(f"rvq.py: --ckpt {args.ckpt}: no such file", file=sys.stderr)
        return 2
    problem = None if args.eval else audio.output_problem(args.out)
    if problem:  # before any training: a run that cannot save is refused now, not at its first checkpoint
        print(f"rvq.py: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    except KeyboardInterrupt:  # checkpoints are written atomically: what exists is whole
        done = "" if args.eval or not Path(args.out).is_file() else f"; {args.out} holds the last checkpoint (--resume)"
        print(f"rvq.py: interrupted (Ctrl-C){done}", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk while saving
        print(f"rvq.py: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


def _run(args) -> int:
    """The command, once main() has checked its flags: evaluate, or train."""
    if args.eval:
        try:
            model = load(args.ckpt)
        except (ValueError, KeyError) as e:
            print(f"rvq.py: --ckpt {e}", file=sys.stderr)
            return 1
        waves, names, failed = _read_tracks(args.data, args.eval_seconds)
        if not waves:
            print("no readable audio under --data", file=sys.stderr)
            return 1
        print(f"evaluating {args.ckpt} on {len(waves)} tracks: {', '.join(Path(n).name for n in names)}", file=sys.stderr)
        try:
            r = evaluate(model, waves, n_qs=[k for k in (1, 2, 4, 8) if k <= model.cfg.n_q])
        except ValueError as e:
            print(f"rvq.py --eval: {e}", file=sys.stderr)
            return 1
        for i in r["skipped"]:  # named, and the exit code says that not every track was measured
            print(f"skipping {names[i]}: {len(waves[i]) / SAMPLE_RATE:.2f} s, too short to evaluate", file=sys.stderr)
        failed += len(r["skipped"])
        print(f"held-out: {r['tracks']} tracks, {r['seconds']:.0f} s")
        print("| codebooks | SI-SNR (dB) ↑ | mel distance ↓ |\n| --- | --- | --- |")
        for k, m in r["n_q"].items():
            print(f"| {k} | {m['si_snr']:.2f} | {m['mel']:.3f} |")
        print("perplexity per codebook (of %d): %s" % (model.cfg.bins, ", ".join(f"{p:.0f}" for p in r["perplexity"])))
        return 1 if failed else 0

    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    waves, names, failed = _read_tracks(args.data)
    if not waves:
        print("no readable audio under --data", file=sys.stderr)
        return 1
    print(f"training on {len(waves)} tracks, {sum(map(len, waves)) / SAMPLE_RATE / 3600:.2f} h", file=sys.stderr)
    train(waves, args.out, tc, resume=args.resume)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
