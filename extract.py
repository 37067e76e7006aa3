"""Extract MERT features from audio files: one .npy per input, named after it, with a record of what made it.

    python extract.py song.wav                         # -> song.npy beside it: [layers, frames, dim] float32
    python extract.py music/ -o feats/ --layers 4-8 --pool mean   # -> feats/<sub/dirs>/<stem>.npy: [layers, dim]

Any format soundfile reads, any sample rate or channel count (mixed to mono, resampled to 24 kHz).
--ckpt picks the model by its checkpoint: a config.json with model_type "mert2" loads MERT-v2 (mert2.py), anything
else MERT-v1 (mert.py; a fairseq file through convert.py). A file that fits in one --chunk runs whole, every
sample, as the reference code runs it (default --chunk: 30 s; MERT-v2: the longest input it was trained on, 30 s
for MERT-v2-30s, 360 s for FullSong). Longer files run in chunks overlapping by --overlap, the last one running to
the end of the file; each output frame comes from the chunk where it lies furthest from an edge, so frames and
timestamps are the whole file's: MERT-v1 frame t covers samples [320 t, 320 t + 400) at 24 kHz (75 Hz, centre
320 t + 200); MERT-v2 frame t is centred on sample 960 t + 360 (25 Hz; it sees the whole input, docs/mert2.md).
With --chunk_stats file (default, MERT-v1 only) every chunk's GroupNorm after conv 0 takes the whole file's
statistics, as one forward would; attention sees the chunk only (MERT-v2 has no such statistics: its GRN layers
and attention see the chunk only).

      file  |------------------------------------------------------------------|
      chunk |==========keep======|~~~~|                        overlap ~~, boundary at its middle
      chunk              |~~~~|======keep=======|~~~~|
      chunk                                |~~~~|=========keep====(to the end)=|

song.npy.json beside each output records what made it (model fingerprint, settings, frame grid, the input's
size, time, hash): a rerun skips outputs made the same way, recomputes those whose input changed, and refuses (exit 2)
to replace outputs made another way unless --overwrite. Arrays are written to song.npy.tmp and renamed after
their record, so a killed run leaves no partial song.npy. Bad inputs are named on stderr and skipped: exit 1
when any failed, 2 on usage errors (no input at all included).
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import audio
import mert2
from mert import MERT, CheckpointError, NeedsConvert

# The model extract.py uses when --ckpt is not given: a small model pretrained by this repository's own
# pipeline on freely licensed music, shipped with it (README, "The shipped model").
DEFAULT_CKPT = Path(__file__).resolve().parent / "models" / "mert_default.pt"
NO_DEFAULT_MSG = (
    "no --ckpt given and the shipped default model {path} is missing (copy models/ along with extract.py).\n"
    "Or name a model: the official weights from your local Hugging Face cache, e.g. --ckpt m-a-p/MERT-v1-95M\n"
    "(fetch once with `hf download m-a-p/MERT-v1-95M`, or `huggingface-cli download m-a-p/MERT-v1-95M` with an\n"
    "older huggingface_hub), a folder with config.json and pytorch_model.bin / model.safetensors, a fairseq MERT\n"
    ".pt, or a checkpoint written by train.py.")

# The extraction convention, recorded with every output; raise it when the same settings would give other
# numbers. 1: the tail past the last whole frame was dropped (no records were written then). 2: whole
# files and last chunks run to the end of the file; chunks take the file's GroupNorm statistics.
EXTRACT_VERSION = 2
# Config fields that do not change what an eval-mode forward computes: left out of the model fingerprint,
# so a training checkpoint and its exported encoder count as the same model.
_TRAINING_ONLY = {"dropout", "attn_dropout", "act_dropout", "layerdrop", "conv_grad_mult", "attn_impl", "attn_relax",
                  "n_codebooks", "codebook_size", "final_dim", "logit_temp", "cqt_bins", "cqt_weight",
                  "feature_penalty", "unmasked_weight", "mask_prob", "mask_length", "min_masks"}
_HEADS = ("final_proj.", "label_embs", "cqt_head.", "masked_spec_embed")
# The settings that decide an output's numbers; an existing output whose record differs in any is not reused.
SETTINGS = ("version", "model", "layers", "pool", "chunk", "overlap", "chunk_stats", "normalize", "dtype")


class OutputConflict(ValueError):
    """Existing outputs were made another way (other model or settings, or without a record)."""


def parse_layers(spec: str, n_states: int) -> list[int]:
    """'all' | '6' | '4-8' | '0,6,12' | '-1' -> sorted hidden-state indices in 0..n_states-1."""
    if spec == "all":
        return list(range(n_states))
    out = set()
    for part in spec.split(","):
        part = part.strip()
        if re.fullmatch(r"\d+-\d+", part):
            lo, hi = map(int, part.split("-"))
            out.update(range(lo, hi + 1))
        elif re.fullmatch(r"-?\d+", part):
            i = int(part)
            out.add(i + n_states if i < 0 else i)  # negative counts from the last state
        else:
            raise ValueError(f"bad --layers item {part!r}: use all, N, A-B or a comma list")
    if not out:
        raise ValueError(f"--layers {spec!r} selects nothing")
    bad = [i for i in sorted(out) if not 0 <= i < n_states]
    if bad:
        raise ValueError(f"--layers {spec}: index {bad[0]} out of range 0..{n_states - 1} for this model")
    return sorted(out)


def plan_chunks(n_frames: int, chunk: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Split n_frames into chunks of `chunk` frames overlapping by `overlap`.

    Returns (start, length, keep_lo, keep_hi) per chunk, in global frames: the chunk covers frames
    [start, start + length) and contributes [keep_lo, keep_hi); the kept ranges tile [0, n_frames).
    """
    if chunk <= 0 or n_frames <= chunk:
        return [(0, n_frames, 0, n_frames)]
    if not 0 <= overlap < chunk:
        raise ValueError("overlap must be shorter than the chunk")
    starts = [0]
    while starts[-1] + chunk < n_frames:  # the last chunk is pulled back so that it is full length
        starts.append(min(starts[-1] + chunk - overlap, n_frames - chunk))
    plan, lo = [], 0
    for i, s in enumerate(starts):
        hi = n_frames if i == len(starts) - 1 else (starts[i + 1] + s + chunk) // 2  # middle of the overlap
        plan.append((s, chunk, lo, hi))
        lo = hi
    return plan


