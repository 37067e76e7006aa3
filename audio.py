"""Audio input for MERT: read any file soundfile reads, mix to mono, resample to 24 kHz; training crops.

    x = load("song.mp3")                 # float32 [samples], mono, 24 kHz
    ds = CropDataset(["music/"], crop_samples=120000, seed=0)   # folders, files, manifests, shards
    python audio.py prepare music/ --out shards/ --workers 4    # once: 24 kHz int16 shards for fast loading

Decisions:
- Decoding is soundfile (libsndfile), no ffmpeg. Every failure (missing, corrupt, empty, cut short,
  NaN/inf) is one `AudioError("<path>: <problem>")`, so a caller walking a folder names the bad file
  and goes on; files in containers soundfile cannot decode (.m4a, .mp4) are named, never passed over.
- Mono is the mean of the channels. The resampler is our own (no scipy/librosa/soxr): a Kaiser-
  windowed sinc at the exact rational phases, applied as a polyphase matmul; flat to 0.9 x the lower
  Nyquist, about -90 dB beyond it, zero delay (output sample j at time j / new_sr).
- Training crops follow MERT (`sampling="epoch"`: each file gives one crop an epoch, length-grouped
  batches cut to their shortest clip) or draw by duration (`"duration"`); either way a crop is a pure
  function of the seed and its position in the stream, so any worker, rank or resumed run reads the
  same crop. Crop starts lie on the 320-sample label grid.
- Shards are raw int16 at 24 kHz read by memory map: ~80k audio-s/s per core against ~700 from
  44.1 kHz FLAC/MP3 (`python bench.py data`). `prepare --codes` also stores each file's acoustic codes
  (MERT's offline codes), which a crop then reads instead of a teacher; the teacher comes from
  teachers.py, imported by that command only, so this file still imports nothing of the project.

Details (resampler design, sampling, shard format): docs/audio.md.
"""
import argparse
import functools
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import soundfile as sf

__all__ = ["SAMPLE_RATE", "AudioError", "AudioWarning", "AUDIO_EXTENSIONS", "load", "info", "resample", "find_audio",
           "load_crop", "read_manifest", "CropDataset", "CropContext", "RankBatches", "EpochBatches", "make_loader",
           "worker_init", "prepare", "shard_codes", "describe_codes", "codes_key", "SHARD_FORMAT", "one_line", "write_json",
           "output_problem", "pick_device", "limit_blas_threads"]

SAMPLE_RATE = 24_000  # MERT's input rate: the default of every reader and of the shards


class AudioError(Exception):
    """An audio file that cannot be used; the message is one line, "<path>: <problem>"."""


class AudioWarning(UserWarning):
    """A file that loaded but may hold less than it should (e.g. decoded shorter than its header says);
    issued with warnings.warn, the message one line, "<path>: <problem>"."""


# Suffix -> (libsndfile major format, subtype that must be available or None). Only the suffixes
# the installed libsndfile can decode end up in AUDIO_EXTENSIONS (MP3 needs libsndfile >= 1.1).
_SUFFIX_FORMATS = {
    ".wav": ("WAV", None), ".wave": ("WAV", None), ".flac": ("FLAC", None),
    ".ogg": ("OGG", "VORBIS"), ".oga": ("OGG", "VORBIS"), ".opus": ("OGG", "OPUS"),
    ".mp3": ("MP3", None), ".aif": ("AIFF", None), ".aiff": ("AIFF", None), ".aifc": ("AIFF", None),
    ".au": ("AU", None), ".snd": ("AU", None), ".caf": ("CAF", None), ".w64": ("W64", None),
    ".rf64": ("RF64", None),
}


def _readable_suffixes() -> frozenset:
    """The suffixes of _SUFFIX_FORMATS whose format (and subtype) this libsndfile supports."""
    formats = sf.available_formats()
    out = set()
    for suffix, (fmt, subtype) in _SUFFIX_FORMATS.items():
        if fmt in formats and (subtype is None or subtype in sf.available_subtypes(fmt)):
            out.add(suffix)
    return frozenset(out)


AUDIO_EXTENSIONS = _readable_suffixes()

# Audio and video containers that libsndfile cannot decode at all. A folder walk names them instead
# of passing over them without a word, and loading one says what it is and what to do.
_UNDECODABLE = {
    ".m4a": "MP4 audio (AAC/ALAC)", ".m4b": "MP4 audiobook (AAC)", ".m4p": "protected MP4 audio",
    ".mp4": "MP4 video/audio", ".m4v": "MP4 video", ".mov": "QuickTime", ".3gp": "3GPP", ".aac": "raw AAC",
    ".wma": "Windows Media Audio", ".asf": "Windows Media", ".webm": "WebM", ".mka": "Matroska audio",
    ".mkv": "Matroska video", ".ape": "Monkey's Audio", ".wv": "WavPack", ".tta": "True Audio",
    ".mpc": "Musepack", ".ac3": "Dolby AC-3", ".dts": "DTS", ".amr": "AMR", ".ra": "RealAudio",
    ".rm": "RealMedia", ".avi": "AVI", ".flv": "Flash video", ".dsf": "DSD (DSF)", ".dff": "DSD (DFF)",
}


def undecodable_reason(path) -> str | None:
    """Why soundfile cannot read a file of this suffix (None if it may): a one-line hint with the fix."""
    suffix = Path(path).suffix.lower()
    if suffix in _UNDECODABLE:
        kind = _UNDECODABLE[suffix]
    elif suffix in _SUFFIX_FORMATS and suffix not in AUDIO_EXTENSIONS:
        kind = f"{_SUFFIX_FORMATS[suffix][0]} (not supported by this libsndfile {sf.__libsndfile_version__})"
    else:
        return None
    return (f"{suffix} is {kind}, which soundfile (libsndfile) cannot decode; "
            f"convert it first, e.g. ffmpeg -i 'in{suffix}' 'out.flac'")


def one_line(e: BaseException) -> str:
    """An exception's message on one line (libsndfile messages can span lines)."""
    return " ".join(str(e).split()) or type(e).__name__


def output_problem(path, folder: bool = False) -> str | None:
    """Why `path` (a file to write; with folder=True a folder to create or fill) cannot be written, or None.

    The commands ask this before any work starts. The nearest existing folder at or above the target must be a
    folder in which a file can be made: a file made and removed there proves it (a read-only file system, or a
    path under a regular file, refuses root too, which permission bits do not)."""
    target = Path(path).absolute()
    if not folder and target.is_dir():
        return "is a folder"
    if folder and target.exists() and not target.is_dir():
        return "exists and is not a folder"
    here = target if folder else target.parent
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        return f"{here} is a file, not a folder"
    import tempfile
    try:
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=here)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return f"cannot write in {here} ({one_line(e)})"
    return None


def pick_device(name: str):
    """'auto' -> cuda, then mps, then cpu; a named device this torch cannot use is a ValueError naming --device."""
    import torch  # only the commands that run a model ask
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {name}: CUDA is not available ({why}, torch {torch.__version__}); "
                             f"use --device cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"--device {name}: MPS (Apple GPU) is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"--device {name}: unsupported device type {dev.type!r}; use auto, cpu, cuda or mps")
    return dev


# Errors soundfile/libsndfile raise for bad files; wrapped into AudioError, never passed through.
_READ_ERRORS = (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError, EOFError, MemoryError)


def info(path) -> tuple[int, int, int]:
    """(sample_rate, frames, channels) from the file's header, without decoding the samples."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        i = sf.info(str(path))
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from None
    if i.samplerate <= 0 or i.channels <= 0:
        raise AudioError(f"{path}: bad header ({i.samplerate} Hz, {i.channels} channels)")
    return int(i.samplerate), int(i.frames), int(i.channels)


def _unreadable(path: Path, e: BaseException) -> AudioError:
    """The AudioError for a file libsndfile refused, with the fix when its suffix is a known container."""
    hint = undecodable_reason(path)
    return AudioError(f"{path}: unreadable ({one_line(e)})" + (f": {hint}" if hint else ""))


def _ogg_tail(path: Path) -> str | None:
    """How an Ogg file's end is broken, or None. libsndfile decodes a cut Ogg up to its last whole page
    and reports that shorter length as the file's (sf.info agrees with what is decoded), so a cut file
    looks like a short song; only the page structure shows it. Every page starts "OggS", 27 header bytes
    (byte 5: flags, 0x04 = end of stream; byte 26: segment count) then the segment table, whose sum is
    the body length; the last page of a finished stream carries the end-of-stream flag (RFC 3533)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        base = max(0, size - 2 * 65307)  # 65307: the largest possible page
        f.seek(base)
        tail = f.read()
    last_whole, cut = None, False
    p = tail.rfind(b"OggS")
    while p >= 0:
        if tail[p + 4:p + 5] in (b"\x00", b""):  # stream structure version 0 (or cut before it): a page
            nseg = tail[p + 26] if p + 27 <= len(tail) else 255
            end = p + 27 + nseg + sum(tail[p + 27:p + 27 + nseg])
            if p + 27 + nseg <= len(tail) and end <= len(tail):
                last_whole = p
                cut = cut or (end < len(tail) and not tail[p + 5] & 0x04)  # bytes of a next page follow
                break
            cut = True  # a page that runs past the end of the file
        p = tail.rfind(b"OggS", 0, p)
    if cut:
        return "truncated Ogg: the file ends inside a page"
    if last_whole is not None and not tail[last_whole + 5] & 0x04:
        return "Ogg stream without its end-of-stream page (cut at a page boundary, or an unfinished recording)"
    return None


