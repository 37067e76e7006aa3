"""Teachers: the frame labels MERT learns to predict from masked audio, computed on the fly at 75 Hz.

    teachers = build_teachers("acoustic,cqt", acoustic_ckpt="encodec_24khz-d7cc33bc.th", device="cuda")
    targets = teachers(wav, n_frames=T)    # {"codes": [B, 8, T] int64, "cqt": [B, T, 336] float32}
    python teachers.py labels song.flac --start 12.8     # the labels a training crop at 12.8 s gets

Each teacher is a frozen nn.Module on the training device: AcousticTeacher (RVQ-VAE / EnCodec codes,
rvq.py), MusicalTeacher (CQT magnitude, cqt.py), MFCCKMeansTeacher (HuBERT iteration-1 style) and
RandomProjectionTeacher (BEST-RQ, a stand-in for the acoustic teacher that needs no checkpoint).

Decisions:
- Labels are cut to the model's frame count T = (L - 400) // 320 + 1 (model_frames); each teacher's own framing
  puts every label within half a frame of its model frame (diagram below, at `Teacher`).
- The acoustic teacher labels a crop in context: it also encodes audio before (and, by its convs'
  reach, after) the crop and drops those frames, so a crop's codes are the whole file's codes, as
  MERT's precomputed per-file codes are (`context=` in Teacher.forward; docs/recipe.md).
- Labels are computed in float32 under no_grad with autocast off, so bf16 and fp32 steps get the
  same labels; teachers never train, and anything random is drawn from the teacher's own seeded
  generator into buffers, so every rank and a restored checkpoint hold the same values.
- At scale the codes come precomputed instead (MERT's offline codes): FileCoder encodes whole files, in
  chunks with the same context, for `audio.py prepare --codes`; Teachers.forward(codes=...) takes them.
- `audio` and tqdm are imported only by the `fit-mfcc` and `labels` commands.

The MFCC and random-projection details, their departures from HuBERT and BEST-RQ, and the
references: docs/teachers.md.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import cqt
import rvq

SAMPLE_RATE = 24_000
HOP = 320                                   # samples per label frame: 75 Hz at 24 kHz
MODEL_FIELD = 400                           # samples one MERT frame sees (its conv stack's receptive field)
ACOUSTIC_CONTEXT_SECONDS = 10.0             # audio before a crop an LSTM acoustic teacher encodes first (docs/recipe.md)
# The run's labelling defaults, one copy: `teachers.py labels` and train.py's TrainConfig both take them.
LABEL_DEFAULTS = {"teachers": "rvq+cqt", "n_q": 8, "seed": 1337}
TEACHER_NAMES = ("acoustic", "cqt", "mfcc", "randproj")
ALIASES = {"rvq": "acoustic", "encodec": "acoustic", "musical": "cqt", "random": "randproj",
           "bestrq": "randproj", "best-rq": "randproj"}

__all__ = ["SAMPLE_RATE", "HOP", "LABEL_DEFAULTS", "model_frames", "Teacher", "AcousticTeacher", "MusicalTeacher",
           "MFCC", "MFCCKMeansTeacher", "RandomProjectionTeacher", "Teachers", "build_teachers", "fit_mfcc_kmeans",
           "kmeans_pp", "TEACHER_NAMES", "teacher_names", "ALIASES", "FileCoder", "file_sha256", "FLAG_NAMES",
           "FlagError", "names_from_flag", "check_flags", "from_flags"]


# ----------------------------------------------------------------------------- common machinery

def model_frames(samples: int) -> int:
    """MERT's frame count for a crop of `samples`: (L - 400) // 320 + 1 (374 for 5 s); labels are cut to it."""
    return (samples - MODEL_FIELD) // HOP + 1