# config.json model types of MERT-v1 folders: the official remote code's and transformers' HubertModel (ours)
MERT1_MODEL_TYPES = ("mert_model", "hubert")


def load_model(ckpt) -> "MERT | mert2.MERT2":
    """The model of a checkpoint: MERT-v2 (mert2.py) where its config.json says model_type "mert2", else MERT-v1
    (MERT.from_pretrained; a fairseq checkpoint through convert.py, imported only for one). A config.json of any
    other model type is a CheckpointError naming it."""
    if mert2.is_mert2(ckpt):
        return mert2.MERT2.from_pretrained(ckpt)
    kind = _config_model_type(ckpt)
    if kind is not None and kind not in MERT1_MODEL_TYPES:
        raise CheckpointError(f"{ckpt}: config.json has model_type {kind!r}, not a MERT model (MERT-v1: "
                              f"{' or '.join(map(repr, MERT1_MODEL_TYPES))}; MERT-v2: 'mert2')")
    try:
        return MERT.from_pretrained(ckpt)
    except NeedsConvert:
        import convert
        return convert.from_pretrained(ckpt)


def _config_model_type(ckpt):
    """model_type of the config.json of a folder (or beside a weight file), if it has one that says; else None."""
    try:
        p = Path(os.path.expanduser(str(ckpt)))
        cfg = p / "config.json" if p.is_dir() else p.with_name("config.json")
        kind = json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
    except (OSError, ValueError, AttributeError):  # unreadable: left to the loader, which names the problem
        return None
    return kind if isinstance(kind, str) else None


@dataclass(frozen=True)
class ModelInfo:
    """What extract.py and probe.py need to know of a loaded model beyond its extract(): framing and defaults."""
    name: str  # "MERT-v1" or "MERT-v2"
    sample_rate: int
    hop: int  # input samples per frame
    field: int  # samples the first frame spans: n frames take (n - 1) * hop + field samples
    first: float  # centre of frame 0, in samples
    min_samples: int  # the shortest input the model takes
    dim: int
    chunk_s: float  # the default --chunk: longer files run in chunks
    file_stats: bool  # --chunk_stats applies (MERT-v1's GroupNorm after conv 0)

    @property
    def grid(self) -> tuple:
        """(hop, centre of frame 0, sample rate): frame t is centred on (first + hop t) / sample_rate seconds."""
        return self.hop, self.first, self.sample_rate