def _wav_data_shortfall(path: Path) -> tuple[int, int] | None:
    """(bytes its data chunk declares, bytes present) for a RIFF WAV whose data runs past the end of the
    file, else None. libsndfile clamps a cut WAV's frame count to the bytes present, without an error."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            head = f.read(8)
            n = int.from_bytes(head[4:], "little")
            if head[:4] == b"data":
                if n in (0, 0xFFFFFFFF):  # size unknown (written while streaming): nothing to check
                    return None
                have = size - pos - 8
                return (n, have) if n > have else None
            pos += 8 + n + (n & 1)  # chunks are padded to even sizes
    return None


def _check_complete(path: Path, fmt: str, header_frames: int, got: int, file_sr: int) -> None:
    """Raise AudioError where the file is provably cut; warn (AudioWarning) where it decoded much shorter
    than its header's estimate (MP3's length is an estimate: Xing-less VBR files can be off)."""
    secs = f"decoded {got / file_sr:.2f} s"
    if fmt == "OGG":
        problem = _ogg_tail(path)
        if problem and problem.startswith("truncated"):
            raise AudioError(f"{path}: {problem}; {secs}, the rest is missing")
        if problem:
            warnings.warn(AudioWarning(f"{path}: {problem}; {secs}"), stacklevel=3)
    elif fmt in ("WAV", "WAVEX"):
        short = _wav_data_shortfall(path)
        if short:
            want = short[0] / max(short[1], 1) * got  # the same bytes per frame as what is present
            raise AudioError(f"{path}: truncated WAV: {secs} of the {want / file_sr:.2f} s its header announces")
    if got < header_frames:
        announced = f"{secs} of the {header_frames / file_sr:.2f} s its header announces"
        if fmt == "FLAC":  # STREAMINFO's count is exact
            raise AudioError(f"{path}: truncated FLAC: {announced}")
        if header_frames - got > max(file_sr, header_frames // 100):  # > 1 s and > 1% short
            warnings.warn(AudioWarning(f"{path}: {announced} (truncated?)"), stacklevel=3)


def _mono(x: np.ndarray) -> np.ndarray:
    """[frames, channels] float32 -> [frames], the mean of the channels."""
    # Summed column by column: x.mean(axis=1) over a short axis is ~15x slower on a long [frames, 2].
    mono = x[:, 0].copy()
    for c in range(1, x.shape[1]):
        mono += x[:, c]
    if x.shape[1] > 1:
        mono /= np.float32(x.shape[1])
    return mono


def load(path, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as float32 mono [samples] at `sr` Hz; any problem raises AudioError."""
    sr = _check_rate("sr", sr)  # a bad target rate is the caller's ValueError, not the file's fault
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        with sf.SoundFile(str(path)) as f:
            file_sr, fmt, header_frames = f.samplerate, f.format, f.frames
            # always_2d: [frames, channels] even for mono, so the mixdown below has one code path
            x = f.read(dtype="float32", always_2d=True)
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from None
    _check_complete(path, fmt, header_frames, x.shape[0], file_sr)  # a cut file says so, even if it decoded nothing
    if x.shape[0] == 0:
        raise AudioError(f"{path}: empty (0 samples)")
    # NaN/inf would poison every feature frame downstream; counted on the file's own channels.
    if not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise AudioError(f"{path}: {bad} non-finite samples (NaN/inf)")
    mono = _mono(x)                                   # [frames]
    if file_sr == sr:
        return mono
    try:
        return resample(mono, file_sr, sr)
    except ValueError as e:  # the file's header gives a nonsense sample rate
        raise AudioError(f"{path}: {one_line(e)}") from None


# ---------------------------------------------------------------------------------------------
# Resampling
#
# Output j is at input position p_j = j*M/L (in input samples), with new_sr/orig_sr = L/M coprime:
#
#     y[j] = sum_k x[k] h(k - p_j),   h(t) = 2fc sinc(2fc t) kaiser(t / hw),  |t| < hw
#
# fc (cycles per input sample) is the cutoff, midway through the transition band
# [0.9, 1.0] x lower Nyquist; hw is the half-width in input samples. The fractional part of p_j
# repeats with period L, so output j = g*L + l uses the taps of phase l at input offset g*M:
#
#     group g:  x[g*M + o - ... ]  ──window of Wn samples──▶  [Wn] @ H[Wn, L]  ──▶  y[g*L : g*L+L]
#
# One strided view of x (stride M, width Wn) times the phase matrix H gives all outputs of many
# groups in one matmul. When L is large (awkward rates such as 44100 -> 44101) a group's window
# would be huge, so the L phases are split into runs of Ls consecutive phases, each with its own
# offset o, window Wn and matrix H; the work per output stays ~ (Ls*M/L + 2*hw).
# ---------------------------------------------------------------------------------------------
_PASS_EDGE = 0.90     # passband edge / lower Nyquist (flat to here)
_STOP_EDGE = 1.00     # stopband edge / lower Nyquist: nothing above it survives or aliases below it
_ATTEN_DB = 90.0      # Kaiser design attenuation; the formula is approximate, this measures > 80 dB
# Floats per block of the strided input copy (16 MiB in float32): bounds memory, yet keeps each
# matmul large enough that a multi-threaded BLAS does not lose its time waking threads (on a busy
# 2-core machine, 1 MiB blocks ran 10x slower than 16 MiB ones).
_BLOCK = 1 << 22