class Teacher(nn.Module):
    """Base class: a frozen label producer; subclasses set `key` and implement `_labels(wav) -> frames`.

    Framing: the model's conv stack gives T = floor((L - 400) / 320) + 1 frames (374 for 5 s); the
    teachers frame the audio their own way and are cut to the first T frames:

        sample      0        320       640                       L
        model       [0, 400)  [320, 720)  ...                        T = (L - 400) // 320 + 1
        CQT, MFCC,  centred on 0, 320, 640, ... (zero padding)       L // 320 + 1     (376 for 5 s)
        rand-proj
        RVQ codes   causal SEANet encoder                            ceil(L / 320)    (375 for 5 s)
    """

    key: str = "codes"          # the targets-dict key it fills: "codes" or "cqt"
    frame_dim: int = -1         # axis of the frames in `_labels`' output
    n_codebooks: int = 0        # code streams produced (0 for continuous targets)
    codebook_size: int = 0      # codes per stream

    def train(self, mode: bool = True):
        """Teachers stay in eval mode whatever the caller asks (they never train)."""
        return super().train(False)

    def _labels(self, wav: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def context(self, seconds: float = 0.0) -> tuple[int, int]:
        """(left, right) samples of audio around a crop that this teacher's labels of the crop depend on
        (0, 0 for the framewise teachers, whose labels are, as MERT's CQT, those of the crop alone)."""
        return 0, 0

    def _labels_in_context(self, audio: torch.Tensor, offset: int, left, right, length: int) -> torch.Tensor:
        """Labels of the crop audio[:, offset:offset + length] given the file around it; a framewise teacher
        needs only the crop (a teacher whose context() is not (0, 0) overrides this)."""
        return self._labels(audio[:, offset:offset + length])

    def forward(self, wav: torch.Tensor, n_frames: int, context=None) -> dict:
        """wav [B, L] float at 24 kHz -> {key: labels cut to n_frames frames}.

        context: None, or an audio.CropContext (audio, offset, left, right) holding each crop with the file
        around it; each teacher labels the crop from it (see _labels_in_context).
        """
        if wav.dim() != 2:
            raise ValueError(f"{type(self).__name__} expects wav of shape [B, samples], got {list(wav.shape)}")
        with torch.no_grad(), torch.autocast(wav.device.type, enabled=False):
            if context is not None:
                audio, offset, left, right = context
                y = self._labels_in_context(audio.detach().float(), int(offset), left, right, wav.shape[-1])
            else:
                y = self._labels(wav.detach().float())
        have = y.shape[self.frame_dim]
        if have < n_frames:
            raise ValueError(f"{type(self).__name__} gives {have} frames for {wav.shape[-1]} samples, "
                             f"fewer than the {n_frames} asked for")
        return {self.key: y.narrow(self.frame_dim, 0, n_frames)}

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()


def _frames(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """Zero-pad x [B, L] by n_fft // 2 each side -> overlapping frames [B, L // hop + 1, n_fft] centred on t·hop."""
    pad = n_fft // 2
    return F.pad(x, (pad, pad)).unfold(-1, n_fft, hop)      # (B, (L + 2·pad - n_fft) // hop + 1, n_fft)


def _power_spectrum(frames: torch.Tensor, win_length: int) -> torch.Tensor:
    """|rfft(hann(win_length) · frame)|² / (window sum)² of frames [B, T, n_fft] -> [B, T, n_fft//2 + 1].

    Dividing by the window sum makes a full-scale sine's peak 0.25 whatever the window, so the log
    floors below mean the same level in every teacher.
    """
    n_fft = frames.shape[-1]
    win = torch.hann_window(win_length, periodic=True, device=frames.device, dtype=frames.dtype)
    left = (n_fft - win_length) // 2                        # a shorter window sits in the frame's centre (as torch.stft)
    win = F.pad(win, (left, n_fft - win_length - left))    # (n_fft,)
    spec = torch.fft.rfft(frames * win, dim=-1)
    return spec.abs().square() / win.sum().square()


def _deltas(x: torch.Tensor, n: int = 2) -> torch.Tensor:
    """HTK/Kaldi deltas along frames of x [B, T, D]: sum_k k·(x[t+k] - x[t-k]) / (2·sum_k k²), edges repeated."""
    T = x.shape[1]
    xp = torch.cat([x[:, :1].expand(-1, n, -1), x, x[:, -1:].expand(-1, n, -1)], 1)   # (B, T + 2n, D)
    out = sum(k * (xp[:, n + k: n + k + T] - xp[:, n - k: n - k + T]) for k in range(1, n + 1))
    return out / (2 * sum(k * k for k in range(1, n + 1)))


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (Euclidean) of each row of x [N, D] -> (index [N] int64, squared distance [N])."""
    # ‖c‖² - 2 x·c in one addmm; ‖x‖² is the same for every centroid, so it is added after the min
    d = torch.addmm(centroids.pow(2).sum(1), x, centroids.t(), alpha=-2)   # (N, k)
    best, idx = d.min(1)
    return idx, (best + x.pow(2).sum(1)).clamp(min=0)


# ----------------------------------------------------------------------------- acoustic teacher

class AcousticTeacher(Teacher):
    """RVQ-VAE codes from an rvq.py checkpoint (ours or EnCodec 24 kHz) -> {"codes": [B, n_q, T]}."""

    key, frame_dim = "codes", -1

    def __init__(self, ckpt_or_model: str | os.PathLike | rvq.RVQVAE, n_q: int = 8):
        super().__init__()
        model = ckpt_or_model if isinstance(ckpt_or_model, nn.Module) else rvq.load(ckpt_or_model)
        if not 1 <= n_q <= model.cfg.n_q:
            raise ValueError(f"n_q must be in 1..{model.cfg.n_q} for this RVQ model, got {n_q}")
        self.model, self.n_q = model, n_q
        self.n_codebooks, self.codebook_size = n_q, model.cfg.bins
        self._freeze()

    def extra_repr(self) -> str:
        return f"n_q={self.n_q}, bins={self.codebook_size}"

    def _labels(self, wav: torch.Tensor) -> torch.Tensor:
        return self.model.encode(wav, n_q=self.n_q)         # (B, n_q, ceil(L / 320)) int64

    def context(self, seconds: float = 0.0) -> tuple[int, int]:
        """Audio around a crop needed for its codes to equal the whole file's codes at every frame.

        The convolutions reach a fixed span (rvq's Encoder.reach(), rounded up to frames): exact. The LSTM of an
        EnCodec-like encoder carries state from the file's start; `seconds` of left context (rounded up
        to frames) give it time to converge, which is exact in practice but not by construction
        (docs/recipe.md measures it). Without an LSTM `seconds` is not needed and not used."""
        left, right = self.model.encoder.reach()
        if self.model.cfg.lstm:
            left = max(left, int(math.ceil(seconds * SAMPLE_RATE)))
        return -(-left // HOP) * HOP, -(-right // HOP) * HOP

    def _labels_in_context(self, audio, offset, left, right, length):
        """Codes of audio[b, offset:offset + length] encoded with left[b] / right[b] samples around it, the
        context frames dropped: clips with the same context run as one batch (most have it all)."""
        left, right = (torch.as_tensor(v).reshape(-1).tolist() for v in (left, right))
        n = -(-length // HOP)
        out = torch.empty(audio.shape[0], self.n_q, n, dtype=torch.long, device=audio.device)
        for lr in sorted(set(zip(left, right))):
            if lr[0] % HOP:
                raise ValueError(f"left context {lr[0]} is not a multiple of {HOP} samples: codes would not "
                                 f"sit on the file's frame grid")
            rows = [b for b, v in enumerate(zip(left, right)) if v == lr]
            x = audio[rows, offset - lr[0]: offset + length + lr[1]]
            out[rows] = self.model.encode(x, n_q=self.n_q)[:, :, lr[0] // HOP: lr[0] // HOP + n]
        return out


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex): the fingerprint of a teacher checkpoint that shards' codes record."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FileCoder:
    """A file's whole acoustic codes, for `audio.py prepare --codes` (MERT computed its codes offline, per file).

    coder = FileCoder("encodec_24khz-d7cc33bc.th", n_q=8, device="cuda")
    codes = coder(wav)        # float32 [n] at 24 kHz -> int16 [ceil(n / 320), n_q], frame-major
    coder.info                # what the shard index records: the teacher's file, SHA-256 and code shape

    A file is encoded in chunks of `chunk_seconds` (memory stays bounded whatever its length), each with the
    audio before and after it that AcousticTeacher.context gives (the convolutions' exact reach; for an LSTM
    teacher at least `context_seconds` before), the context frames dropped: the same construction as a training
    crop labelled on the fly, so the codes of a crop read from the shards equal the on-the-fly codes, and a
    file shorter than one chunk is encoded whole (its codes are the whole file's by construction).
    """

    def __init__(self, ckpt: str | os.PathLike, n_q: int = LABEL_DEFAULTS["n_q"], device: str = "auto",
                 chunk_seconds: float = 60.0, context_seconds: float = ACOUSTIC_CONTEXT_SECONDS):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.teacher = AcousticTeacher(ckpt, n_q=n_q).to(device)
        self.device = torch.device(device)
        self.chunk = max(1, int(round(chunk_seconds * SAMPLE_RATE / HOP)))      # frames per chunk
        self.left, self.right = self.teacher.context(context_seconds)           # samples, multiples of HOP
        self.info = {"teacher": {"file": Path(ckpt).name, "sha256": file_sha256(ckpt), "kind": "rvq.py/EnCodec"},
                     "n_q": n_q, "codebook_size": self.teacher.codebook_size, "hop": HOP,
                     "frame_rate": SAMPLE_RATE / HOP, "dtype": "int16", "layout": "frames x n_q",
                     "context_seconds": self.left / SAMPLE_RATE, "chunk_seconds": self.chunk * HOP / SAMPLE_RATE}

    @torch.no_grad()
    def __call__(self, wav) -> np.ndarray:
        x = torch.as_tensor(np.asarray(wav, dtype=np.float32)).to(self.device)
        n, frames = len(x), -(-len(x) // HOP)
        out = np.empty((frames, self.teacher.n_q), np.int16)
        for f0 in range(0, frames, self.chunk):
            f1 = min(frames, f0 + self.chunk)
            a, b = max(0, f0 * HOP - self.left), min(n, f1 * HOP + self.right)   # a: on the frame grid
            codes = self.teacher.model.encode(x[None, a:b], n_q=self.teacher.n_q)[0]  # (n_q, ceil((b - a) / 320))
            out[f0:f1] = codes[:, f0 - a // HOP: f1 - a // HOP].t().cpu().numpy()
        return out


# ----------------------------------------------------------------------------- musical teacher

class MusicalTeacher(Teacher):
    """CQT magnitude with MERT's parameters (336 bins, 48/octave from 32.7 Hz, hop 320) -> {"cqt": [B, T, 336]}."""

    key, frame_dim = "cqt", 1

    def __init__(self, log: bool = False):
        super().__init__()
        # log=True: log10(|CQT| + 1e-3) + 1.5 (about -1.5..2), not MERT's linear magnitude; linear MSE is ruled by
        # the few loud low bins, the log spreads the loss over all 336 bins (and so over pitch).
        self.log = bool(log)
        # nnAudio CQT1992v2 settings of the official MERT code; cqt.py reproduces its numbers
        self.cqt = cqt.CQT(sr=SAMPLE_RATE, hop_length=HOP, fmin=32.7, n_bins=336, bins_per_octave=48,
                           filter_scale=1, norm=1, window="hann", center=True, pad_mode="constant",
                           output="magnitude")
        self.n_bins = 336
        self._freeze()

    def _labels(self, wav: torch.Tensor) -> torch.Tensor:
        mag = self.cqt(wav).transpose(1, 2)                 # (B, 336, L // 320 + 1) -> (B, frames, 336)
        return torch.log10(mag + 1e-3) + 1.5 if self.log else mag


# ----------------------------------------------------------------------------- MFCC + k-means

_MFCC_FIELDS = ("n_mfcc", "n_mels", "n_fft", "win_length", "fmin", "fmax", "preemphasis")   # MFCC's arguments

class MFCC(nn.Module):
    """39-d MFCC + deltas + delta-deltas at 75 Hz (HuBERT iteration-1 features at 24 kHz): [B, L] -> [B, L // 320 + 1, 39]."""

    def __init__(self, n_mfcc: int = 13, n_mels: int = 40, n_fft: int = 1024, win_length: int = 640,
                 fmin: float = 20.0, fmax: float = SAMPLE_RATE / 2, preemphasis: float = 0.97):
        super().__init__()
        self.config = dict(n_mfcc=n_mfcc, n_mels=n_mels, n_fft=n_fft, win_length=win_length, fmin=float(fmin),
                           fmax=float(fmax), preemphasis=float(preemphasis))
        self.n_mfcc, self.n_fft, self.win_length, self.preemphasis = n_mfcc, n_fft, win_length, preemphasis
        self.register_buffer("mel", rvq.mel_filterbank(n_fft, n_mels, SAMPLE_RATE, fmin, fmax), persistent=False)
        # orthonormal DCT-II, rows = coefficients 0..n_mfcc-1: c_i = sqrt(2/M)·s_i·sum_m x_m cos(pi·i·(m + 1/2)/M)
        m = torch.arange(n_mels, dtype=torch.float64)
        i = torch.arange(n_mfcc, dtype=torch.float64)[:, None]
        dct = torch.cos(math.pi * i * (m + 0.5) / n_mels) * math.sqrt(2.0 / n_mels)
        dct[0] /= math.sqrt(2.0)
        self.register_buffer("dct", dct.float(), persistent=False)        # (n_mfcc, n_mels)

    @property
    def dim(self) -> int:
        """Feature size: 3 · n_mfcc."""
        return 3 * self.n_mfcc

    def emphasis(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-emphasis x[n] - a·x[n-1] of x [B, L] over the whole signal (Kaldi does it per frame: one sample's difference)."""
        if not self.preemphasis:
            return x
        return torch.cat([x[:, :1], x[:, 1:] - self.preemphasis * x[:, :-1]], 1)

    def cepstra(self, frames: torch.Tensor) -> torch.Tensor:
        """Pre-emphasised frames [B, T, n_fft] -> the n_mfcc cepstra [B, T, n_mfcc] (no deltas)."""
        power = _power_spectrum(frames, self.win_length)                  # (B, T, n_fft//2 + 1)
        logmel = torch.log(power @ self.mel.t() + 1e-10)                  # (B, T, n_mels); floor -100 dB
        return logmel @ self.dct.t()                                      # (B, T, n_mfcc)

    @staticmethod
    def with_deltas(c: torch.Tensor) -> torch.Tensor:
        """Cepstra [B, T, n] -> [B, T, 3n]: static, delta, delta-delta (each delta over +-2 frames)."""
        d = _deltas(c)
        return torch.cat([c, d, _deltas(d)], -1)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, L] at 24 kHz -> [B, L // 320 + 1, 39]."""
        frames = _frames(self.emphasis(wav.float()), self.n_fft, HOP)     # (B, L // 320 + 1, n_fft)
        return self.with_deltas(self.cepstra(frames))

    def long(self, wav: torch.Tensor, chunk_frames: int = 4500) -> torch.Tensor:
        """One long wav [L] -> [L // 320 + 1, 39], equal to forward but a minute of frames at a time (bounded memory)."""
        pad = self.n_fft // 2
        wp = F.pad(self.emphasis(wav.float()[None]), (pad, pad))          # (1, L + n_fft)
        n_frames = len(wav) // HOP + 1
        static = []
        for f0 in range(0, n_frames, chunk_frames):
            # frame t covers padded samples [t·320, t·320 + n_fft)
            f1 = min(n_frames, f0 + chunk_frames)
            piece = wp[:, f0 * HOP: (f1 - 1) * HOP + self.n_fft]         # (1, samples feeding frames f0..f1-1)
            static.append(self.cepstra(piece.unfold(-1, self.n_fft, HOP)))
        # deltas over the whole file's cepstra, so chunk edges leave no trace
        return self.with_deltas(torch.cat(static, 1))[0]


class MFCCKMeansTeacher(Teacher):
    """k-means cluster of standardised 39-d MFCC frames (HuBERT iteration-1 style) -> {"codes": [B, 1, T]}.

    Build from a `fit-mfcc` checkpoint path or its loaded dict ({"config", "centroids", "mean", "std"}).
    """

    key, frame_dim = "codes", -1

    def __init__(self, ckpt: str | os.PathLike | dict):
        super().__init__()
        obj = ckpt if isinstance(ckpt, dict) else torch.load(ckpt, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("kind") != "mfcc-kmeans":
            raise ValueError(f"{ckpt if not isinstance(ckpt, dict) else 'dict'}: not an MFCC k-means checkpoint "
                             "(write one with: python teachers.py fit-mfcc --data DIR --out mfcc_km.pt)")
        self.config = dict(obj["config"])
        self.mfcc = MFCC(**{k: self.config[k] for k in _MFCC_FIELDS})
        centroids = obj["centroids"].float()
        if centroids.shape[1] != self.mfcc.dim:
            raise ValueError(f"centroids have {centroids.shape[1]} dims, the MFCC features {self.mfcc.dim}")
        self.register_buffer("centroids", centroids)                    # (k, 39) in standardised units
        self.register_buffer("mean", obj["mean"].float())               # (39,)
        self.register_buffer("std", obj["std"].float())                 # (39,)
        self.n_codebooks, self.codebook_size = 1, centroids.shape[0]
        self._freeze()

    def extra_repr(self) -> str:
        return f"k={self.codebook_size}"

    def _labels(self, wav: torch.Tensor) -> torch.Tensor:
        f = (self.mfcc(wav) - self.mean) / self.std                       # (B, T, 39)
        B, T, D = f.shape
        idx, _ = _nearest(f.reshape(B * T, D), self.centroids)           # (B·T,)
        return idx.view(B, 1, T)


def kmeans_pp(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0, init_rows: int = 100_000,
              chunk: int = 65_536, tol: float = 1e-4, log=None) -> tuple[torch.Tensor, float]:
    """k-means++ seeding then Lloyd's iterations on rows of x [N, D] -> (centroids [k, D], mean squared distance).

    Deterministic for a seed (its own CPU generator). Distances are computed `chunk` rows at a time,
    so memory stays O(chunk · k). Clusters left empty are re-seeded on the worst-fitted rows.
    """
    N, D = x.shape
    if N < k:
        raise ValueError(f"k-means needs at least k={k} rows, got {N}")
    g = torch.Generator().manual_seed(seed)
    # k-means++ on a random subset: sequential seeding costs k passes over it
    sub = x[torch.randperm(N, generator=g)[:max(init_rows, k)].to(x.device)]
    sq = sub.pow(2).sum(1)                                              # (n,)
    dist2 = lambda c: (sq - 2 * (sub @ c) + c.pow(2).sum()).clamp(min=0)  # noqa: E731  (n,) to one point
    centroids = torch.empty(k, D, dtype=x.dtype, device=x.device)
    centroids[0] = sub[int(torch.randint(len(sub), (1,), generator=g))]
    d2 = dist2(centroids[0])                                            # squared distance to the nearest seed
    for j in range(1, k):
        # D² sampling through the cumulative sum (multinomial caps the category count at 2^24)
        cum = torch.cumsum(d2.double(), 0)
        u = torch.rand(1, generator=g, dtype=torch.float64).to(cum.device) * cum[-1]
        i = int(torch.searchsorted(cum, u).clamp(max=len(sub) - 1))
        centroids[j] = sub[i]
        d2 = torch.minimum(d2, dist2(centroids[j]))

    prev = math.inf
    for it in range(iters):
        sums = torch.zeros_like(centroids)
        counts = torch.zeros(k, dtype=x.dtype, device=x.device)
        best = torch.empty(N, dtype=x.dtype, device=x.device)
        for s in range(0, N, chunk):
            idx, best[s: s + chunk] = _nearest(x[s: s + chunk], centroids)
            sums.index_add_(0, idx, x[s: s + chunk])
            counts += torch.bincount(idx, minlength=k).to(x.dtype)
        inertia = float(best.mean())
        empty = (counts == 0).nonzero().flatten()
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
        if len(empty):
            centroids[empty] = x[best.topk(len(empty)).indices]           # re-seed on the worst-fitted rows
        if log:
            log(f"k-means iteration {it + 1}/{iters}: mean squared distance {inertia:.4f}"
                + (f", {len(empty)} empty clusters re-seeded" if len(empty) else ""))
        if not len(empty) and prev - inertia <= tol * inertia:
            break
        prev = inertia
    return centroids, inertia


def fit_mfcc_kmeans(waves, k: int = 500, seed: int = 0, max_frames: int = 500_000, iters: int = 50,
                    device: str | torch.device = "cpu", log=None) -> dict:
    """Fit MFCC k-means on an iterable of 24 kHz mono waveforms (1-D arrays or tensors) -> checkpoint dict.

    Frames are sampled uniformly over everything iterated (each frame gets a random priority; the
    max_frames lowest are kept), so memory is bounded by 2·max_frames frames whatever the data size.
    """
    mfcc = MFCC().to(device)
    g = torch.Generator().manual_seed(seed + 1)     # frame priorities; seed itself seeds k-means
    keep_f = torch.empty(0, mfcc.dim, device=device)
    keep_p = torch.empty(0, device=device)
    n_seen = 0
    for w in waves:
        feats = mfcc.long(torch.as_tensor(np.asarray(w, dtype=np.float32)).to(device))   # (frames, 39)
        n_seen += len(feats)
        pri = torch.rand(len(feats), generator=g).to(device)
        keep_f, keep_p = torch.cat([keep_f, feats]), torch.cat([keep_p, pri])
        if len(keep_p) > 2 * max_frames:
            top = keep_p.topk(max_frames, largest=False).indices
            keep_f, keep_p = keep_f[top], keep_p[top]
    if len(keep_p) > max_frames:
        top = keep_p.topk(max_frames, largest=False).indices
        keep_f = keep_f[top]
    if len(keep_f) < k:
        raise ValueError(f"only {len(keep_f)} MFCC frames to cluster, fewer than k={k}; give more audio or a smaller --k")
    mean, std = keep_f.mean(0), keep_f.std(0).clamp(min=1e-5)
    z = (keep_f - mean) / std                                         # standardised (N, 39)
    centroids, inertia = kmeans_pp(z, k, iters=iters, seed=seed, log=log)
    used = int(torch.unique(_nearest(z, centroids)[0]).numel())
    cfg = dict(mfcc.config, k=k)
    return {"kind": "mfcc-kmeans", "config": cfg, "centroids": centroids.float().cpu(),
            "mean": mean.float().cpu(), "std": std.float().cpu(),
            "fit": {"frames_seen": n_seen, "frames_used": len(z), "mean_sq_distance": inertia,
                    "clusters_used": used, "seed": seed}}


# ----------------------------------------------------------------------------- random projection

class RandomProjectionTeacher(Teacher):
    """BEST-RQ random-projection quantiser of stacked, per-utterance-normalised log-mel frames -> {"codes": [B, K, T]}.

    Deterministic from `seed`: the projections and codebooks come from a private CPU generator and
    live in persistent buffers (a checkpoint restores them).
    """

    key, frame_dim = "codes", -1

    def __init__(self, n_codebooks: int = 8, codebook_size: int = 1024, code_dim: int = 16, seed: int = 0,
                 n_mels: int = 128, n_fft: int = 2048, stack: int = 3):
        super().__init__()
        if stack < 1 or stack % 2 == 0:
            raise ValueError(f"stack must be odd (frames centred on the labelled one), got {stack}")
        self.n_codebooks, self.codebook_size, self.code_dim = n_codebooks, codebook_size, code_dim
        self.seed, self.n_fft, self.stack = seed, n_fft, stack
        self.register_buffer("mel", rvq.mel_filterbank(n_fft, n_mels, SAMPLE_RATE), persistent=False)
        d_in = n_mels * stack
        g = torch.Generator().manual_seed(seed)
        # Xavier-normal projection (std sqrt(2 / (fan_in + fan_out))), as BEST-RQ initialises it
        proj = torch.randn(n_codebooks, d_in, code_dim, generator=g) * math.sqrt(2.0 / (d_in + code_dim))
        codebooks = F.normalize(torch.randn(n_codebooks, codebook_size, code_dim, generator=g), dim=-1)
        self.register_buffer("proj", proj)                  # (K, n_mels·stack, code_dim)
        self.register_buffer("codebooks", codebooks)        # (K, V, code_dim), unit rows
        self._freeze()

    def extra_repr(self) -> str:
        return (f"n_codebooks={self.n_codebooks}, codebook_size={self.codebook_size}, code_dim={self.code_dim}, "
                f"seed={self.seed}, n_mels={self.mel.shape[0]}, n_fft={self.n_fft}, stack={self.stack}")

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, L] -> normalised stacked log-mel [B, L // 320 + 1, n_mels · stack]."""
        power = _power_spectrum(_frames(wav.float(), self.n_fft, HOP), self.n_fft)   # (B, T, n_fft//2 + 1)
        x = torch.log(power @ self.mel.t() + 1e-8)                             # (B, T, n_mels); floor -80 dB
        # per-utterance CMVN: each example's own per-band mean and std over its frames
        x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp(min=1e-3)
        h = self.stack // 2
        T = x.shape[1]
        xp = torch.cat([x[:, :1].expand(-1, h, -1), x, x[:, -1:].expand(-1, h, -1)], 1)   # (B, T + 2h, n_mels)
        return torch.cat([xp[:, j: j + T] for j in range(self.stack)], -1)    # (B, T, n_mels·stack), t-h..t+h

    def _labels(self, wav: torch.Tensor) -> torch.Tensor:
        x = self.features(wav)                                                 # (B, T, D)
        codes = []
        for proj, cb in zip(self.proj, self.codebooks):
            # argmax of cosine(x·P, c) = argmax of (x·P)·c for unit c: the norm of x·P is a positive
            # per-frame factor, so normalising it would not change the choice. One codebook at a time
            # keeps the (B, T, V) score tensor small.
            codes.append(((x @ proj) @ cb.t()).argmax(-1))                     # (B, T)
        return torch.stack(codes, 1)                                           # (B, K, T)


# ----------------------------------------------------------------------------- the combination

class Teachers(nn.Module):
    """Several teachers run together; forward merges their label dicts (each key from exactly one teacher)."""

    def __init__(self, teachers: dict):
        super().__init__()
        owner = {}
        for name, t in teachers.items():
            if t.key in owner:
                raise ValueError(f"teachers {owner[t.key]!r} and {name!r} both produce {t.key!r}; "
                                 f"pick one {'code' if t.key == 'codes' else t.key}-producing teacher")
            owner[t.key] = name
        self.teachers = nn.ModuleDict(teachers)
        self._owner = owner

    def train(self, mode: bool = True):
        """Teachers stay in eval mode."""
        return super().train(False)

    @property
    def names(self) -> list:
        """Names of the teachers, in run order."""
        return list(self.teachers)

    @property
    def code_teacher(self) -> Teacher | None:
        """The teacher that produces "codes", or None."""
        return self.teachers[self._owner["codes"]] if "codes" in self._owner else None

    @property
    def n_codebooks(self) -> int:
        """Code streams in "codes" (0: no code teacher): the model's n_codebooks."""
        return self.teachers[self._owner["codes"]].n_codebooks if "codes" in self._owner else 0

    @property
    def codebook_size(self) -> int:
        """Codes per stream (0: no code teacher): the model's codebook_size."""
        return self.teachers[self._owner["codes"]].codebook_size if "codes" in self._owner else 0

    @property
    def cqt_bins(self) -> int:
        """Width of the "cqt" target (0: no CQT teacher): the model's cqt_bins."""
        return self.teachers[self._owner["cqt"]].n_bins if "cqt" in self._owner else 0

    def context(self, seconds: float = 0.0) -> tuple[int, int]:
        """(left, right) samples around a crop that the teachers need (the widest of them); see Teacher.context."""
        spans = [t.context(seconds) for t in self.teachers.values()]
        return max(a for a, _ in spans), max(b for _, b in spans)

    def forward(self, wav: torch.Tensor, n_frames: int, context=None, codes=None) -> dict:
        """wav [B, L] at 24 kHz -> {"codes": LongTensor [B, K, n_frames]} and/or {"cqt": FloatTensor [B, n_frames, 336]}.

        context: an audio.CropContext as in Teacher.forward, for the teachers that use it.
        codes: the crops' precomputed codes [B, K, >= n_frames] (read from shards made with `prepare --codes`):
        the code teacher does not run and these, cut to n_frames, are the "codes"."""
        out = {}
        for t in self.teachers.values():
            if codes is not None and t.key == "codes":
                if codes.shape[1] != t.n_codebooks or codes.shape[2] < n_frames:
                    raise ValueError(f"precomputed codes of shape {list(codes.shape)} do not give {t.n_codebooks} "
                                     f"codebooks x {n_frames} frames")
                out["codes"] = codes[:, :, :n_frames].to(wav.device, torch.long)
                continue
            out.update(t(wav, n_frames, context))
        return out


FLAG_NAMES = ("rvq", "randproj", "mfcc", "cqt")  # what --teachers and the docs call them (ALIASES map them)
FLAG_NAME = {"acoustic": "rvq"}  # a teacher's name here -> the one --teachers uses


def teacher_names(spec: list | str) -> list[str]:
    """Teachers' names from a list or a string joined by '+' or ',' ("rvq+cqt" -> ["acoustic", "cqt"], aliases
    and case folded); an unknown or repeated name, or none, raises ValueError."""
    given = [n.strip().lower() for n in (spec if isinstance(spec, str) else ",".join(spec)).replace("+", ",").split(",")
             if n.strip()]
    names = [ALIASES.get(n, n) for n in given]
    for g, n in zip(given, names):
        if n not in TEACHER_NAMES:
            raise ValueError(f"unknown teacher {g!r}; choose from {', '.join(FLAG_NAMES)}, joined by '+' "
                             f"(MERT: rvq+cqt)")
    if not names or len(set(names)) != len(names):
        raise ValueError("name each teacher once, joined by '+' (MERT: rvq+cqt)")
    return names


def build_teachers(names: list | str = "acoustic,cqt", acoustic_ckpt: str | os.PathLike | None = None,
                   mfcc_ckpt: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   seed: int = 0, n_q: int = LABEL_DEFAULTS["n_q"], log=None, cqt_log: bool = False) -> Teachers:
    """Teachers by name ("acoustic", "cqt", "mfcc", "randproj"; a list or a comma-separated string) on `device`.

    "acoustic" without `acoustic_ckpt` falls back to "randproj" (8 x 1024 codes, seeded with `seed`)
    and says so in one line through `log` (default: print to stderr; pass a rank-0 print under DDP).
    cqt_log makes the "cqt" teacher give log10(|CQT| + 1e-3) + 1.5 instead of MERT's linear magnitude.
    """
    names = teacher_names(names)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    built = {}
    for n in names:
        if n == "acoustic" and acoustic_ckpt is None:
            log("teachers: no acoustic-teacher checkpoint given; using the random-projection teacher "
                f"(BEST-RQ style, {n_q} x 1024 codes, seed {seed}) for the code targets")
            n = "randproj"
            if n in built:
                raise ValueError("'acoustic' fell back to 'randproj', which is already in the list")
        if n == "acoustic":
            built[n] = AcousticTeacher(acoustic_ckpt, n_q=n_q)
        elif n == "cqt":
            built[n] = MusicalTeacher(log=cqt_log)
        elif n == "mfcc":
            if mfcc_ckpt is None:
                raise ValueError("the 'mfcc' teacher needs mfcc_ckpt; fit one with: "
                                 "python teachers.py fit-mfcc --data DIR --out mfcc_km.pt")
            built[n] = MFCCKMeansTeacher(mfcc_ckpt)
        else:
            built[n] = RandomProjectionTeacher(n_codebooks=n_q, seed=seed)
    return Teachers(built).to(device)


# ----------------------------------------------------------------------------- the flags train.py and `labels` share

class FlagError(ValueError):
    """A teacher flag that names something unusable; the message names the flag (and the file): a usage error."""


def names_from_flag(spec: str) -> list[str]:
    """--teachers "rvq+cqt" -> ["acoustic", "cqt"] (teacher_names); an unknown or repeated name raises FlagError."""
    try:
        return teacher_names(spec)
    except ValueError as e:
        raise FlagError(f"--teachers {spec}: {e}") from None


def check_flags(spec: str, acoustic_ckpt=None, mfcc_ckpt=None) -> list[str]:
    """The teacher flags before any work, cheaply: the names, and that each file a named teacher needs is there.
    Returns the names; FlagError otherwise. from_flags reads the files."""
    names = names_from_flag(spec)
    if "mfcc" in names and not mfcc_ckpt:
        raise FlagError("--teachers mfcc needs --mfcc_ckpt (fit one: python teachers.py fit-mfcc --data DIR --out "
                        "mfcc_km.pt)")
    for flag, path, used in (("--acoustic_ckpt", acoustic_ckpt, "acoustic" in names),
                             ("--mfcc_ckpt", mfcc_ckpt, "mfcc" in names)):
        if path and used and not Path(path).is_file():
            raise FlagError(f"{flag} {path}: " + ("a folder, not a checkpoint file" if Path(path).is_dir()
                                                  else "no such file"))
    return names


def _read_mfcc(path) -> dict:
    """An MFCC k-means checkpoint's dict, checked by building the teacher from it (ValueError if it is not one)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"holds a {type(obj).__name__}, not an MFCC k-means checkpoint")
    MFCCKMeansTeacher(obj)
    return obj


def from_flags(spec: str, acoustic_ckpt=None, mfcc_ckpt=None, *, seed: int = LABEL_DEFAULTS["seed"],
               n_q: int = LABEL_DEFAULTS["n_q"], cqt_log: bool = False, device="cpu", log=None) -> Teachers:
    """The teachers the flags name (check_flags first), each file read once, frozen in eval mode on `device`. A file
    that is not the checkpoint its flag wants, or flags that do not fit (--n_q beyond the checkpoint's codebooks,
    two code teachers), raise FlagError naming them."""
    names = check_flags(spec, acoustic_ckpt, mfcc_ckpt)
    files = {}
    for flag, path, name, read in (("--acoustic_ckpt", acoustic_ckpt, "acoustic", rvq.load),
                                   ("--mfcc_ckpt", mfcc_ckpt, "mfcc", _read_mfcc)):
        if path and name in names:
            try:  # the teacher's own loader, so the file is read as training reads it
                files[flag] = read(path)
            except Exception as e:  # whatever torch.load or the loader raised for a file that is not one
                why = " ".join(str(e).split())[:160]
                raise FlagError(f"{flag} {path}: not a usable checkpoint "
                                f"({why if isinstance(e, ValueError) else f'{type(e).__name__}: {why}'})") from None
    try:
        return build_teachers(names, acoustic_ckpt=files.get("--acoustic_ckpt"), mfcc_ckpt=files.get("--mfcc_ckpt"),
                              device=device, seed=seed, n_q=n_q, cqt_log=cqt_log, log=log).eval()
    except ValueError as e:  # --n_q beyond the checkpoint's codebooks, two code teachers
        raise FlagError(f"--teachers {spec} (--n_q {n_q}): {e}") from None


# ----------------------------------------------------------------------------- command line

def _save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temp file beside path, then rename (a crash never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no temp file stays
        tmp.unlink(missing_ok=True)
        raise


def _fit_command(args) -> int:
    import audio  # the project's reader: only the command needs it
    from tqdm import tqdm
    if args.threads:
        torch.set_num_threads(args.threads)
    failed, files, passed = 0, [], []
    for p in [x.strip() for v in args.data for x in v.split(",") if x.strip()]:
        try:
            files += audio.find_audio([p], skipped=passed)
        except audio.AudioError as e:                       # a missing path: name it, keep the rest
            print(f"skipping {e}", file=sys.stderr)
            failed += 1
    for path, reason in passed:  # .m4a and the like in a folder: named and counted, never passed by
        print(f"skipping {path}: {reason}", file=sys.stderr)
        failed += 1
    # a seeded random file order: --hours then takes a random subset of the collection
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(args.seed)).tolist()
    budget = args.hours * 3600 * SAMPLE_RATE if args.hours else math.inf
    stats = {"files": 0, "samples": 0}

    def waves():
        nonlocal failed
        bar = tqdm(order, desc="mfcc", unit="file", file=sys.stderr, disable=None)
        for i in bar:
            if stats["samples"] >= budget:
                break
            try:
                w = audio.load(files[i], sr=SAMPLE_RATE)
            except audio.AudioError as e:
                print(f"skipping {e}", file=sys.stderr)
                failed += 1
                continue
            w = w[: int(min(len(w), budget - stats["samples"]))]
            stats["files"] += 1
            stats["samples"] += len(w)
            bar.set_postfix(hours=f"{stats['samples'] / SAMPLE_RATE / 3600:.2f}")
            yield w
        bar.close()

    t0 = time.time()
    log = (lambda m: print(m, file=sys.stderr)) if args.verbose else None
    try:
        state = fit_mfcc_kmeans(waves(), k=args.k, seed=args.seed, max_frames=args.max_frames,
                                iters=args.iters, device=args.device, log=log)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    state["fit"].update(files=stats["files"], hours=stats["samples"] / SAMPLE_RATE / 3600)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(state, out)
    f = state["fit"]
    print(f"{out}: k={args.k} from {f['frames_used']} of {f['frames_seen']} frames, {f['files']} files "
          f"({f['hours']:.2f} h); mean squared distance {f['mean_sq_distance']:.3f} (standardised units); "
          f"{f['clusters_used']} clusters used; {time.time() - t0:.0f} s")
    return 1 if failed else 0


def _labels_command(args) -> int:
    import audio  # the project's reader: only the command needs it
    if args.threads:
        torch.set_num_threads(args.threads)
    start = int(round(args.start * SAMPLE_RATE))
    if start % HOP:
        print(f"{args.file}: training crops start on the {HOP}-sample frame grid; start {args.start:g} s -> "
              f"{start // HOP * HOP / SAMPLE_RATE:g} s", file=sys.stderr)
        start = start // HOP * HOP
    teach = from_flags(args.teachers, args.acoustic_ckpt, args.mfcc_ckpt, seed=args.seed, n_q=args.n_q,
                       cqt_log=args.cqt_log)
    context = teach.context(args.context)
    crop = int(round(args.seconds * SAMPLE_RATE))
    try:  # read exactly as train.py's CropDataset does: hop grid, context around the crop
        ds = audio.CropDataset([args.file], crop, min_seconds=0, hop=HOP, context=context,
                               on_bad=lambda m: print(m, file=sys.stderr))
        n = int(ds.length[0])
        if start >= n:
            print(f"{args.file}: --start {start / SAMPLE_RATE:g} s is past the end ({n / SAMPLE_RATE:.2f} s)",
                  file=sys.stderr)
            return 1
        if start + crop > n:
            print(f"{args.file}: only {(n - start) / SAMPLE_RATE:.2f} s after --start; labelling that (a training "
                  f"crop of a file this short is cut to it too)", file=sys.stderr)
            crop = n - start
        ex = ds.example_at(0, start, crop)
    except audio.AudioError as e:
        print(e, file=sys.stderr)
        return 1
    T = model_frames(crop)
    if T < 1:
        print(f"{args.file}: a crop of {crop} samples is shorter than one model frame ({MODEL_FIELD})",
              file=sys.stderr)
        return 1
    left = context[0]
    ctx = audio.CropContext(ex["audio"][None], left, torch.tensor([ex["left"]]), torch.tensor([ex["right"]]))
    y = teach(ex["audio"][None, left:left + crop], T, context=ctx)
    t0 = start / SAMPLE_RATE
    print(f"{args.file}: crop at {t0:g} s (sample {start}, frame {start // HOP}), {crop / SAMPLE_RATE:g} s, {T} frames; "
          f"teachers {'+'.join(teach.names)}; context {ex['left'] / SAMPLE_RATE:g} s before, "
          f"{ex['right'] / SAMPLE_RATE:g} s after")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp.npz")  # renamed into place whole: Ctrl-C or a full disk leaves nothing
        try:
            np.savez(tmp, start=start, frames=T, **{k: v[0].numpy() for k, v in y.items()})
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        print(f"wrote {out}: " + ", ".join(f"{k} {tuple(v[0].shape)}" for k, v in y.items()))
    elif "codes" in y:
        for t, row in enumerate(y["codes"][0].t().tolist()):
            print(f"{start // HOP + t:7d} {t0 + t * HOP / SAMPLE_RATE:9.3f}s  " + " ".join(f"{c:4d}" for c in row))
    if "codes" in y:
        for k, row in enumerate(y["codes"][0]):
            vals, counts = torch.unique(row, return_counts=True)
            top = int(counts.argmax())
            print(f"codebook {k}: {len(vals)} distinct codes in {T} frames; most common {int(vals[top])} "
                  f"({100 * counts[top].item() / T:.0f}%)")
    if "cqt" in y:
        c = y["cqt"][0]
        print(f"cqt: {tuple(c.shape)}, mean {c.mean().item():.4g}, max {c.max().item():.4g}")
    return 0


def main(argv: list | None = None) -> int:
    """Command line: `fit-mfcc` fits the MFCC k-means teacher; `labels` prints a training crop's labels."""
    ap = argparse.ArgumentParser(
        description="MERT teachers: label producers at 75 Hz. Subcommand fit-mfcc fits the MFCC k-means teacher.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python teachers.py fit-mfcc --data music/ --out mfcc_km.pt --k 500 --hours 10\n")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fp = sub.add_parser(
        "fit-mfcc", help="fit k-means on 39-d MFCC frames (HuBERT iteration 1 / MERT-v0 teacher)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python teachers.py fit-mfcc --data music/ more/ --out mfcc_km.pt --k 500 --hours 10 --seed 0\n"
               "then: build_teachers('mfcc,cqt', mfcc_ckpt='mfcc_km.pt')\n")
    fp.add_argument("--data", nargs="+", required=True,
                    help="audio files or folders (searched recursively), space- or comma-separated")
    fp.add_argument("--out", required=True, help="checkpoint to write (atomically), e.g. mfcc_km.pt")
    fp.add_argument("--k", type=int, default=500, help="number of clusters = label vocabulary (default %(default)s)")
    fp.add_argument("--hours", type=float, default=10.0,
                    help="read at most this much audio, from files in a seeded random order; 0 = all (default %(default)s)")
    fp.add_argument("--max_frames", "--max-frames", type=int, default=500_000,
                    help="frames sampled uniformly from what was read for k-means (default %(default)s)")
    fp.add_argument("--iters", type=int, default=50, help="maximum Lloyd iterations after k-means++ (default %(default)s)")
    fp.add_argument("--seed", type=int, default=0, help="seed of the file order, frame sample and k-means (default %(default)s)")
    fp.add_argument("--device", default="cpu", help="torch device for features and k-means, e.g. cuda (default %(default)s)")
    fp.add_argument("--threads", type=int, default=0, help="CPU threads, 0 = torch default (default %(default)s)")
    fp.add_argument("--verbose", action="store_true", help="print each k-means iteration to stderr")
    lp = sub.add_parser(
        "labels", help="print or save the exact labels train.py gives a training crop of FILE at --start",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python teachers.py labels song.flac --start 30 --teachers rvq+cqt "
               "--acoustic_ckpt encodec_24khz-d7cc33bc.th\n"
               "prints one line per model frame (frame, time, codes) and how many distinct codes each codebook used\n")
    lp.add_argument("file", help="an audio file")
    lp.add_argument("--start", type=float, required=True,
                    help="crop start in seconds (training crops start on the 320-sample frame grid; snapped down to it)")
    lp.add_argument("--seconds", type=float, default=5.0,
                    help="crop length, as train.py --crop_seconds (default %(default)s)")
    lp.add_argument("--teachers", default=LABEL_DEFAULTS["teachers"],
                    help="as train.py --teachers (default %(default)s)")
    lp.add_argument("--acoustic_ckpt", "--acoustic-ckpt", default=None,
                    help="as train.py --acoustic_ckpt (none: the random-projection teacher stands in)")
    lp.add_argument("--mfcc_ckpt", "--mfcc-ckpt", default=None, help="as train.py --mfcc_ckpt")
    lp.add_argument("--n_q", "--n-q", type=int, default=LABEL_DEFAULTS["n_q"],
                    help="as train.py --n_q (default %(default)s)")
    lp.add_argument("--context", type=float, default=ACOUSTIC_CONTEXT_SECONDS,
                    help="as train.py --acoustic_context: seconds of audio before the crop that an LSTM acoustic "
                         "teacher encodes first (default %(default)s)")
    lp.add_argument("--cqt_log", "--cqt-log", action="store_true", help="as train.py --cqt_log true")
    lp.add_argument("--seed", type=int, default=LABEL_DEFAULTS["seed"],
                    help="as train.py --seed: seeds the random-projection teacher (default %(default)s)")
    lp.add_argument("--out", help="save the labels to this .npz (codes [n_q, T], cqt [T, 336]) instead of printing "
                                  "the codes")
    lp.add_argument("--threads", type=int, default=0, help="CPU threads, 0 = torch default (default %(default)s)")
    args = ap.parse_args(argv)
    prog = f"teachers.py {args.command}"
    if args.command == "labels":
        if args.seconds <= 0.02 or args.start < 0:
            ap.error("--seconds must be > 0.02 and --start >= 0")
    else:
        if args.k < 2:
            ap.error("--k must be at least 2")
        if args.hours < 0 or args.max_frames < 1 or args.iters < 1:
            ap.error("--hours must be >= 0, --max_frames and --iters >= 1")
    problem = _flag_problem(args)
    if problem:  # before any work: one line, exit 2
        print(f"{prog}: {problem}", file=sys.stderr)
        return 2
    try:
        return _labels_command(args) if args.command == "labels" else _fit_command(args)
    except FlagError as e:  # a teacher file that is not the checkpoint its flag wants: read before any labelling
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written atomically: nothing partial stays
        print(f"{prog}: interrupted (Ctrl-C); nothing written", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk while writing
        print(f"{prog}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


def _flag_problem(args) -> str | None:
    """A usage problem of the flags that name teachers, files and devices (checked before any work), or None."""
    import audio  # the shared checks; only the command needs them
    if getattr(args, "device", "cpu") != "cpu":
        try:
            audio.pick_device(args.device)
        except ValueError as e:
            return str(e)
    if args.command == "labels":
        try:
            check_flags(args.teachers, args.acoustic_ckpt, args.mfcc_ckpt)
        except FlagError as e:
            return str(e)
    if args.out:
        problem = audio.output_problem(args.out)
        if problem:
            return f"--out {args.out}: {problem}"
    return None


if __name__ == "__main__":
    sys.exit(main())