def model_info(model) -> ModelInfo:
    """ModelInfo of a MERT (MERT-v1) or mert2.MERT2 model."""
    c = model.config
    if isinstance(model, mert2.MERT2):
        # frame t pools mel frames 4t..4t+3, centred on samples 240 (4t .. 4t + 3): 960 t + 360 (mert2.FRAME_GRID);
        # the MERT-v2 release was trained on inputs up to context_seconds long, which run whole by default
        return ModelInfo("MERT-v2", c.sampling_rate, c.hop, c.hop, 1.5 * c.hop_length, c.min_samples, c.hidden_size,
                         float(c.context_seconds), False)
    return ModelInfo("MERT-v1", c.sample_rate, c.hop, c.receptive_field, c.receptive_field / 2, c.receptive_field,
                     c.dim, 30.0, True)


def model_fingerprint(model: MERT) -> str:
    """A hash of what decides the model's eval-mode outputs: its config (less training-only fields) and the
    encoder's weights (as float32, so a float16 checkpoint and its float32 load agree; heads left out)."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in asdict(model.config).items() if k not in _TRAINING_ONLY}
    h.update(json.dumps(cfg, sort_keys=True, default=list).encode())
    for name, t in sorted(model.state_dict().items()):
        if name.startswith(_HEADS):
            continue
        a = t.detach().to("cpu", torch.float32).contiguous().numpy()
        h.update(f"{name}{tuple(a.shape)}".encode())
        h.update(a.data)
    return "sha256:" + h.hexdigest()[:20]


def record_path(dst: Path) -> Path:
    """Where the record of how `dst` was made lives: song.npy -> song.npy.json."""
    return dst.with_name(dst.name + ".json")


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _publish(tmp: Path, dst: Path, record: dict):
    """Move a finished array into place with its record. Order matters for a kill at any point: the old
    array goes first (never beside a new record), the record next, the array last; so a dst that exists
    always has its own record beside it, and a record without its array only means "not done"."""
    record["bytes"] = tmp.stat().st_size
    dst.unlink(missing_ok=True)
    audio.write_json(record_path(dst), record, indent=1)
    os.replace(tmp, dst)


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _source_stamp(src: Path) -> dict:
    """What identifies an input: size and time to check quickly, the content hash when the time moved."""
    st = src.stat()
    return {"path": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _file_hash(src)}


def output_status(src: Path, dst: Path, settings: dict) -> tuple[str, str]:
    """("new" | "ok" | "stale" | "conflict", why) for an input and its output path under these settings."""
    if not dst.exists():
        return "new", ""
    try:
        rec = json.loads(record_path(dst).read_text())
        if not isinstance(rec, dict):
            raise ValueError("not an object")
    except (OSError, ValueError):
        return "conflict", "no record of what made it (an older extract.py or another tool wrote it)"
    diffs = [k for k in SETTINGS if rec.get(k) != settings[k]]
    if diffs:
        said = [f"another model ({rec.get('ckpt')}, {rec.get('model')})" if k == "model" else
                f"{k} {rec.get(k)!r} (now {settings[k]!r})" for k in diffs]
        return "conflict", "made with " + ", ".join(said)
    made = rec.get("source") if isinstance(rec.get("source"), dict) else {}
    try:
        st = src.stat()
        # a copy (cp, rsync without -t) moves the time but not the content: then the hash decides
        if made.get("size") != st.st_size or (made.get("mtime_ns") != st.st_mtime_ns and
                                              made.get("sha256") != _file_hash(src)):
            return "stale", "its input has changed since it was made"
    except OSError:
        return "stale", "its input cannot be examined"
    if rec.get("bytes") != dst.stat().st_size:
        return "stale", "its size is not the recorded one"
    return "ok", ""


class NpyWriter:
    """Writes a [layers, frames, dim] float32 .npy piece by piece (seek + write, so memory stays flat),
    to a temporary file published (with its record) when complete."""

    def __init__(self, src: Path, path: Path, shape: tuple, record: dict):
        self.src, self.path, self.shape, self.record = src, path, shape, record
        self.tmp = _tmp(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.tmp, "wb")
        np.lib.format.write_array_header_1_0(self.f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        self.offset = self.f.tell()
        self.f.truncate(self.offset + 4 * int(np.prod(shape)))

    def write(self, frame_lo: int, feats: np.ndarray):
        """feats [layers, n, dim] float32 for frames [frame_lo, frame_lo + n)."""
        L, T, D = self.shape
        for layer in range(L):
            self.f.seek(self.offset + 4 * ((layer * T + frame_lo) * D))
            self.f.write(np.ascontiguousarray(feats[layer], dtype="<f4").tobytes())

    def close(self):
        self.f.close()
        _publish(self.tmp, self.path, self.record)

    def abort(self):
        self.f.close()
        self.tmp.unlink(missing_ok=True)


class PoolWriter:
    """Accumulates per-layer sums over frames; writes [layers, dim] (mean) or [layers, 2*dim] (mean ++ std)."""

    def __init__(self, src: Path, path: Path, shape: tuple, record: dict, mode: str):
        self.src, self.path, self.record, self.mode, self.n = src, path, record, mode, shape[1]
        self.s1 = np.zeros((shape[0], shape[2]), np.float64)
        self.s2 = np.zeros_like(self.s1) if mode == "meanstd" else None

    def write(self, frame_lo: int, feats: np.ndarray):
        f = feats.astype(np.float64)
        self.s1 += f.sum(axis=1)
        if self.s2 is not None:
            self.s2 += np.square(f).sum(axis=1)

    def close(self):
        mean = self.s1 / self.n
        out = mean
        if self.s2 is not None:
            std = np.sqrt(np.maximum(self.s2 / self.n - np.square(mean), 0.0))
            out = np.concatenate([mean, std], axis=1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp(self.path)  # song.npy.tmp: never a name that looks like an output
        with open(tmp, "wb") as f:
            np.save(f, out.astype(np.float32))
        _publish(tmp, self.path, self.record)

    def abort(self):
        _tmp(self.path).unlink(missing_ok=True)


def resolve_jobs(inputs: list[str], out_dir: str | None, skipped: list | None = None) -> list[tuple[Path, Path]]:
    """(audio file, output .npy) pairs: a file maps to <out or its folder>/<stem>.npy, a folder's files
    to <out or the folder>/<relative path>.npy. Raises audio.AudioError for a path that does not exist.
    `skipped` (a list) receives (path, reason) for files in folders that soundfile cannot decode."""
    jobs = []
    for arg in inputs:
        p = Path(arg)
        if p.is_dir():
            base = Path(out_dir) if out_dir else p
            for f in audio.find_audio([p], recursive=True, skipped=skipped):
                jobs.append((f, base / f.relative_to(p).with_suffix(".npy")))
        elif p.exists():
            jobs.append((p, (Path(out_dir) if out_dir else p.parent) / (p.stem + ".npy")))
        else:
            raise audio.AudioError(f"{p}: no such file or folder")
    return jobs


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda, then mps, then cpu; a named device that this torch cannot use is a ValueError."""
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