def _check_rate(name: str, sr) -> int:
    """A sample rate as a positive int, or ValueError."""
    if isinstance(sr, (bool, np.bool_)) or not isinstance(sr, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a positive integer sample rate, got {sr!r}")
    if not math.isfinite(sr) or sr <= 0 or int(sr) != sr:
        raise ValueError(f"{name} must be a positive integer sample rate, got {sr!r}")
    return int(sr)


def _design(up: int, down: int) -> tuple[float, float, float]:
    """(cutoff fc in cycles/input sample, half-width hw in input samples, Kaiser beta) for up/down."""
    nyq = 0.5 * min(1.0, up / down)                  # lower Nyquist, cycles per input sample
    fc = 0.5 * (_PASS_EDGE + _STOP_EDGE) * nyq
    width = (_STOP_EDGE - _PASS_EDGE) * nyq          # transition width, cycles per input sample
    beta = 0.1102 * (_ATTEN_DB - 8.7)                # Kaiser's formula for A > 50 dB
    length = (_ATTEN_DB - 7.95) / (14.36 * width)    # Kaiser's filter-order estimate (taps - 1)
    return fc, 0.5 * length, beta


def _kernel(t: np.ndarray, fc: float, hw: float, beta: float) -> np.ndarray:
    """The windowed-sinc lowpass h(t), t in input samples (float64)."""
    r = np.clip(t / hw, -1.0, 1.0)
    win = np.i0(beta * np.sqrt(1.0 - r * r)) / np.i0(beta)
    return np.where(np.abs(t) < hw, 2 * fc * np.sinc(2 * fc * t) * win, 0.0)


def _phase_runs(up: int, down: int, K: int, used: int):
    """Yield (l0, l1, o, t): phases l0..l1-1 read x[g*down + o + i] with tap offsets t [Wn, l1-l0]."""
    # Runs of Ls phases: all L at once when the phase matrix is small, else runs whose window
    # overhead (Ls*M/L) is about the filter length so that at most ~half the multiplies are zeros.
    if (down + 2 * K + 2) * up <= (1 << 21):
        Ls = up
    else:
        Ls = max(1, min(up, (2 * K + 2) * up // down))
    for l0 in range(0, used, Ls):                     # phases >= used have no output sample
        l1 = min(used, l0 + Ls)
        o = (l0 * down) // up - K
        Wn = ((l1 - 1) * down) // up - (l0 * down) // up + 2 * K + 2
        i = np.arange(Wn, dtype=np.int64)[:, None]
        l = np.arange(l0, l1, dtype=np.int64)[None, :]
        # t = k - p_j = (o + i) - l*M/L, formed from integers so large indices lose no precision
        t = ((o + i) * up - l * down) / up
        yield l0, l1, o, t


@functools.lru_cache(maxsize=8)
def _filters(up: int, down: int, R: int, used: int, dtype: np.dtype) -> tuple:
    """((l0, l1, o, H [Wn, l1-l0]), ...): the phase runs of resample(), designed once per rate pair.

    Cached because designing them (np.i0 over every tap) costs as much as filtering a 5 s training
    crop; read-only so that no caller can alter the cached filters.
    """
    fc, hw, beta = _design(up, down)
    K = int(math.ceil(hw))
    runs = []
    for l0, l1, o, t in _phase_runs(up * R, down * R, K, used):
        H = _kernel(t, fc, hw, beta)                  # [Wn, Ls]
        H /= H.sum(axis=0, keepdims=True)             # exact unit DC gain for every phase
        H = H.astype(dtype)
        H.flags.writeable = False
        runs.append((l0, l1, o, H))
    return tuple(runs)


def resample(x, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited resampling along the last axis from orig_sr to new_sr Hz (zero delay)."""
    orig_sr, new_sr = _check_rate("orig_sr", orig_sr), _check_rate("new_sr", new_sr)
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("resample needs an array of samples [..., samples], got a scalar")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if orig_sr == new_sr:
        return x.copy()
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g              # new/orig = up/down, coprime
    lead, n = x.shape[:-1], x.shape[-1]
    n_out = -(-n * up // down)                        # ceil(n * new_sr / orig_sr)
    dtype = np.float64 if x.dtype == np.float64 else np.float32
    C = math.prod(lead)
    x = np.ascontiguousarray(x.reshape(C, n), dtype=dtype)    # [C, n]
    # With few phases (48k -> 24k has L=1) a group's matmul would be a thin matrix-vector product;
    # merging R groups into one (U/D = RL/RM, the same ratio) gives BLAS >= 32 columns to work on.
    R = -(-32 // up)
    U, D = up * R, down * R
    groups = -(-n_out // U)
    out = np.zeros((C, groups, U), dtype=dtype)       # [C, G, U]: output j = g*U + l
    if n == 0 or C == 0:
        return out.reshape(*lead, groups * U)[..., :n_out]

    for l0, l1, o, H in _filters(up, down, R, min(U, n_out), np.dtype(dtype)):
        Wn = H.shape[0]
        # Groups [gs, ge) read windows inside x (views, no copy); the few groups before gs and from
        # ge on read past an end and get their own small zero-padded blocks.
        step = max(1, _BLOCK // (Wn * C))             # groups per block: bounds the window copy
        gs = min(groups, max(0, -(o // D)))           # first g with g*D + o >= 0
        ge = max(gs, min(groups, (n - o - Wn) // D + 1))  # g < ge: g*D + o + Wn <= n
        bounds = [0, gs, *range(gs + step, ge, step), ge, groups]
        for g0, g1 in zip(bounds, bounds[1:]):
            if g1 <= g0:
                continue
            # input x[a:b] feeds groups g0..g1-1
            a, b = g0 * D + o, (g1 - 1) * D + o + Wn
            if a >= 0 and b <= n:
                piece = x[:, a:b]
            else:
                piece = np.zeros((C, b - a), dtype=dtype)
                lo, hi = max(a, 0), min(b, n)
                if hi > lo:
                    piece[:, lo - a:hi - a] = x[:, lo:hi]
            # [C, g1-g0, Wn]: window of group g starts at (g-g0)*D inside piece
            win = np.lib.stride_tricks.sliding_window_view(piece, Wn, axis=-1)[:, ::D]
            out[:, g0:g1, l0:l1] = np.ascontiguousarray(win) @ H
    y = out.reshape(C, groups * U)[:, :n_out]
    return np.ascontiguousarray(y).reshape(*lead, n_out)


# ---------------------------------------------------------------------------------------------
# Finding files
# ---------------------------------------------------------------------------------------------
def find_audio(paths, recursive: bool = True, skipped: list | None = None) -> list[Path]:
    """Expand files and folders into a list of audio files (files kept as given, folders sorted).

    `skipped`, a list, receives (path, reason) for what a folder walk passes over that a user may have
    meant as input: files in containers soundfile cannot decode (.m4a, .mp4, .wma, ...) and folders
    that cannot be listed."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found, seen = [], set()
    for p in map(Path, paths):
        if p.is_dir():
            files, passed = [], []
            # os.walk with sorted names: deterministic order; hidden entries (".git", macOS "._x.mp3"
            # AppleDouble stubs that look like audio but are not) are skipped.
            walk_err = lambda e: passed.append((Path(e.filename), f"cannot list folder ({e.strerror})"))  # noqa: E731
            for root, dirs, names in os.walk(p, onerror=walk_err):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
                for name in names:
                    if name.startswith("."):
                        continue
                    if Path(name).suffix.lower() in AUDIO_EXTENSIONS:
                        files.append(Path(root) / name)
                    elif why := undecodable_reason(name):
                        passed.append((Path(root) / name, why))
            files.sort(key=lambda f: f.relative_to(p).parts)
            if skipped is not None:
                skipped.extend(sorted(passed, key=lambda item: item[0].relative_to(p).parts))
        elif p.exists():
            files = [p]  # named explicitly: the caller decides, whatever the suffix
        else:
            raise AudioError(f"{p}: no such file or folder")
        for f in files:
            if f not in seen:
                seen.add(f)
                found.append(f)
    return found


# ---------------------------------------------------------------------------------------------
# Reading one crop without decoding the whole file
#
# For a file at another rate, output j (at new_sr) sits at input position j*M/L (L/M = new/orig,
# coprime). Outputs that are multiples of L sit on input samples, so a segment read from input
# sample a = (j0/L - P)*M, j0 a multiple of L, resamples onto the same output grid as the whole
# file, shifted by j0 - P*L:
#
#   input   ... |<- P*M >= K+1 ->|<------ region of the crop ------>|<- K+2 ->| ...
#               a                j0*M/L                              last tap   b
#   output          (dropped)    j0 ... start ........ stop-1   (dropped)
#
# Samples before 0 or past the end are zeros, as load() sees them, so the kept outputs use the
# same taps on the same samples as load(path)[start:stop]: equal up to float rounding.
# ---------------------------------------------------------------------------------------------
def _read_frames(path, lo: int, hi: int) -> np.ndarray:
    """Mono float32 samples lo..hi-1 of a file at its own rate; any problem raises AudioError."""
    try:
        with sf.SoundFile(str(path)) as f:
            if lo:
                f.seek(lo)
            x = f.read(hi - lo, dtype="float32", always_2d=True)
    except _READ_ERRORS as e:
        raise AudioError(f"{path}: unreadable ({one_line(e)})") from None
    if x.shape[0] != hi - lo:  # the header promised more than the data holds (truncated file)
        raise AudioError(f"{path}: truncated (read {x.shape[0]} of frames {lo}..{hi})")
    if not np.isfinite(x).all():
        raise AudioError(f"{path}: non-finite samples (NaN/inf) in frames {lo}..{hi}")
    return _mono(x)


def load_crop(path, start: int, length: int, sr: int = SAMPLE_RATE, header=None) -> np.ndarray:
    """load(path, sr)[start:start + length], reading only that region (plus the filter's reach).

    `header` is info(path) if the caller has it (saves one header read). Near the end the result
    is shorter, as the slice would be. Equal to the slice of load() up to float rounding (~1e-7).
    """
    sr = _check_rate("sr", sr)
    if start < 0 or length < 0:
        raise ValueError(f"start and length must be >= 0, got {start}, {length}")
    file_sr, frames, _ = header if header is not None else info(path)
    n_out = -(-frames * sr // file_sr)                # len(load(path, sr))
    stop = min(start + length, n_out)
    if stop <= start:
        return np.zeros(0, np.float32)
    if file_sr == sr:
        return _read_frames(path, start, stop)
    g = math.gcd(file_sr, sr)
    up, down = sr // g, file_sr // g
    K = int(math.ceil(_design(up, down)[1]))          # taps reach K input samples either side
    j0 = (start // up) * up                           # grid-aligned output at or before start
    P = -(-(K + 1) // down)                           # whole groups of margin before it
    first = j0 - P * up                               # the segment's output 0 is this global output
    a = (first // up) * down                          # segment's input 0 (may be < 0)
    b = ((stop - 1) * down) // up + K + 2             # one past the last tap of output stop-1
    lo, hi = max(a, 0), min(b, frames)
    x = _read_frames(path, lo, hi)
    if lo > a or hi < b:                              # zeros outside the file, as in load()
        x = np.concatenate([np.zeros(lo - a, np.float32), x, np.zeros(b - hi, np.float32)])
    try:
        y = resample(x, file_sr, sr)
    except ValueError as e:  # nonsense rate in the header
        raise AudioError(f"{path}: {one_line(e)}") from None
    return y[start - first:stop - first]


# ---------------------------------------------------------------------------------------------
# Training crops: CropDataset over files, manifests and prepared shards
# ---------------------------------------------------------------------------------------------
SHARD_FORMAT = "mert-audio-shards-v1"   # index.json "format" tag
_MANIFEST_COMMENT = "#"


def read_manifest(path) -> list[Path]:
    """Audio paths listed in a manifest: one per line, optionally `path<TAB>n_samples` (ignored).

    Relative paths are resolved against the manifest's folder. A first line that names an existing
    folder and has no tab is the root of the relative paths instead (fairseq/wav2vec .tsv manifests).
    Blank lines and lines starting with '#' are skipped. Durations always come from the files'
    headers: a sample-count column is accepted but not trusted.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AudioError(f"{path}: unreadable manifest ({one_line(e)})") from None
    root = path.parent
    entries = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith(_MANIFEST_COMMENT)]
    if entries and "\t" not in entries[0]:
        first = Path(entries[0].strip())
        first = first if first.is_absolute() else root / first
        if first.is_dir():
            root, entries = first, entries[1:]
    out = []
    for ln in entries:
        p = Path(ln.split("\t", 1)[0].strip())
        out.append(p if p.is_absolute() else root / p)
    return out


def _is_shard_dir(p: Path) -> bool:
    return p.is_dir() and (p / "index.json").is_file()


def _expand_sources(sources, skipped: list | None = None) -> tuple[list[Path], list[Path]]:
    """(audio files, shard folders) from a mix of folders, files, manifests and shard folders.

    A folder holding index.json is a shard folder; other folders are searched for audio (find_audio,
    which adds to `skipped` what it passes over); a file with an audio suffix is audio; any other file
    is a manifest. A missing source raises.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files, shards = [], []
    for s in map(Path, sources):
        if _is_shard_dir(s):
            shards.append(s)
        elif s.is_dir():
            files += find_audio([s], skipped=skipped)
        elif s.is_file() and s.suffix.lower() not in AUDIO_EXTENSIONS:
            files += read_manifest(s)
        elif s.is_file():
            files.append(s)
        else:
            raise AudioError(f"{s}: no such file or folder")
    return files, shards


def _print_bad(msg: str) -> None:
    print(f"audio.py: skipping {msg}", file=sys.stderr, flush=True)


class CropContext(NamedTuple):
    """A batch of crops with the audio around them, as a teacher that looks beyond a crop reads it.

    audio [B, offset + L + r] holds crop b at audio[b, offset:offset + L] (offset = the left context read,
    CropDataset.context[0]), with left[b] / right[b] valid samples of its file before / after it (fewer near
    the file's ends, zeros beyond); built from a batch of CropDataset.example dicts.
    """
    audio: Any     # torch.Tensor [B, offset + L + r]
    offset: int    # where every crop starts in audio
    left: Any      # int tensor [B]: valid samples before each crop
    right: Any     # int tensor [B]: valid samples after each crop


class CropDataset:
    """Random fixed-length crops at `sr` Hz, a pure function of (seed, index); map-style for DataLoader.

    sources: folders of audio, audio files, manifests (see read_manifest) or `prepare` shard folders,
        in any mix. Files are scanned once here (header reads, or the shard index).
    crop_samples: crop length at `sr` (120000 = 5 s for 95M, 122880 = 5.12 s for 330M at 24 kHz).
    min_seconds: shorter files are skipped (counted in `skipped_short`); those between min_seconds
        and the crop length are zero-padded at the end.
    weight: "duration" (file drawn with probability proportional to its length) or "file" (uniform);
        for ds[i] and sampling="duration" only (epoch sampling reads every file once an epoch).
    hop: crop starts are multiples of hop (320: the label frame, so labels align with the file's).
    context: (left, right) samples read around each crop by `example` (multiples of hop), for a
        teacher whose labels depend on audio outside the crop.
    codes: read each crop's precomputed acoustic codes from the shards (`prepare --codes`) instead of
        leaving them to a teacher: every source must be a shard folder holding codes of one teacher
        (shard_codes() tells), `hop` a multiple of the codes' hop; example() then adds "codes".
    on_bad: called once per unreadable file with "<path>: <problem>"; default prints it on stderr.
        Each DataLoader worker holds its own copy, so a file failing only at crop time may be named
        once per worker. Under a "spawn"/"forkserver" start method it must be picklable.
    progress: tqdm bar on stderr for the header scan (None: only for >= 500 files on a terminal).

    ds[i] (any int i >= 0; the index space is unbounded and there is no __len__) -> float32 tensor
    [crop_samples]. ds.crop(i) -> (numpy array, item, start) for inspection. ds.example(key) -> the
    dict a training batch is made of (see there); make_loader(..., sampling=...) batches them.
    """

    def __init__(self, sources, crop_samples: int, seed: int = 0, min_seconds: float = 3.0,
                 sr: int = SAMPLE_RATE, weight: str = "duration", on_bad=None, progress=None,
                 max_attempts: int = 1000, hop: int = 1, context: tuple = (0, 0), codes: bool = False):
        if isinstance(crop_samples, bool) or not isinstance(crop_samples, (int, np.integer)) or crop_samples <= 0:
            raise ValueError(f"crop_samples must be a positive int, got {crop_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if weight not in ("duration", "file"):
            raise ValueError(f"weight must be 'duration' or 'file', got {weight!r}")
        if isinstance(hop, bool) or not isinstance(hop, (int, np.integer)) or hop < 1:
            raise ValueError(f"hop must be an int >= 1, got {hop!r}")
        context = tuple(int(c) for c in context)
        if len(context) != 2 or any(c < 0 or c % hop for c in context):
            raise ValueError(f"context must be (left, right) samples >= 0, multiples of hop {hop}; got {context}")
        self.hop, self.context = int(hop), context
        self.crop_samples, self.seed, self.sr = int(crop_samples), int(seed), _check_rate("sr", sr)
        self.min_seconds, self.weight, self.max_attempts = float(min_seconds), weight, int(max_attempts)
        self.on_bad = on_bad
        self.bad_files: set[str] = set()
        self.skipped_short = 0
        min_len = math.ceil(self.min_seconds * self.sr)

        passed = []
        files, shard_dirs = _expand_sources(sources, skipped=passed)
        for path, reason in passed:  # .m4a and the like in a folder: named, never passed over in silence
            self._bad(str(path), f"{path}: {reason}")
        # Items: one row per usable file. kind 0 = raw file (ref into self.paths, header in
        # file_sr/frames), kind 1 = shard slice (ref into self.shard_files, at offset).
        kind, ref, offset, length, code_offset = [], [], [], [], []
        self.paths, file_sr, frames = [], [], []
        self.codes_info = None
        if codes:  # every source a shard folder with codes of one teacher, else no dataset
            infos = shard_codes(sources)
            lacking = [src for src, i in infos.items() if i is None]
            if lacking:
                raise AudioError(f"{lacking[0]}: holds no acoustic codes (make shards with: python audio.py prepare "
                                 f"SRC --out DIR --codes TEACHER_CKPT)")
            for src, i in infos.items():
                if self.codes_info is not None and codes_key(i) != codes_key(self.codes_info):
                    raise AudioError(f"{src}: holds {describe_codes(i)}, but {next(iter(infos))} holds "
                                     f"{describe_codes(self.codes_info)}; one run reads one teacher's codes")
                self.codes_info = i
            if self.hop % int(self.codes_info["hop"]):
                raise ValueError(f"hop {self.hop} is not a multiple of the codes' hop {self.codes_info['hop']}: "
                                 f"crops would not start on their frame grid")
        from tqdm import tqdm  # lazily: only the dataset needs it
        for f in tqdm(files, desc="scanning audio headers", unit="file", file=sys.stderr,
                      disable=(len(files) < 500 or None) if progress is None else not progress):
            try:
                fsr, n, _ = info(f)
                if n >= 1 << 42:  # libsndfile's "unknown length" (streams) is not a duration
                    raise AudioError(f"{f}: unknown length in header")
            except AudioError as e:
                self._bad(str(f), str(e))
                continue
            n_out = -(-n * self.sr // fsr)
            if n_out < min_len:
                self.skipped_short += 1
                continue
            kind.append(0), ref.append(len(self.paths)), offset.append(0), length.append(n_out), code_offset.append(-1)
            self.paths.append(str(f)), file_sr.append(fsr), frames.append(n)
        self.shard_files: list[str] = []
        self.code_files: list[str] = []                 # beside shard_files: its codes file, "" if none
        for d in shard_dirs:
            for shard, off, n, co in self._read_shard_index(d):
                if n < min_len:
                    self.skipped_short += 1
                    continue
                kind.append(1), ref.append(shard), offset.append(off), length.append(n), code_offset.append(co)

        self.kind = np.asarray(kind, np.int8)
        self.ref = np.asarray(ref, np.int64)
        self.offset = np.asarray(offset, np.int64)
        self.code_offset = np.asarray(code_offset, np.int64)  # the item's first code frame in its codes file, or -1
        self.length = np.asarray(length, np.int64)      # samples at sr
        self.file_sr = np.asarray(file_sr, np.int64)
        self.frames = np.asarray(frames, np.int64)
        if len(self.length) == 0:
            names = [sources] if isinstance(sources, (str, os.PathLike)) else sources
            raise AudioError(f"{', '.join(map(str, names))}: no usable audio ({self.skipped_short} files under {self.min_seconds:g} s, "
                             f"{len(self.bad_files)} unreadable)")
        self._set_weights()
        self._maps = {}                                   # shard memmaps, opened lazily per process

    def _set_weights(self) -> None:
        """Cumulative draw weights of the items (int64 [items]) for ds[i]: by duration, or one per file."""
        self._cum = np.cumsum(self.length if self.weight == "duration" else np.ones_like(self.length))

    # -- construction helpers
    def _bad(self, key: str, msg: str) -> None:
        if key not in self.bad_files:
            self.bad_files.add(key)
            (self.on_bad or _print_bad)(msg)

    def _read_shard_index(self, d: Path):
        """Yield (shard ref, offset, length, code offset or -1) of a shard folder's files; a broken shard's files
        are bad. With codes to read, a shard whose codes file is missing or short is broken too."""
        try:
            index = json.loads((d / "index.json").read_text())
            if index.get("format") != SHARD_FORMAT or index.get("sample_rate") != self.sr:
                raise ValueError(f"not {SHARD_FORMAT} at {self.sr} Hz "
                                 f"(format {index.get('format')!r}, {index.get('sample_rate')} Hz)")
            shards, entries = index["shards"], index["files"]
            codes = index.get("codes") if self.codes_info is not None else None
            code_names = codes["shards"] if codes else []
            ends, code_ends = {}, {}
            for _, shard, off, n, *rest in entries:
                if not (0 <= shard < len(shards) and off >= 0 and n >= 0):
                    raise ValueError(f"bad entry {[shard, off, n]}")
                ends[shard] = max(ends.get(shard, 0), off + n)
                if codes:  # [source, shard, offset, length, clipped, code offset]
                    code_ends[shard] = max(code_ends.get(shard, 0), rest[1] + -(-n // int(codes["hop"])))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise AudioError(f"{d / 'index.json'}: unusable shard index ({one_line(e)})") from None
        refs = []
        for k, name in enumerate(shards):
            refs.append(len(self.shard_files))
            self.shard_files.append(str(d / name))
            self.code_files.append(str(d / code_names[k]) if codes else "")
        broken = set()
        for shard, end in ends.items():  # a missing or short shard file would fail every read
            p = Path(self.shard_files[refs[shard]])
            size = p.stat().st_size if p.is_file() else -1
            if size < 2 * end:
                broken.add(shard)
                self._bad(str(p), f"{p}: missing or truncated shard ({max(size, 0)} of {2 * end} bytes)")
        for shard, end in code_ends.items():
            p = Path(self.code_files[refs[shard]])
            need = 2 * int(codes["n_q"]) * end
            size = p.stat().st_size if p.is_file() else -1
            if size < need and shard not in broken:
                broken.add(shard)
                self._bad(str(p), f"{p}: missing or truncated codes ({max(size, 0)} of {need} bytes)")
        for _, shard, off, n, *rest in entries:
            if shard not in broken:
                yield refs[shard], off, n, (rest[1] if codes else -1)

    def table(self) -> dict:
        """The items ds[i] draws from, as plain lists: saved with a run, so that use_table() can restore them."""
        return {"sr": self.sr, "kind": self.kind.tolist(), "ref": self.ref.tolist(), "offset": self.offset.tolist(),
                "length": self.length.tolist(), "file_sr": self.file_sr.tolist(), "frames": self.frames.tolist(),
                "paths": list(self.paths), "shard_files": list(self.shard_files),
                "code_offset": self.code_offset.tolist(), "code_files": list(self.code_files)}

    def use_table(self, t: dict) -> None:
        """Draw from a table() saved earlier: the same items whether they read now or not (a file gone
        bad fails when drawn and is redrawn, as mid-run), so a resumed run reads the same crops."""
        if t["sr"] != self.sr:
            raise ValueError(f"table at {t['sr']} Hz, dataset at {self.sr} Hz")
        self.kind, self.ref = np.asarray(t["kind"], np.int8), np.asarray(t["ref"], np.int64)
        self.offset, self.length = np.asarray(t["offset"], np.int64), np.asarray(t["length"], np.int64)
        self.file_sr, self.frames = np.asarray(t["file_sr"], np.int64), np.asarray(t["frames"], np.int64)
        self.paths, self.shard_files, self._maps = list(t["paths"]), list(t["shard_files"]), {}
        # tables saved before shards held codes have none
        self.code_offset = np.asarray(t.get("code_offset", [-1] * len(self.length)), np.int64)
        self.code_files = list(t.get("code_files", [""] * len(self.shard_files)))
        self._set_weights()

    # -- the crops
    def __getstate__(self):  # memmaps stay behind: each worker process opens its own
        return {**self.__dict__, "_maps": {}}

    @property
    def n_files(self) -> int:
        return len(self.length)

    @property
    def seconds(self) -> float:
        return float(self.length.sum()) / self.sr

    def __repr__(self):
        return (f"CropDataset({self.n_files} files, {self.seconds / 3600:.2f} h, crop {self.crop_samples} "
                f"at {self.sr} Hz, seed {self.seed}; skipped {self.skipped_short} short, "
                f"{len(self.bad_files)} unreadable)")

    def _map(self, path: str, need: int, what: str = "shard") -> np.memmap:
        """The int16 memmap of a shard (or codes) file, opened once per process; AudioError if it holds fewer
        than `need` bytes now. A file cut short after the start (full disk, a copy in progress) must fail here: a
        slice past a memmap's end would come back short (read as silence) or kill the process (SIGBUS)."""
        try:
            size = os.stat(path).st_size
        except OSError as e:
            raise AudioError(f"{path}: unreadable {what} ({one_line(e)})") from None
        if size < need:
            self._maps.pop(path, None)
            raise AudioError(f"{path}: missing or truncated {what} ({size} of {need} bytes)")
        m = self._maps.get(path)
        if m is None:
            try:
                m = self._maps[path] = np.memmap(path, dtype="<i2", mode="r")
            except (OSError, ValueError) as e:
                raise AudioError(f"{path}: unreadable {what} ({one_line(e)})") from None
        return m

    def _read(self, item: int, start: int, n: int | None = None) -> np.ndarray:
        """Samples [start, start + n) of an item (n: the crop length), shorter at the item's end."""
        n = self.crop_samples if n is None else n
        if self.kind[item] == 1:
            m = self._map(self.shard_files[self.ref[item]], 2 * int(self.offset[item] + self.length[item]))
            a = int(self.offset[item]) + start
            b = int(self.offset[item]) + min(start + n, int(self.length[item]))
            return m[a:b].astype(np.float32) * np.float32(1 / 32768)
        r = self.ref[item]
        header = (int(self.file_sr[r]), int(self.frames[r]), 1)
        return load_crop(self.paths[r], start, n, sr=self.sr, header=header)

    def _read_codes(self, item: int, start: int, L: int) -> np.ndarray:
        """The item's whole-file codes of the crop [start, start + L): int64 [n_q, ceil(L / hop)], frame t of the
        crop being the file's frame start / hop + t (starts lie on the grid); zeros past the file's last frame."""
        hop, n_q = int(self.codes_info["hop"]), int(self.codes_info["n_q"])
        have = -(-int(self.length[item]) // hop)            # the file's code frames
        f0, nf = start // hop, -(-L // hop)
        f1 = min(f0 + nf, have)
        co = int(self.code_offset[item])
        m = self._map(self.code_files[self.ref[item]], 2 * n_q * (co + have), "codes")
        out = np.zeros((n_q, nf), np.int64)
        out[:, :f1 - f0] = m[(co + f0) * n_q:(co + f1) * n_q].reshape(-1, n_q).T  # stored frame-major
        return out

    def crop(self, i: int):
        """(crop float32 [crop_samples], item, start) of global index i."""
        region, item, start, a = self._draw(i, (0, 0))
        C = self.crop_samples
        if len(region) < C:  # file shorter than the crop: zeros at the end
            region = np.concatenate([region, np.zeros(C - len(region), np.float32)])
        return region, item, start

    def _draw(self, i: int, context: tuple) -> tuple:
        """(samples [a, b) of the item, item, start, a) for index i: the crop plus what exists of context."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise IndexError(f"CropDataset index must be an int >= 0, got {i!r}")
        rng = np.random.default_rng([self.seed, int(i)])
        total, C = int(self._cum[-1]), self.crop_samples
        for _ in range(self.max_attempts):
            # Two uniforms per attempt, whatever happens: a redraw after a failed read continues the
            # same stream, so the outcome depends only on which reads fail, never on history.
            u_item, u_start = rng.random(2)
            item = min(int(np.searchsorted(self._cum, u_item * total, side="right")), len(self._cum) - 1)
            n = int(self.length[item])
            start = int(u_start * ((n - C) // self.hop + 1)) * self.hop if n > C else 0  # on the hop grid
            try:
                region, a = self._read_around(item, start, C, context)
                return region, item, start, a
            except AudioError as e:
                self._bad(self._source(item), str(e))
        raise AudioError(f"index {i}: {self.max_attempts} crop reads failed in a row "
                         f"({len(self.bad_files)} unreadable files); is the data readable?")

    def __getitem__(self, i):
        import torch
        return torch.from_numpy(self.crop(i)[0])

    def example(self, key) -> dict:
        """One training example, with self.context = (left, right) samples of context around the crop.

        key: an int i (the crop of ds.crop(i); a file shorter than the crop is zero-padded) or
        (epoch, item, L) from EpochBatches (a crop of L samples of that item, its start drawn on the
        hop grid from (seed, epoch, item)). Returns {"audio": float32 tensor [left + L + right], the
        crop at [left, left + L) and its context around it, zeros where the file has none; "length":
        valid crop samples; "left", "right": valid context samples (fewer near the file's ends); "item",
        "start": where the crop comes from (the file is ds.paths[ds.ref[item]] for raw files); with codes=True
        also "codes": int64 [n_q, ceil(L / hop)], the whole file's codes of the crop (_read_codes)}.
        """
        if isinstance(key, (int, np.integer)):
            region, item, start, a = self._draw(int(key), self.context)
            L = self.crop_samples
        else:
            region, item, start, a, L = self._draw_epoch(*(int(v) for v in key))
        return self._pack(region, start, a, L, item)

    def example_at(self, item: int, start: int, length: int | None = None) -> dict:
        """The example dict of the crop of `length` samples (default: the crop length) of an item at `start`,
        with its context, as a training batch would hold it (`python teachers.py labels` reads it)."""
        L = self.crop_samples if length is None else int(length)
        n = int(self.length[item])
        if not 0 <= start < n:
            raise ValueError(f"start {start} is outside the item's {n} samples")
        region, a = self._read_around(item, start, L, self.context)
        return self._pack(region, start, a, L, item)

    def _read_around(self, item: int, start: int, L: int, context: tuple) -> tuple:
        """(samples [a, b) of the item, a): the crop [start, start + L) and what exists of context around it."""
        n = int(self.length[item])
        a, b = max(0, start - context[0]), min(n, start + L + context[1])
        return self._read(item, a, b - a), a

    def _pack(self, region: np.ndarray, start: int, a: int, L: int, item: int) -> dict:
        import torch
        left, right = self.context
        valid = min(L, len(region) - (start - a))
        out = np.zeros(left + L + right, np.float32)
        out[left - (start - a): left - (start - a) + len(region)] = region
        ex = {"audio": torch.from_numpy(out), "length": valid, "left": start - a,
              "right": len(region) - (start - a) - valid, "item": int(item), "start": int(start)}
        if self.codes_info is not None:
            ex["codes"] = torch.from_numpy(self._read_codes(item, start, L))
        return ex

    def _draw_epoch(self, epoch: int, item: int, L: int) -> tuple:
        """(region, item, start, a, L) of an epoch's crop: start on the hop grid, drawn from (seed, epoch, item).

        An unreadable item is named and replaced by another item at least L long, drawn from the same
        generator (MERT's dataset also moves on to a random other file)."""
        rng = np.random.default_rng([self.seed, epoch, item, 1])
        for _ in range(self.max_attempts):
            start = int(rng.integers(0, (int(self.length[item]) - L) // self.hop + 1)) * self.hop
            try:
                region, a = self._read_around(item, start, L, self.context)
                return region, item, start, a, L
            except AudioError as e:
                self._bad(self._source(item), str(e))
            fits = np.flatnonzero(self.length >= L)
            item = int(fits[rng.integers(0, len(fits))])
        raise AudioError(f"epoch {epoch}: {self.max_attempts} crop reads failed in a row "
                         f"({len(self.bad_files)} unreadable files); is the data readable?")

    def _source(self, item: int) -> str:
        return self.shard_files[self.ref[item]] if self.kind[item] == 1 else self.paths[self.ref[item]]


# ---------------------------------------------------------------------------------------------
# Which global indices each rank reads, and the DataLoader around it
# ---------------------------------------------------------------------------------------------
class RankBatches:
    """Batch sampler: batch k (k = 0, 1, ... from `start`) of rank r of W holds the global indices

        [start + (k*W + r)*b,  start + (k*W + r + 1)*b)

    so the W ranks together read the contiguous block [start + k*W*b, start + (k+1)*W*b) and nothing
    twice. With gradient accumulation A, optimizer step s covers batches k = s*A .. s*A + A-1; a run
    resumed at step s passes start = s*A*W*b (the "data position") and reads what it would have read.
    num_batches=None: endless.
    """

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, start: int = 0,
                 num_batches: int | None = None):
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size or start < 0:
            raise ValueError(f"bad RankBatches(batch_size={batch_size}, rank={rank}, "
                             f"world_size={world_size}, start={start})")
        self.b, self.rank, self.world, self.start, self.num_batches = batch_size, rank, world_size, start, num_batches

    def __iter__(self):
        k = 0
        while self.num_batches is None or k < self.num_batches:
            yield self._batch(k * self.world + self.rank)
            k += 1

    def _batch(self, j: int) -> list:
        """The j-th global batch from `start`: its indices."""
        first = self.start + j * self.b
        return list(range(first, first + self.b))

    def __len__(self):
        if self.num_batches is None:
            raise TypeError(f"an endless {type(self).__name__} has no length")
        return self.num_batches


class EpochBatches(RankBatches):
    """Batch sampler with MERT's epoch semantics: every epoch each file gives one crop.

    The files are ordered by their whole length, longest first, ties in a random order drawn from the
    seed (MERT's ordered_indices), and that order is cut into batches of b files, each cut to its
    shortest clip (MERT's collater with pad_audio=False: no padding), so files shorter than the crop
    share batches. As in fairseq (get_batch_iterator seeds ordered_indices with the run's seed, not the
    epoch) the groups are the same every epoch; epoch e shuffles their order (seed, e) and draws new
    crops. The last batch may hold fewer files.

    Global batch g = e * per_epoch + j; rank r of W takes batches g = start / b + k*W + r (k = 0, 1,
    ...), as RankBatches does, and yields the keys [(e, item, L), ...] that CropDataset.example reads.
    `start` counts in units of b (global batch index x b) as RankBatches' does, so train.py passes the
    same number for either sampling.
    """

    def __init__(self, dataset: CropDataset, batch_size: int, rank: int = 0, world_size: int = 1, start: int = 0,
                 num_batches: int | None = None):
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size or start < 0 or start % batch_size:
            raise ValueError(f"bad EpochBatches(batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                             f"start={start}): start must be a multiple of batch_size")
        super().__init__(batch_size, rank, world_size, start, num_batches)
        self.ds = dataset
        self.sizes = np.minimum(dataset.length, dataset.crop_samples)   # what a file can give a batch
        self.per_epoch = -(-len(self.sizes) // batch_size)
        tie = np.random.default_rng([dataset.seed, 2]).random(len(self.sizes))
        order = np.lexsort((tie, -dataset.length))                         # longest first, random among equals
        self.batches = [(order[i:i + batch_size], int(self.sizes[order[i:i + batch_size]].min()))
                        for i in range(0, len(order), batch_size)]         # (items, crop length L)
        self._plan = (None, None)

    def plan(self, epoch: int) -> list:
        """The batches of an epoch, in the order they are read: [(items int64 [<= b], crop length L), ...]."""
        if self._plan[0] != epoch:
            perm = np.random.default_rng([self.ds.seed, epoch, 3]).permutation(len(self.batches))
            self._plan = (epoch, [self.batches[j] for j in perm])
        return self._plan[1]

    def keys(self, g: int) -> list:
        """Keys of global batch g: [(epoch, item, L), ...]."""
        epoch, j = divmod(g, self.per_epoch)
        items, L = self.plan(epoch)[j]
        return [(epoch, int(it), L) for it in items]

    def _batch(self, j: int) -> list:
        """The j-th global batch from `start` (which counts clips, a multiple of b): its example keys."""
        return self.keys(self.start // self.b + j)


class _Examples:
    """Map-style view of a CropDataset whose items are `example(key)` dicts (what the training loader batches)."""

    def __init__(self, dataset: CropDataset):
        self.dataset = dataset

    def __getitem__(self, key):
        return self.dataset.example(key)


def limit_blas_threads(n: int) -> None:
    """Set the BLAS thread count of this process (already-loaded OpenBLAS/MKL), best effort."""
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n)
        return
    except ImportError:
        pass
    import ctypes
    try:
        libs = {ln.split()[-1] for ln in open("/proc/self/maps") if "openblas" in ln.lower() and ".so" in ln}
    except OSError:
        return
    for lib in libs:
        for name in ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                     "openblas_set_num_threads64_", "scipy_openblas_set_num_threads"):
            fn = getattr(ctypes.CDLL(lib), name, None)
            if fn is not None:
                fn(n)
                break


def worker_init(worker_id: int = 0, ignore_signals: bool = False) -> None:
    """DataLoader worker_init_fn: one thread per worker process (no BLAS/torch oversubscription). ignore_signals: the
    worker ignores SIGTERM and SIGINT, which Slurm, torchrun and a terminal's Ctrl-C send the whole process group,
    so that the training process decides when to stop and shuts its workers down itself (close_loader)."""
    if ignore_signals:
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"  # for anything the worker starts; the loaded libraries are set below
    import torch
    torch.set_num_threads(1)
    limit_blas_threads(1)


def make_loader(dataset, batch_size: int, start: int = 0, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, num_batches: int | None = None, pin_memory: bool = False,
                sampling: str | None = None, ignore_signals: bool = False):
    """DataLoader from global position `start` (batches x batch_size); ignore_signals: see worker_init.

    sampling None: RankBatches of ds[i], float32 [batch_size, crop_samples]. "duration" (RankBatches)
    or "epoch" (EpochBatches): batches of CropDataset.example dicts, {"audio": [B, left + L + right],
    "length", "left", "right": [B]}.
    """
    import torch
    if sampling not in (None, "duration", "epoch"):
        raise ValueError(f"sampling must be None, 'duration' or 'epoch', got {sampling!r}")
    sampler = EpochBatches(dataset, batch_size, rank, world_size, start, num_batches) if sampling == "epoch" \
        else RankBatches(batch_size, rank, world_size, start, num_batches)
    return torch.utils.data.DataLoader(
        dataset if sampling is None else _Examples(dataset), batch_sampler=sampler,
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
        worker_init_fn=functools.partial(worker_init, ignore_signals=ignore_signals) if num_workers > 0 else None)


def close_loader(dl) -> None:
    """Stop a DataLoader's worker processes now (they exit when told). Needed on the way out with an exception
    (SIGTERM's exit 75, a crash): the traceback keeps the loader alive until interpreter exit, where multiprocessing
    would SIGTERM workers that ignore it (worker_init's ignore_signals), and wait."""
    it = getattr(dl, "_iterator", None)  # a persistent-workers DataLoader keeps its iterator here
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()


# ---------------------------------------------------------------------------------------------
# prepare: decode a collection once into 24 kHz int16 shards
#
#   DIR/shard-00000.bin   int16 little-endian, files back to back (never split across shards)
#   DIR/shard-00000.json  {"format", "sample_rate", "files": [[source, shard, offset, length, clipped]]}
#   DIR/index.json        {"format", "sample_rate", "dtype", "scale", "shards": [...], "files": [...]}
#
# With --codes TEACHER_CKPT each file's whole-file acoustic codes go beside its audio (MERT's offline codes):
#
#   DIR/shard-00000.codes.bin  int16 little-endian [frames, n_q] per file (frame-major: a crop is one slice),
#                              ceil(length / hop) frames, files back to back in the order of the audio
#   files entries gain a 6th field, the file's first code frame; shard .json and index.json gain
#   "codes": {"teacher": {"file", "sha256", "kind"}, "n_q", "codebook_size", "hop", "frame_rate", "dtype",
#             "context_seconds", "chunk_seconds", "shards": [codes files]} (index.json only: "shards")
#
# A shard is written as *.tmp and renamed when full; its .json (renamed last) marks it complete.
# A re-run keeps complete shards, deletes leftover *.tmp, converts only the sources not yet in a
# shard and rewrites index.json: safe after a crash, and appends new files to a grown collection.
# ---------------------------------------------------------------------------------------------
def _prepare_one(job):
    """Worker: (source, sr, min_len) -> (source, int16 samples or None, clipped, status message)."""
    path, sr, min_len = job
    try:
        fsr, frames, _ = info(path)
        if -(-frames * sr // fsr) < min_len:  # short: skip before decoding
            return path, None, 0, "short"
        x = load(path, sr=sr)
    except AudioError as e:
        return path, None, 0, str(e)
    if len(x) < min_len:
        return path, None, 0, "short"
    y = np.rint(x * np.float32(32768))
    clipped = int(np.count_nonzero((y > 32767) | (y < -32768)))
    return path, np.clip(y, -32768, 32767).astype("<i2"), clipped, ""


def _file_codes(codes, info: dict, path: str, y: np.ndarray) -> tuple[str, np.ndarray | None]:
    """("", int16 [frames, n_q]) of the coder on the stored samples y, or (the problem, None)."""
    try:
        c = np.asarray(codes(y.astype(np.float32) * np.float32(1 / 32768)))
    except (RuntimeError, ValueError, MemoryError) as e:  # e.g. out of GPU memory on a very long file
        return f"{path}: acoustic codes failed ({one_line(e)})", None
    want = (-(-len(y) // int(info["hop"])), int(info["n_q"]))
    if c.shape != want or (c.size and (c.min() < 0 or c.max() >= int(info["codebook_size"]))):
        return (f"{path}: the coder gave codes of shape {c.shape}, expected {want} in "
                f"0..{info['codebook_size'] - 1}"), None
    return "", np.ascontiguousarray(c, dtype="<i2")


def codes_key(info: dict | None):
    """What makes two shard folders' (or a run's) codes the same: the teacher file's hash, n_q, codebook size and hop."""
    if not info:
        return None
    return (info.get("teacher", {}).get("sha256"), int(info["n_q"]), int(info["codebook_size"]), int(info["hop"]))


def describe_codes(info: dict | None) -> str:
    """One phrase naming a shard folder's codes: the teacher file, its hash prefix and the code shape."""
    if not info:
        return "no acoustic codes"
    t = info.get("teacher", {})
    return (f"codes of teacher {t.get('file', '?')} (sha256 {str(t.get('sha256', '?'))[:12]}), n_q {info['n_q']} x "
            f"{info['codebook_size']} codes")


def shard_codes(sources) -> dict:
    """{source: the "codes" record of its index.json, or None} for each of the sources (a folder, file or
    manifest that is not a shard folder has none); read without opening any shard."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out = {}
    for s in map(Path, sources):
        info = None
        if _is_shard_dir(s):
            try:
                info = json.loads((s / "index.json").read_text()).get("codes") or None
            except (OSError, ValueError, AttributeError) as e:
                raise AudioError(f"{s / 'index.json'}: unusable shard index ({one_line(e)})") from None
        out[str(s)] = info
    return out


def match_shard_codes(sources, want: dict | None, label: str, note=None) -> bool:
    """True if every source is a shard folder holding the acoustic codes `want` describes (teacher file and SHA-256,
    n_q, codebook size, hop: codes_key), False if none holds codes (or want is None: the caller runs no acoustic
    teacher, and codes found are said through `note`, default stderr). A mix of sources with and without codes, or
    codes of another teacher, raise ValueError naming the source, both descriptions and `label` (the flag); an
    unreadable index raises AudioError."""
    infos = shard_codes(sources)
    have = {s: i for s, i in infos.items() if i}
    if not have:
        return False
    first = next(iter(have))
    if want is None:
        (note or functools.partial(print, file=sys.stderr))(
            f"{first} holds {describe_codes(have[first])}; not used, as no acoustic teacher runs")
        return False
    lacking = [s for s, i in infos.items() if not i]
    if lacking:
        raise ValueError(f"{label} mixes shards with acoustic codes ({first}) and sources without ({lacking[0]}); "
                         f"prepare them all with --codes, or none")
    for s, info in have.items():
        if codes_key(info) != codes_key(want):
            raise ValueError(f"{s} holds {describe_codes(info)}, but {label} asks for {describe_codes(want)}; prepare "
                             f"the shards again with --codes {want['teacher']['file']} --n_q {want['n_q']}, or run "
                             f"with the teacher they were made with")
    return True


def _prepare_worker_init():
    import signal  # Ctrl-C reaches the whole process group: the parent stops the pool and says so, once
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_blas_threads(1)


def write_json(path: Path, obj, indent: int | None = None) -> None:
    """json.dumps(obj) to path via path.tmp and a rename: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent))
    os.replace(tmp, path)


def prepare(sources, out, shard_bytes: int = 10**9, min_seconds: float = 3.0, sr: int = SAMPLE_RATE,
            workers: int = 1, on_bad=None, progress=None, codes=None) -> dict:
    """Convert audio files (folders, files, manifests) into shards under `out`; see the notes above.

    codes: None, or a coder that stores each file's acoustic codes beside its audio: `codes.info` (a JSON-able
    dict with at least "n_q", "codebook_size" and "hop", recorded in the index) and `codes(wav)` (float32 [n]
    at `sr`, the int16 audio as stored / 32768 -> int [ceil(n / hop), n_q]); `audio.py prepare --codes` builds
    one from a teacher checkpoint (teachers.FileCoder). A coder failing on a file names it as bad.

    Returns a summary dict: files, seconds, shards, new (files converted by this call), short,
    bad (names of unreadable files), clipped_files.
    """
    sr, out = _check_rate("sr", sr), Path(out)
    info = None if codes is None else dict(codes.info)
    if info is not None and int(info["codebook_size"]) > 32768:
        raise ValueError(f"codes of {info['codebook_size']} per codebook do not fit int16")
    passed = []
    files, shard_dirs = _expand_sources(sources, skipped=passed)
    if shard_dirs:
        raise AudioError(f"{shard_dirs[0]}: already a shard folder (prepare reads audio files)")
    if not files and not passed and not (out / "index.json").exists():  # nothing to do: make nothing
        raise AudioError(f"{', '.join(map(str, sources))}: no audio files ({' '.join(sorted(AUDIO_EXTENSIONS))})")
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob("*.tmp"):
        tmp.unlink()
    # complete shards from an earlier run
    done, entries, next_shard = set(), [], 0
    for meta in sorted(out.glob("shard-*.json")):
        bin_path = meta.with_suffix(".bin")
        codes_path = meta.with_suffix(".codes.bin")
        try:
            m = json.loads(meta.read_text())
            size = bin_path.stat().st_size
            complete = size == 2 * sum(e[3] for e in m["files"])
            if m.get("codes"):
                c = m["codes"]
                complete &= codes_path.stat().st_size == 2 * c["n_q"] * sum(-(-e[3] // c["hop"]) for e in m["files"])
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            complete = False
        if not complete:  # damaged since it was written: drop it, its files are converted again
            meta.unlink()
            bin_path.unlink(missing_ok=True)
            codes_path.unlink(missing_ok=True)
            continue
        if m.get("format") != SHARD_FORMAT or m.get("sample_rate") != sr:
            raise AudioError(f"{meta}: written with other settings ({m.get('format')}, "
                             f"{m.get('sample_rate')} Hz); use a fresh --out")
        if codes_key(m.get("codes")) != codes_key(info):
            raise AudioError(f"{meta}: written with {describe_codes(m.get('codes'))}, this call asks for "
                             f"{describe_codes(info)}; use a fresh --out")
        shard = int(meta.stem.split("-")[1])
        entries += m["files"]
        done.update(e[0] for e in m["files"])
        next_shard = max(next_shard, shard + 1)
    jobs, min_len = [], math.ceil(min_seconds * sr)
    for f in dict.fromkeys(os.path.abspath(f) for f in files):  # absolute, de-duplicated, in order
        if f not in done:
            jobs.append((f, sr, min_len))

    bad, short, new = [], 0, 0
    for path, reason in passed:  # .m4a and the like in a folder: named and counted as bad, never passed over
        bad.append(str(path))
        (on_bad or _print_bad)(f"{path}: {reason}")
    shard, fh, pos, current = next_shard, None, 0, []
    cfh, cpos = None, 0  # the shard's codes file and its frame count

    def close():
        nonlocal fh, shard, pos, current, cfh, cpos
        if fh is None:
            return
        fh.close()
        name = f"shard-{shard:05d}"
        os.replace(out / f"{name}.bin.tmp", out / f"{name}.bin")
        meta = {"format": SHARD_FORMAT, "sample_rate": sr, "files": current}
        if cfh is not None:
            cfh.close()
            os.replace(out / f"{name}.codes.bin.tmp", out / f"{name}.codes.bin")
            meta["codes"] = info
        write_json(out / f"{name}.json", meta)  # last: marks the shard complete
        entries.extend(current)
        shard, fh, pos, current, cfh, cpos = shard + 1, None, 0, [], None, 0

    from tqdm import tqdm
    pool = None
    try:
        if jobs:
            # Worker processes even for workers=1: each runs BLAS on one thread, and the resampler's float32
            # matmuls round differently under other thread counts (seen on AVX2 OpenBLAS), so the shards'
            # bytes would otherwise depend on `workers`. imap keeps the order for the same reason.
            import multiprocessing
            pool = multiprocessing.get_context().Pool(max(1, workers), initializer=_prepare_worker_init)
            results = pool.imap(_prepare_one, jobs)
        else:
            results = iter(())
        for path, y, clipped, msg in tqdm(results, total=len(jobs), desc="prepare", unit="file",
                                          file=sys.stderr, disable=None if progress is None else not progress):
            if msg == "short":
                short += 1
                continue
            if not msg and codes is not None:  # the codes of what the shard stores, as training will read it
                msg, c = _file_codes(codes, info, path, y)
            if msg:
                bad.append(path)
                (on_bad or _print_bad)(msg)
                continue
            if fh is not None and 2 * (pos + len(y)) > shard_bytes:
                close()
            if fh is None:
                fh = open(out / f"shard-{shard:05d}.bin.tmp", "wb")
                if codes is not None:
                    cfh = open(out / f"shard-{shard:05d}.codes.bin.tmp", "wb")
            fh.write(y.tobytes())
            current.append([path, shard, pos, len(y), clipped])
            if codes is not None:
                cfh.write(c.tobytes())
                current[-1].append(cpos)
                cpos += len(c)
            pos += len(y)
            new += 1
        close()
    finally:
        if pool is not None:
            pool.terminate()
        if fh is not None:  # interrupted: the partial shard is dropped, a re-run redoes its files
            fh.close()
            (out / f"shard-{shard:05d}.bin.tmp").unlink(missing_ok=True)
        if cfh is not None:
            cfh.close()
            (out / f"shard-{shard:05d}.codes.bin.tmp").unlink(missing_ok=True)
    shards = sorted({e[1] for e in entries})
    names = [f"shard-{s:05d}.bin" for s in range(max(shards, default=-1) + 1)]
    index = {"format": SHARD_FORMAT, "sample_rate": sr, "dtype": "int16", "scale": 32768, "shards": names,
             "files": entries}
    if info is not None:
        index["codes"] = {**info, "shards": [n.replace(".bin", ".codes.bin") for n in names]}
    write_json(out / "index.json", index)
    return {"files": len(entries), "seconds": sum(e[3] for e in entries) / sr, "shards": len(shards),
            "new": new, "short": short, "bad": bad, "clipped_files": sum(e[4] > 0 for e in entries)}


# ---------------------------------------------------------------------------------------------
# Command line: python audio.py FILE... prints each file's rate, duration and channels
# ---------------------------------------------------------------------------------------------
def prepare_main(argv) -> int:
    """python audio.py prepare SRC... --out DIR: exit 0, or 1 if some inputs were unreadable."""
    p = argparse.ArgumentParser(
        prog="audio.py prepare",
        description="Convert audio (any format/rate soundfile reads) once into 24 kHz mono int16 shards "
                    "that CropDataset reads by memory map. Files under --min_seconds are skipped; "
                    "unreadable ones are named on stderr. Safe to re-run: finished shards are kept and "
                    "only sources not yet converted are added.",
        epilog="examples: python audio.py prepare music/ more.txt --out shards/ --workers 4\n"
               "          python audio.py prepare music/ --out shards/ --codes encodec_24khz-d7cc33bc.th\n"
               "--codes stores each file's whole-file acoustic codes beside its audio (MERT's offline codes): "
               "train.py --data shards/ --acoustic_ckpt SAME_CKPT then reads them instead of running the teacher.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sources", nargs="+", help="folders of audio, audio files and/or manifests (one path a line)")
    p.add_argument("--out", required=True, help="shard folder to create or extend")
    p.add_argument("--shard_gb", "--shard-gb", type=float, default=1.0, help="shard size in GB (1 GB = 5.8 h of audio)")
    p.add_argument("--workers", type=int, default=1, help="decoding processes")
    p.add_argument("--min_seconds", "--min-seconds", type=float, default=3.0, help="skip files shorter than this")
    p.add_argument("--codes", default=None, metavar="TEACHER_CKPT",
                   help="also store each file's acoustic codes from this teacher (an rvq.py or EnCodec 24 kHz "
                        "checkpoint, as train.py --acoustic_ckpt)")
    p.add_argument("--n_q", "--n-q", type=int, default=8, help="--codes: codebooks to store, as train.py --n_q")
    p.add_argument("--device", default="auto", help="--codes: where the teacher runs: auto (cuda if present), cpu, "
                                                    "cuda")
    p.add_argument("--codes_chunk", "--codes-chunk", type=float, default=60.0,
                   help="--codes: seconds of a file encoded at a time (bounds memory), each chunk with "
                        "--codes_context seconds of audio before it")
    p.add_argument("--codes_context", "--codes-context", type=float, default=10.0,
                   help="--codes: seconds before each chunk that an LSTM teacher encodes first, as train.py "
                        "--acoustic_context (the convolutions' reach is always added exactly)")
    args = p.parse_args(argv)
    if args.shard_gb <= 0 or args.workers < 1 or args.min_seconds < 0:
        p.error("--shard_gb must be > 0, --workers >= 1, --min_seconds >= 0")
    if args.codes_chunk < 1 or args.codes_context < 0 or args.n_q < 1:
        p.error("--codes_chunk must be >= 1 s, --codes_context >= 0 s, --n_q >= 1")
    problem = output_problem(args.out, folder=True)
    if problem:  # before any decoding
        print(f"audio.py prepare: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    coder = None
    if args.codes is not None:
        import teachers  # the project's teacher, only for --codes: audio.py alone needs nothing of the project
        try:
            coder = teachers.FileCoder(args.codes, n_q=args.n_q, device=args.device, chunk_seconds=args.codes_chunk,
                                       context_seconds=args.codes_context)
        except Exception as e:  # a missing, foreign or damaged checkpoint (torch.load raises many kinds): one line
            print(f"audio.py prepare: --codes {args.codes}: {one_line(e)}", file=sys.stderr)
            return 2
    try:
        s = prepare(args.sources, args.out, shard_bytes=int(args.shard_gb * 1e9), min_seconds=args.min_seconds,
                    workers=args.workers, codes=coder)
    except AudioError as e:
        print(e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the partial shard was dropped; finished shards stay and a rerun adds the rest
        print(f"audio.py prepare: interrupted (Ctrl-C); {args.out} holds only complete shards, rerun to finish",
              file=sys.stderr)
        return 130
    except OSError as e:  # a full disk
        print(f"audio.py prepare: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"{args.out}: {s['files']} files, {s['seconds'] / 3600:.2f} h in {s['shards']} shards "
          f"({s['new']} added now; skipped {s['short']} under {args.min_seconds:g} s, {len(s['bad'])} unreadable; "
          f"{s['clipped_files']} files clipped to int16)" + (f"; {describe_codes(coder.info)}" if coder else ""))
    return 1 if s["bad"] else 0


def main(argv=None) -> int:
    """Print each audio file's header (or its error); exit 1 if any failed. `prepare` makes shards."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prepare"]:  # a file literally named "prepare" can be given as ./prepare
        return prepare_main(argv[1:])
    p = argparse.ArgumentParser(
        description="Show sample rate, duration and channels of audio files (what audio.load reads).",
        epilog="example: python audio.py song.mp3 music_dir/ --check\n"
               "         python audio.py prepare music_dir/ --out shards/   (see: python audio.py prepare -h)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", help="audio files and/or folders (folders are searched recursively)")
    p.add_argument("--check", action="store_true",
                   help="also decode every sample (finds corrupt data and NaN/inf that a header read misses)")
    args = p.parse_args(argv)

    failed = 0
    for arg in args.paths:
        try:
            files = find_audio([arg])
        except AudioError as e:
            print(e, file=sys.stderr)
            failed += 1
            continue
        if not files:
            print(f"{arg}: no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))})", file=sys.stderr)
        for f in files:
            try:
                sr, frames, channels = info(f)
                if args.check:
                    load(f, sr=sr)
            except AudioError as e:
                print(e, file=sys.stderr)
                failed += 1
                continue
            print(f"{f}: {sr} Hz, {frames / sr:.2f} s, {channels} ch")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