def normalize_wav(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the whole clip: transformers' Wav2Vec2FeatureExtractor(do_normalize=True),
    (x - mean) / sqrt(var + 1e-7), which MARBLE's MERT-v1-95M config applies (`processor_normalize: true`)."""
    x64 = x.astype(np.float64)
    return ((x64 - x64.mean()) / np.sqrt(x64.var() + 1e-7)).astype(np.float32)


def extract_files(model: MERT, jobs: list[tuple[Path, Path]], layers: list[int], pool: str = "none",
                  chunk_s: float | None = None, overlap_s: float = 5.0, batch: int = 1, overwrite: bool = False,
                  progress: bool = True, normalize: bool = False, chunk_stats: str = "file",
                  model_id: str | None = None, ckpt_name: str | None = None) -> tuple[int, int, list[str]]:
    """Write features of each (audio file, .npy) pair with a loaded model; returns (written, skipped, errors).

    A file that cannot be read or run is named in the errors and on stderr, and the others go on. Outputs
    made the same way from the same input are skipped; outputs made another way raise OutputConflict before
    any work unless `overwrite`. `model_id` names the model in the records (default: model_fingerprint).
    `chunk_s` None: the model's default (model_info); `chunk_stats` is recorded as None for MERT-v2 (no GroupNorm)."""
    info = model_info(model)
    hop, rf, sr = info.hop, info.field, info.sample_rate
    device = next(model.parameters()).device
    chunk_s = info.chunk_s if chunk_s is None else chunk_s
    chunk = int(round(chunk_s * sr / hop))
    overlap = int(round(overlap_s * sr / hop))
    if chunk_s and (chunk < 1 or (chunk - 1) * hop + rf < info.min_samples):
        raise ValueError(f"--chunk {chunk_s}: shorter than the {info.name} model's shortest input "
                         f"({max(hop, info.min_samples) / sr * 1000:.1f} ms)")
    if chunk and overlap >= chunk:
        raise ValueError("--overlap must be shorter than --chunk")
    if chunk_stats not in ("file", "chunk"):
        raise ValueError(f"chunk_stats must be 'file' or 'chunk', not {chunk_stats!r}")
    chunk_stats = chunk_stats if info.file_stats else None
    settings = {"version": EXTRACT_VERSION, "model": model_id or model_fingerprint(model), "layers": list(layers),
                "pool": pool, "chunk": float(chunk_s), "overlap": float(overlap_s), "chunk_stats": chunk_stats,
                "normalize": bool(normalize), "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}

    def say(kind, msg):
        tqdm.write(f"{kind}: {msg}", file=sys.stderr)

    seen, todo, skipped, failed, conflicts = {}, [], 0, [], []

    def fail(msg):
        failed.append(msg)
        say("error", msg)
    for src, dst in jobs:
        if dst in seen:
            fail(f"{src}: its output {dst} collides with that of {seen[dst]}")
            continue
        seen[dst] = src
        if overwrite:  # recomputed whatever its record says: no need to read (or hash) anything
            todo.append((src, dst))
            continue
        state, why = output_status(src, dst, settings)
        if state == "ok":
            skipped += 1
        elif state == "conflict":
            conflicts.append(f"{dst}: {why}")
        else:
            if state == "stale":
                say("note", f"{dst}: recomputing, {why}")
            todo.append((src, dst))
    if conflicts:
        more = f" (and {len(conflicts) - 1} more output(s) like it)" if len(conflicts) > 1 else ""
        raise OutputConflict(f"{conflicts[0]}{more}; pass --overwrite to replace them, or write to another -o")
    for _, dst in jobs:  # leftovers of an interrupted run: never outputs, never read
        _tmp(dst).unlink(missing_ok=True)
        _tmp(record_path(dst)).unlink(missing_ok=True)

    pending = []  # (writer, wav segment, keep_lo, keep_hi, start, file stats or None) waiting for a batch
    remaining = {}  # writer -> chunks not yet written
    n_done = 0
    bar = tqdm(total=len(todo), unit="file", desc="extract", file=sys.stderr, disable=None if progress else True)

    def drop(w, msg):
        if w in remaining:
            fail(msg)
            w.abort()
            del remaining[w]
            bar.update(1)

    def run_batch():
        nonlocal n_done
        lens = [len(p[1]) for p in pending]
        wav = torch.zeros(len(pending), max(lens))
        for i, p in enumerate(pending):
            wav[i, :lens[i]] = torch.from_numpy(p[1])
        try:
            wav = wav.to(device)
            stats = None
            if any(p[5] is not None for p in pending):  # rows that run whole take their own statistics
                own = [p[5] if p[5] is not None else model.norm_stats(wav[i, :lens[i]]) for i, p in enumerate(pending)]
                stats = tuple(torch.cat([s[j] for s in own]) for j in (0, 1))
            feats = model.extract(wav, lengths=lens if len(set(lens)) > 1 else None, layers=layers,
                                  **({"norm_stats": stats} if stats is not None else {}))  # MERT-v1's only
            feats = feats.float().cpu().numpy()  # (layers, B, T, dim)
        except RuntimeError as e:  # out of memory and the like: fail these files, keep going
            for w, *_ in pending:
                drop(w, f"{w.src}: model failed ({type(e).__name__}: {str(e).splitlines()[0]})")
            pending.clear()
            return
        for i, (w, _, lo, hi, start, _) in enumerate(pending):
            if w not in remaining:
                continue
            try:
                w.write(lo, feats[:, i, lo - start:hi - start])
                remaining[w] -= 1
                if remaining[w] == 0:
                    w.close()
                    del remaining[w]
                    n_done += 1
                    bar.update(1)
            except OSError as e:
                drop(w, f"{w.path}: cannot write ({audio.one_line(e)})")
        pending.clear()

    for src, dst in todo:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", audio.AudioWarning)
                x = audio.load(src, sr=sr)
            for wmsg in caught:
                say("warning", str(wmsg.message))
            if len(x) < info.min_samples:
                raise audio.AudioError(f"{src}: too short ({len(x)} samples at {sr} Hz; {info.name} needs at least "
                                       f"{info.min_samples})")
        except audio.AudioError as e:
            fail(str(e))
            bar.update(1)
            continue
        if normalize:
            x = normalize_wav(x)
        n_frames = int(model.num_frames(len(x)))
        shape = (len(layers), n_frames, info.dim)
        record = {**settings, "ckpt": ckpt_name, "arch": info.name, "frame_grid": list(info.grid),
                  "source": _source_stamp(src), "shape": list(shape),
                  "device": str(device), "torch": torch.__version__,
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        try:
            w = PoolWriter(src, dst, shape, record, pool) if pool != "none" else NpyWriter(src, dst, shape, record)
        except OSError as e:
            fail(f"{dst}: cannot write ({audio.one_line(e)})")
            bar.update(1)
            continue
        plan = plan_chunks(n_frames, chunk, overlap)
        file_stats = None
        if len(plan) > 1 and chunk_stats == "file":
            # conv 0's GroupNorm statistics over the whole file, as one forward would take them
            file_stats = model.norm_stats(torch.from_numpy(x).to(device))
        remaining[w] = len(plan)
        for k, (start, length, lo, hi) in enumerate(plan):
            # the last chunk (or the whole file) runs to the file's end: the samples past the last whole
            # frame feed the GroupNorm statistics, as they do in the official model
            end = len(x) if k == len(plan) - 1 else start * hop + (length - 1) * hop + rf
            pending.append((w, x[start * hop:end], lo, hi, start, file_stats))
            if len(pending) >= batch:
                run_batch()
    if pending:
        run_batch()
    bar.close()
    return n_done, skipped, failed


def add_flag(p: argparse.ArgumentParser, name: str, **kw):
    """An option under its canonical underscore name, also accepted with hyphens (--chunk_stats, --chunk-stats)."""
    return p.add_argument(*[name] + ([name.replace("_", "-")] if "_" in name else []), **kw)


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    p = argparse.ArgumentParser(
        description="Extract MERT features (all hidden states; MERT-v1 75 frames/s, MERT-v2 25 frames/s) from audio "
                    "files or folders.",
        epilog="examples:\n"
               "  python extract.py song.wav                 # song.npy beside it, the shipped model\n"
               "  python extract.py music/ -o feats/ --ckpt m-a-p/MERT-v1-95M --layers 4-8 --pool mean\n"
               "  python extract.py music/ -o marble/ --ckpt m-a-p/MERT-v1-95M --normalize "
               "--chunk 30 --overlap 0 --chunk_stats chunk   # near MARBLE's MERT-v1-95M setup\n"
               "  python extract.py song.wav --ckpt m-a-p/MERT-v2-30s --layers all   # MERT-v2: 25 states, 25 Hz\n"
               "flags with an underscore also take hyphens (--chunk-stats).",
        formatter_class=argparse.RawDescriptionHelpFormatter)  # keep the epilog's lines
    p.add_argument("inputs", nargs="+", help="audio files and/or folders (searched recursively)")
    p.add_argument("-o", "--out", default=None, help="output folder (default: beside each input)")
    add_flag(p, "--ckpt", default=None,
             help="model: HF folder (MERT-v1 or MERT-v2), hub id in the local HF cache, fairseq .pt or ours "
                  "(default: the shipped model)")
    add_flag(p, "--layers", default="all",
             help="hidden states to keep: all, N, A-B, or a comma list; 0 = input of layer 1 (default: all)")
    add_flag(p, "--pool", default="none", choices=["none", "mean", "meanstd"],
             help="pool over time: none -> [layers, frames, dim]; mean -> [layers, dim]; "
                  "meanstd -> [layers, 2*dim] (default: none)")
    add_flag(p, "--chunk", type=float, default=None,
             help="seconds per chunk for long files; 0: every file whole (default: 30; MERT-v2: its training "
                  "length, 30 for MERT-v2-30s, 360 for FullSong)")
    add_flag(p, "--overlap", type=float, default=5.0, help="seconds of overlap between chunks (default: 5)")
    add_flag(p, "--chunk_stats", default=None, choices=["file", "chunk"],
             help="MERT-v1: statistics of the GroupNorm after conv 0 in a chunked file: the whole file's, as one "
                  "forward takes them, or each chunk's own, as separate clips (MARBLE) (default: file)")
    add_flag(p, "--normalize", action="store_true",
             help="scale each file to zero mean and unit variance first, as MARBLE's MERT-v1-95M configs do "
                  "(MERT was pretrained without it; default: off)")
    add_flag(p, "--batch", type=int, default=1,
             help="chunks per forward pass; clips of unequal length are padded exactly (default: 1)")
    add_flag(p, "--device", default="auto", help="auto, cpu, cuda, cuda:1 or mps (default: auto)")
    add_flag(p, "--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
             help="compute dtype; outputs are float32 (default: float32)")
    add_flag(p, "--overwrite", action="store_true",
             help="recompute every input whose output exists, including outputs made another way")
    return p


def main(argv=None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 some inputs failed, 2 usage error)."""
    args = build_parser().parse_args(argv)
    err = lambda msg: print(f"extract.py: {msg}", file=sys.stderr)  # noqa: E731
    if args.batch < 1 or not 0 <= (args.chunk or 0) < math.inf or not 0 <= args.overlap < math.inf:
        err("--batch must be >= 1 and --chunk/--overlap finite and >= 0")
        return 2
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        err(f"-o {args.out}: exists and is not a folder")
        return 2
    ckpt = args.ckpt or DEFAULT_CKPT
    if args.ckpt is None and not DEFAULT_CKPT.exists():
        err(NO_DEFAULT_MSG.format(path=DEFAULT_CKPT))
        return 2
    skipped_files = []
    try:
        jobs = resolve_jobs(args.inputs, args.out, skipped_files)
        for path, why in skipped_files:
            print(f"error: {path}: {why}", file=sys.stderr)
        if not jobs:
            err(f"no audio input: nothing in {', '.join(args.inputs)} that soundfile can decode "
                f"({' '.join(sorted(audio.AUDIO_EXTENSIONS))})")
            return 2
        device, dtype = pick_device(args.device), getattr(torch, args.dtype)
        model = load_model(ckpt)
        model_id = model_fingerprint(model)  # before the cast: the weights as the checkpoint holds them
        model = model.to(device=device, dtype=dtype)
        layers = parse_layers(args.layers, model.num_states)
        info = model_info(model)
        if args.chunk_stats and not info.file_stats:
            print(f"note: --chunk_stats ignored: {info.name} has no GroupNorm statistics to share across chunks",
                  file=sys.stderr)
    except (audio.AudioError, CheckpointError, ValueError, RuntimeError) as e:
        err(audio.one_line(e))
        return 2
    try:
        t0 = time.time()
        n_done, skipped, failed = extract_files(
            model, jobs, layers, args.pool, args.chunk, args.overlap, args.batch, args.overwrite,
            normalize=args.normalize, chunk_stats=args.chunk_stats or "file", model_id=model_id, ckpt_name=str(ckpt))
    except ValueError as e:
        err(str(e))
        return 2
    except KeyboardInterrupt:
        err("interrupted; every output written is complete, and a rerun finishes the rest")
        return 130
    n_failed = len(failed) + len(skipped_files)
    print(f"extract.py: {n_done} written, {skipped} already there, {n_failed} failed "
          f"({time.time() - t0:.1f} s)", file=sys.stderr)
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
