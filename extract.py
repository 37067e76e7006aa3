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

At scale (docs/extract.md): under torchrun each rank takes a deterministic share balanced by file size, on
its own device (NCCL on GPUs, gloo on CPUs), and --shard I/N (Slurm arrays) takes part I of N; at --batch 1
every array is byte-identical whatever the split. --workers N decodes in DataLoader processes (BLAS on one
thread there and in-process alike, so decoding gives the same bits). --out_format shards packs many inputs
per ~1 GB file with a JSON index. A lock (flock) refuses a second run into the same folder; Ctrl-C and
SIGTERM set a flag checked at safe points (a KeyboardInterrupt inside torch's C++ aborts the process).
"""

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

# Ctrl-C (or SIGTERM) only sets a flag that the run checks at safe points: a KeyboardInterrupt raised inside
# torch's C++ (its import, a forward, DataLoader threads at teardown) aborts the process with "terminate called
# after throwing ... pybind11::error_already_set". A second one stops at once. Installed before torch loads.
_STOP: list[int] = []


def _on_signal(signum, frame):
    if _STOP:
        os.write(2, b"extract.py: interrupted again; stopped at once (a rerun finishes the rest)\n")
        os._exit(128 + signum)
    _STOP.append(signum)


if __name__ == "__main__":
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, _on_signal)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import audio  # noqa: E402
import mert2  # noqa: E402
from mert import MERT, CheckpointError, NeedsConvert, hf_cache_snapshot  # noqa: E402

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
    """model_type of the config.json of a folder (or beside a weight file, or of a hub id's snapshot in the local
    Hugging Face cache), if it has one that says; else None."""
    try:
        p = Path(os.path.expanduser(str(ckpt)))
        if not p.exists():  # a hub id: its cached snapshot, if there is one (nothing is downloaded)
            p = hf_cache_snapshot(str(ckpt))
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
        # a quantize_dynamic model keeps (weight, bias) tuples of quantised tensors, and dtypes, in its state
        for u in t if isinstance(t, tuple) else (t,):
            if not isinstance(u, torch.Tensor):
                h.update(f"{name}{u}".encode())
                continue
            a = (u.dequantize() if u.is_quantized else u).detach().to("cpu", torch.float32).contiguous().numpy()
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


def _record_status(src: Path, rec, settings: dict, on_disk: int | None) -> tuple[str, str]:
    """("ok" | "stale" | "conflict", why) for an existing output from its record and its size on disk now."""
    if not isinstance(rec, dict):
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
    if rec.get("bytes") != on_disk:
        return "stale", "its size is not the recorded one"
    return "ok", ""


def output_status(src: Path, dst: Path, settings: dict) -> tuple[str, str]:
    """("new" | "ok" | "stale" | "conflict", why) for an input and its output path under these settings."""
    if not dst.exists():
        return "new", ""
    try:
        rec = json.loads(record_path(dst).read_text())
    except (OSError, ValueError):
        rec = None
    return _record_status(src, rec, settings, dst.stat().st_size)


# ---------------------------------------------------------------------------------------------
# Where arrays go. A sink opens a region per output; writers fill it and commit or abort it.
#   NpySink:   song.npy.tmp, renamed to song.npy after its record song.npy.json (the default)
#   ShardSink: many inputs' arrays back to back in feats-<part>-<id>.bin (at most ~1 GB), listed in
#              feats-<part>-<id>.json {"format", "items": [{key, input, offset, nbytes, dtype, shape, source,
#              settings...}]}; the .bin is renamed from .bin.tmp before its .json is written, so an index
#              always describes complete arrays. A recomputed input's old item is dropped from its old index
#              (under a short folder lock) before the new index appears: an input is listed at most once.
# ---------------------------------------------------------------------------------------------
SHARDS_FORMAT = "mert-torch-features-1"
SHARD_BYTES = 1 << 30


class _NpyRegion:
    def __init__(self, dst: Path, shape: tuple, record: dict):
        self.dst, self.record, self.tmp = dst, record, _tmp(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.tmp, "wb")
        np.lib.format.write_array_header_1_0(self.f, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
        self.base = self.f.tell()
        self.f.truncate(self.base + 4 * math.prod(shape))

    def write_at(self, offset: int, data: bytes):
        self.f.seek(self.base + offset)
        self.f.write(data)

    def commit(self):
        self.f.close()
        _publish(self.tmp, self.dst, self.record)

    def abort(self):
        self.f.close()
        self.tmp.unlink(missing_ok=True)


class NpySink:
    """One .npy per input with its record beside it (--out_format npy, the default)."""

    def status(self, src: Path, dst: Path, settings: dict) -> tuple[str, str]:
        return output_status(src, dst, settings)

    def clean(self, dst: Path):
        """Leftovers of an interrupted run for this output: never outputs, never read."""
        _tmp(dst).unlink(missing_ok=True)
        _tmp(record_path(dst)).unlink(missing_ok=True)

    def open(self, dst: Path, shape: tuple, record: dict) -> _NpyRegion:
        return _NpyRegion(dst, shape, record)

    def finish(self):
        pass


class _ShardRegion:
    def __init__(self, shard, entry: dict):
        self.shard, self.entry = shard, entry

    def write_at(self, offset: int, data: bytes):
        self.shard.f.seek(self.entry["offset"] + offset)
        self.shard.f.write(data)

    def commit(self):
        self.shard.done(self.entry)

    def abort(self):
        self.shard.done(None)


class _Shard:
    """One feats-*.bin being filled: regions are reserved at open, so chunks can arrive in any order."""

    def __init__(self, sink):
        self.sink, self.name = sink, f"feats-{sink.part}-{uuid.uuid4().hex[:8]}"
        self.tmp = sink.folder / f"{self.name}.bin.tmp"
        self.f = open(self.tmp, "wb")
        self.end, self.items, self.open, self.sealed = 0, [], 0, False

    def reserve(self, key: str, shape: tuple, record: dict) -> _ShardRegion:
        nbytes = 4 * math.prod(shape)
        entry = {"key": key, "input": record["source"]["path"], "offset": self.end, "nbytes": nbytes,
                 "dtype": "<f4", **record, "shape": list(shape), "bytes": nbytes}
        self.end += -(-nbytes // 64) * 64  # items 64-byte aligned
        self.f.truncate(self.end)
        self.open += 1
        return _ShardRegion(self, entry)

    def done(self, entry):
        self.open -= 1
        if entry is not None:
            self.items.append(entry)
        self.publish_if_ready()

    def publish_if_ready(self):
        if not self.sealed or self.open or self.f.closed:
            return
        self.f.close()
        if not self.items:
            self.tmp.unlink(missing_ok=True)
            return
        os.replace(self.tmp, self.sink.folder / f"{self.name}.bin")
        self.sink.drop_old([e["key"] for e in self.items])
        audio.write_json(self.sink.folder / f"{self.name}.json", {"format": SHARDS_FORMAT, "items": self.items})

    def seal(self):
        self.sealed = True
        self.publish_if_ready()


@contextlib.contextmanager
def _flocked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


class ShardSink:
    """--out_format shards into `folder`: this process's items go to feats-<part>-<id>.bin files."""

    def __init__(self, folder: Path, part: str, limit: int | None = None):
        self.folder, self.part, self.limit = Path(folder), part, limit or SHARD_BYTES
        self.items, self.old, self.shard, self.shards = {}, {}, None, []
        for index in sorted(self.folder.glob("feats-*.json")):
            try:
                items = json.loads(index.read_text())["items"]
                size = index.with_suffix(".bin").stat().st_size
            except (OSError, ValueError, KeyError, TypeError):
                continue  # damaged: its items count as not made
            for e in items:
                if isinstance(e, dict) and isinstance(e.get("key"), str):
                    whole = isinstance(e.get("offset"), int) and e["offset"] + (e.get("nbytes") or 0) <= size
                    self.items[e["key"]] = (index, e, e.get("nbytes") if whole else None)

    def key(self, dst: Path) -> str:
        """The name an output goes by in the index: its path under the folder, without .npy."""
        return dst.relative_to(self.folder).with_suffix("").as_posix()

    def status(self, src: Path, dst: Path, settings: dict) -> tuple[str, str]:
        found = self.items.get(self.key(dst))
        return ("new", "") if found is None else _record_status(src, found[1], settings, found[2])

    def clean(self, dst: Path):
        pass

    def open(self, dst: Path, shape: tuple, record: dict) -> _ShardRegion:
        key = self.key(dst)
        if key in self.items:
            self.old[key] = self.items[key][0]  # dropped from that index when the new item is published
        nbytes = 4 * math.prod(shape)
        if self.shard is not None and self.shard.end and self.shard.end + nbytes > self.limit:
            self.shard.seal()
            self.shard = None
        if self.shard is None:
            self.shard = _Shard(self)
            self.shards.append(self.shard)
        return self.shard.reserve(key, shape, record)

    def drop_old(self, keys: list[str]):
        """Remove superseded items from the older indexes (a shard whose items are all gone is deleted)."""
        by_index = {}
        for k in keys:
            if k in self.old:
                by_index.setdefault(self.old.pop(k), set()).add(k)
        if not by_index:
            return
        with _flocked(self.folder / ".extract-index.lock"):  # other ranks may rewrite the same index
            for index, ks in by_index.items():
                try:
                    meta = json.loads(index.read_text())
                except (OSError, ValueError):
                    continue
                meta["items"] = [e for e in meta["items"] if e.get("key") not in ks]
                if meta["items"]:
                    audio.write_json(index, meta)
                else:
                    index.unlink(missing_ok=True)
                    index.with_suffix(".bin").unlink(missing_ok=True)

    def finish(self):
        """Publish every shard whose items are complete (those still open are dropped by their writers)."""
        for s in self.shards:
            s.seal()
        self.shards = [s for s in self.shards if not s.f.closed]

    def abort(self):
        for s in self.shards:
            if not s.f.closed:
                s.f.close()
                s.tmp.unlink(missing_ok=True)

    @staticmethod
    def clean_folder(folder: Path, part: str | None):
        """Leftovers of killed runs: *.bin.tmp (of `part` only, or all), and .bin files that no index names."""
        for tmp in Path(folder).glob(f"feats-{part}-*.bin.tmp" if part else "feats-*.bin.tmp"):
            tmp.unlink(missing_ok=True)
        if part is None:
            for b in Path(folder).glob("feats-*.bin"):
                if not b.with_suffix(".json").exists():
                    b.unlink(missing_ok=True)


class FrameWriter:
    """Writes a [layers, frames, dim] float32 array piece by piece into its region (memory stays flat)."""

    def __init__(self, src: Path, path: Path, shape: tuple, record: dict, sink):
        self.src, self.path, self.shape, self.seconds = src, path, shape, 0.0
        self.region = sink.open(path, shape, record)

    def write(self, frame_lo: int, feats: np.ndarray):
        """feats [layers, n, dim] float32 for frames [frame_lo, frame_lo + n)."""
        L, T, D = self.shape
        for layer in range(L):
            self.region.write_at(4 * ((layer * T + frame_lo) * D), np.ascontiguousarray(feats[layer], "<f4").tobytes())

    def close(self):
        self.region.commit()

    def abort(self):
        self.region.abort()


class PoolWriter:
    """Accumulates per-layer sums over frames; writes [layers, dim] (mean) or [layers, 2*dim] (mean ++ std)."""

    def __init__(self, src: Path, path: Path, shape: tuple, record: dict, sink, mode: str):
        self.src, self.path, self.record, self.mode, self.n = src, path, record, mode, shape[1]
        self.sink, self.seconds = sink, 0.0
        self.s1 = np.zeros((shape[0], shape[2]), np.float64)
        self.s2 = np.zeros_like(self.s1) if mode == "meanstd" else None
        self.record["shape"] = [shape[0], shape[2] * (2 if mode == "meanstd" else 1)]

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
        region = self.sink.open(self.path, out.shape, self.record)
        region.write_at(0, np.ascontiguousarray(out, "<f4").tobytes())
        region.commit()

    def abort(self):
        pass


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


pick_device = audio.pick_device  # one check for every command (train.py and probe.py use it too)


def normalize_wav(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the whole clip: transformers' Wav2Vec2FeatureExtractor(do_normalize=True),
    (x - mean) / sqrt(var + 1e-7), which MARBLE's MERT-v1-95M config applies (`processor_normalize: true`)."""
    x64 = x.astype(np.float64)
    return ((x64 - x64.mean()) / np.sqrt(x64.var() + 1e-7)).astype(np.float32)


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived; raised at the next safe point."""


def check_stop():
    """Raise Interrupted if a signal arrived (see _on_signal)."""
    if _STOP:
        raise Interrupted()


# ---------------------------------------------------------------------------------------------
# Decoding: in DataLoader worker processes (--workers N) or in this process (--workers 0), the same
# function with BLAS on one thread either way: the resampler's float32 matmuls round differently with
# the thread count, and outputs must not depend on --workers (audio.py prepare does the same).
# ---------------------------------------------------------------------------------------------
class DecodeSet(torch.utils.data.Dataset):
    """Item k: (k, float32 mono samples at `sr` as a tensor or None, error message or "", warnings)."""

    def __init__(self, files: list[Path], sr: int, min_len: int, normalize: bool, slots=None, name: str = "the model"):
        self.files, self.sr, self.min_len, self.normalize, self.slots = files, sr, min_len, normalize, slots
        self.name = name  # the model, in the too-short message

    def __len__(self):
        return len(self.files)

    def __getitem__(self, k: int):
        info = torch.utils.data.get_worker_info()
        if self.slots is not None and info is not None:
            self.slots[info.id] = k  # which file each worker is on: named if the decoder crashes the process
        src = self.files[k]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", audio.AudioWarning)
            try:
                x = audio.load(src, sr=self.sr)
                if len(x) < self.min_len:
                    raise audio.AudioError(f"{src}: too short ({len(x)} samples at {self.sr} Hz; "
                                           f"{self.name} needs at least {self.min_len})")
            except audio.AudioError as e:
                x, msg = None, str(e)
            else:
                msg = ""
        if x is not None and self.normalize:
            x = normalize_wav(x)
        if self.slots is not None and info is not None:
            self.slots[info.id] = -1
        return k, None if x is None else torch.from_numpy(x), msg, [str(w.message) for w in caught]


class _Subset(torch.utils.data.Dataset):
    def __init__(self, ds, order):
        self.ds, self.order = ds, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, j):
        return self.ds[self.order[j]]


def _keep(item):
    return item


def _worker_init(worker_id: int):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the main process decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the DataLoader ends its workers with SIGTERM
    audio.worker_init(worker_id)


@contextlib.contextmanager
def _one_blas_thread():
    """BLAS on one thread inside the block, as in the workers (audio.worker_init)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # for good, then: in this process only the resampler's matmuls use numpy's BLAS
        audio.limit_blas_threads(1)
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def _crashes(ds: DecodeSet, k: int) -> int:
    """Decode item k in a process of its own: its exit code (negative: killed by that signal)."""
    import multiprocessing
    p = multiprocessing.Process(target=_decode_alone, args=(ds, k))
    p.start()
    p.join()
    return p.exitcode


def _decode_alone(ds, k):
    _worker_init(0)
    ds[k]


def decoded(ds: DecodeSet, order: list[int], workers: int):
    """Yield ds[k] for every k in `order` (in that order while nothing crashes). A worker process that dies
    (a decoder crashing on a file) is not fatal: the files it was on are decoded alone, one at a time, and
    one that kills its process is yielded as failed; the loader restarts on the rest."""
    remaining = list(order)
    if workers == 0:
        for k in remaining:
            with _one_blas_thread():
                item = ds[k]
            yield item
        return
    # The DataLoader's SIGCHLD handler would raise a worker's death in this process at any point (inside a
    # forward too); without it the loader reports it on the next item, where it is handled below.
    sh = torch.utils.data._utils.signal_handling
    if hasattr(sh, "_SIGCHLD_handler_set"):
        sh._SIGCHLD_handler_set = True
    import multiprocessing
    ds.slots = multiprocessing.Array("q", workers, lock=False)
    while remaining:
        for w in range(workers):
            ds.slots[w] = -1
        loader = torch.utils.data.DataLoader(
            _Subset(ds, remaining), batch_size=None, num_workers=min(workers, len(remaining)),
            worker_init_fn=_worker_init, collate_fn=_keep, prefetch_factor=2)
        it, got = iter(loader), 0
        try:
            for item in it:
                got += 1
                yield item
            return
        except RuntimeError as e:
            if "DataLoader worker" not in str(e):
                raise
            suspects = [int(k) for k in ds.slots if k >= 0]
        finally:
            it._shutdown_workers() if hasattr(it, "_shutdown_workers") else None
            del it, loader
        remaining = remaining[got:]
        codes = {k: _crashes(ds, k) for k in suspects}
        dead = [k for k, c in codes.items() if c != 0] or remaining[:1]  # at least one: always progress
        for k in dead:
            code = codes.get(k)
            why = f"killed by {signal.Signals(-code).name}" if code and code < 0 else "died"
            yield k, None, f"{ds.files[k]}: the decoder crashed (its process {why})", []
        remaining = [k for k in remaining if k not in dead]


def balanced_split(sizes: list[int], n: int) -> list[list[int]]:
    """Indices of `sizes` split into n parts of near-equal total: largest first, each to the part with the
    least so far (ties to the lower part); deterministic, every index in exactly one part, each part sorted."""
    import heapq
    heap = [(0, p) for p in range(n)]
    parts = [[] for _ in range(n)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        total, p = heapq.heappop(heap)
        parts[p].append(i)
        heapq.heappush(heap, (total + sizes[i], p))
    return [sorted(p) for p in parts]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _fail(failed: list, msg: str):
    """Name a failed input in `failed` and on stderr."""
    failed.append(msg)
    tqdm.write(f"error: {msg}", file=sys.stderr)  # tqdm.write: the progress bar stays whole


def _triage(jobs, sink, settings: dict, overwrite: bool, agree, failed: list) -> tuple[list, int]:
    """(pairs to compute, number already done); collisions go to `failed`; OutputConflict (all ranks alike)."""
    seen, todo, skipped, conflicts = {}, [], 0, []
    for src, dst in jobs:
        if dst in seen:
            _fail(failed, f"{src}: its output {dst} collides with that of {seen[dst]}")
            continue
        seen[dst] = src
        if overwrite:  # recomputed whatever its record says: no need to read (or hash) anything
            todo.append((src, dst))
            continue
        state, why = sink.status(src, dst, settings)
        if state == "ok":
            skipped += 1
        elif state == "conflict":
            conflicts.append(f"{dst}: {why}")
        else:
            if state == "stale":
                tqdm.write(f"note: {dst}: recomputing, {why}", file=sys.stderr)
            todo.append((src, dst))
    if agree is not None:
        conflicts = agree(conflicts)
    if conflicts:
        more = f" (and {len(conflicts) - 1} more output(s) like it)" if len(conflicts) > 1 else ""
        raise OutputConflict(f"{conflicts[0]}{more}; pass --overwrite to replace them, or write to another -o")
    return todo, skipped


def _segments(model, info: ModelInfo, x: torch.Tensor, plan: list, chunk_stats, device) -> list[tuple]:
    """A file's chunks to run, per plan_chunks entry: (wav segment, keep_lo, keep_hi, start, file stats or None)."""
    # conv 0's GroupNorm statistics over the whole file, as one forward would take them
    file_stats = model.norm_stats(x.to(device)) if len(plan) > 1 and chunk_stats == "file" else None
    # the last chunk (or the whole file) runs to the file's end: the samples past the last whole
    # frame feed the GroupNorm statistics, as they do in the official model
    ends = [start * info.hop + (length - 1) * info.hop + info.field for start, length, _, _ in plan[:-1]] + [len(x)]
    return [(x[start * info.hop:end], lo, hi, start, file_stats) for (start, _, lo, hi), end in zip(plan, ends)]


class _Batches:
    """Chunks waiting for a forward pass, run --batch at a time; writes each file's output once its last lands."""

    def __init__(self, model, layers: list[int], batch: int, device, failed: list, bar):
        self.model, self.layers, self.batch, self.device = model, layers, batch, device
        self.failed, self.bar = failed, bar  # extract_files' list of failures and progress bar, shared
        self.window = 1 if batch == 1 else 4 * batch  # segments waiting, sorted by length before each batch
        self.pending = []  # (writer, wav segment, keep_lo, keep_hi, start, file stats or None) waiting for a batch
        self.remaining = {}  # writer -> chunks not yet written
        self.n_done, self.seconds, self.t0, self.shown = 0, 0.0, time.time(), 0.0

    def add(self, w, segments: list[tuple]):
        """Queue a file's segments (see _segments), running a batch whenever the window fills."""
        self.remaining[w] = len(segments)
        for seg in segments:
            self.pending.append((w, *seg))
            self.drain(self.window - 1)

    def drain(self, keep: int):
        """Run batches until at most `keep` segments wait."""
        while len(self.pending) > keep:
            self.run()
            check_stop()

    def drop(self, w, msg: str):
        """Fail a file still in progress (once), discarding what it wrote."""
        if w in self.remaining:
            _fail(self.failed, msg)
            w.abort()
            del self.remaining[w]
            self.bar.update(1)

    def run(self):
        """One forward pass over the next --batch segments (longest first when a window waits); write their frames."""
        if self.window > 1:
            self.pending.sort(key=lambda p: -len(p[1]))
        now, self.pending = self.pending[:self.batch], self.pending[self.batch:]  # the rest waits for the next
        lens = [len(p[1]) for p in now]
        wav = torch.zeros(len(now), max(lens), pin_memory=self.device.type == "cuda")  # pinned: overlaps the GPU
        for i, p in enumerate(now):
            wav[i, :lens[i]] = p[1]
        try:
            wav = wav.to(self.device, non_blocking=True)
            norm = None
            if any(p[5] is not None for p in now):  # rows that run whole take their own statistics
                own = [p[5] if p[5] is not None else self.model.norm_stats(wav[i, :lens[i]])
                       for i, p in enumerate(now)]
                norm = tuple(torch.cat([s[j] for s in own]) for j in (0, 1))
            feats = self.model.extract(wav, lengths=lens if len(set(lens)) > 1 else None, layers=self.layers,
                                       **({"norm_stats": norm} if norm is not None else {}))  # MERT-v1's only
            feats = feats.float().cpu().numpy()  # (layers, B, T, dim)
        except RuntimeError as e:  # out of memory and the like: fail these files, keep going
            for w, *_ in now:
                self.drop(w, f"{w.src}: model failed ({type(e).__name__}: {str(e).splitlines()[0]})")
            return
        for i, (w, _, lo, hi, start, _) in enumerate(now):
            if w not in self.remaining:
                continue
            try:
                w.write(lo, feats[:, i, lo - start:hi - start])
                self.remaining[w] -= 1
                if self.remaining[w] == 0:
                    w.close()
                    del self.remaining[w]
                    self.n_done += 1
                    self.seconds += w.seconds
                    self.bar.update(1)
            except OSError as e:
                self.drop(w, f"{w.path}: cannot write ({audio.one_line(e)})")
        if time.time() - self.shown > 1:
            self.shown = time.time()
            self.bar.set_postfix_str(f"{self.seconds / 3600:.2f} h audio, "
                                     f"{self.seconds / max(self.shown - self.t0, 1e-9):.0f} audio-s/s")


def extract_files(model: MERT, jobs: list[tuple[Path, Path]], layers: list[int], pool: str = "none",
                  chunk_s: float | None = None, overlap_s: float = 5.0, batch: int = 1, overwrite: bool = False,
                  progress: bool = True, normalize: bool = False, chunk_stats: str = "file",
                  model_id: str | None = None, ckpt_name: str | None = None, workers: int = 0, sink=None,
                  stats: dict | None = None, agree=None) -> tuple[int, int, list[str]]:
    """Write features of each (audio file, .npy) pair with a loaded model; returns (written, skipped, errors).

    A file that cannot be read or run is named in the errors and on stderr, and the others go on. Outputs
    made the same way from the same input are skipped; outputs made another way raise OutputConflict before
    any work unless `overwrite`. `model_id` names the model in the records (default: model_fingerprint).
    `workers` > 0 decodes in that many DataLoader processes; `sink` takes the arrays (NpySink() by default,
    or a ShardSink); `stats`, a dict, receives "seconds" of audio written; `agree` maps this process's list
    of conflicts to every rank's (torchrun). Raises Interrupted at Ctrl-C or SIGTERM, outputs complete.
    `chunk_s` None: the model's default (model_info); `chunk_stats` is recorded as None for MERT-v2 (no GroupNorm)."""
    info = model_info(model)
    hop, rf, sr = info.hop, info.field, info.sample_rate
    device = next(model.parameters()).device
    sink = sink or NpySink()
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
    failed = []
    todo, skipped = _triage(jobs, sink, settings, overwrite, agree, failed)
    for _, dst in todo:
        sink.clean(dst)

    # longest first: neighbours have similar lengths, so batches waste little on padding
    order = sorted(range(len(todo)), key=lambda k: (-_size(todo[k][0]), k))
    ds = DecodeSet([s for s, _ in todo], sr, info.min_samples, normalize, name=info.name)
    bar = tqdm(total=len(todo), unit="file", desc="extract", file=sys.stderr, disable=None if progress else True,
               dynamic_ncols=True)
    batches = _Batches(model, layers, batch, device, failed, bar)
    items = decoded(ds, order, workers)
    try:
        for k, x, msg, caught in items:
            check_stop()
            src, dst = todo[k]
            for wmsg in caught:
                tqdm.write(f"warning: {wmsg}", file=sys.stderr)
            if x is None:
                _fail(failed, msg)
                bar.update(1)
                continue
            n_frames = int(model.num_frames(len(x)))
            shape = (len(layers), n_frames, info.dim)
            record = {**settings, "ckpt": ckpt_name, "arch": info.name, "frame_grid": list(info.grid),
                      "source": _source_stamp(src), "shape": list(shape),
                      "frames": n_frames, "device": str(device), "torch": torch.__version__,
                      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            try:
                w = PoolWriter(src, dst, shape, record, sink, pool) if pool != "none" else \
                    FrameWriter(src, dst, shape, record, sink)
            except OSError as e:
                _fail(failed, f"{dst}: cannot write ({audio.one_line(e)})")
                bar.update(1)
                continue
            w.seconds = len(x) / sr
            plan = plan_chunks(n_frames, chunk, overlap)
            batches.add(w, _segments(model, info, x, plan, chunk_stats, device))
        batches.drain(0)
    except BaseException:
        for w in batches.remaining:  # interrupted: what is not complete is not an output
            w.abort()
        raise
    finally:
        items.close()  # stops the loader's workers
        sink.finish()
        bar.close()
    if stats is not None:
        stats["seconds"] = stats.get("seconds", 0.0) + batches.seconds
    return batches.n_done, skipped, failed


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
               "  torchrun --nproc_per_node 8 extract.py music/ -o feats/ --batch 8   # 8 GPUs, a balanced share each\n"
               "  python extract.py music/ -o feats/ --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT\n"
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
    add_flag(p, "--workers", type=int, default=None,
             help="decoding processes per device; 0 decodes in this process "
                  "(default: on a GPU min(8, CPUs per GPU - 1), else 0)")
    add_flag(p, "--out_format", default="npy", choices=["npy", "shards"],
             help="npy: one .npy + record per input; shards: per process, ~1 GB feats-*.bin files with "
                  ".json indexes (needs -o) (default: npy)")
    add_flag(p, "--shard", default=None,
             help="do part I of N of the inputs (I/N, 0-based), or 'slurm' for the Slurm array task's part "
                  "(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT)")
    add_flag(p, "--device", default="auto",
             help="auto, cpu, cuda, cuda:1 or mps; under torchrun cuda means cuda:LOCAL_RANK (default: auto)")
    add_flag(p, "--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
             help="compute dtype; outputs are float32 (default: float32)")
    add_flag(p, "--overwrite", action="store_true",
             help="recompute every input whose output exists, including outputs made another way")
    return p


def parse_shard(spec: str | None) -> tuple[int, int]:
    """--shard: 'I/N' -> (I, N); 'slurm' -> the array task's (index, count); None -> (0, 1)."""
    if spec is None:
        return 0, 1
    if spec == "slurm":
        env = os.environ
        if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
            raise ValueError("--shard slurm: not in a Slurm array job (no SLURM_ARRAY_TASK_ID/COUNT)")
        spec = f"{int(env['SLURM_ARRAY_TASK_ID']) - int(env.get('SLURM_ARRAY_TASK_MIN', 0))}/" \
               f"{env['SLURM_ARRAY_TASK_COUNT']}"
    m = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise ValueError(f"--shard {spec}: use I/N with 0 <= I < N (e.g. 0/4), or slurm")
    return int(m[1]), int(m[2])


LOCK_NAME = ".extract.lock"


def take_lock(folder: Path, shard: tuple[int, int], made: list | None = None) -> list:
    """Lock an output folder for this run (fcntl.flock, released when the process ends): exclusive for a
    whole run; for --shard I/N shared, plus an exclusive lock of that part, so parts run side by side.
    Creating the lock file is the writability check. Raises ValueError (one line) if not possible. Folders
    this call creates are appended to `made`, outermost first."""
    held = []
    try:
        new = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
        folder.mkdir(parents=True, exist_ok=True)
        if made is not None:
            made += new
        names = [(LOCK_NAME, fcntl.LOCK_SH if shard[1] > 1 else fcntl.LOCK_EX)]
        if shard[1] > 1:
            names.append((f".extract.shard-{shard[0]}-of-{shard[1]}.lock", fcntl.LOCK_EX))
        for name, mode in names:
            f = open(folder / name, "a+")
            held.append(f)
            try:
                fcntl.flock(f, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                who = f.read().strip()
                raise ValueError(f"{folder}: another extract.py is writing there ({who or 'a sharded run'}); "
                                 f"wait for it to end, or write to another -o") from None
            if mode == fcntl.LOCK_EX and name == LOCK_NAME:
                f.truncate(0)
                f.write(f"pid {os.getpid()} on {os.uname().nodename}, since "
                        f"{datetime.datetime.now().isoformat(timespec='seconds')}")
                f.flush()
    except OSError as e:
        for f in held:
            f.close()
        raise ValueError(f"{folder}: cannot write there ({audio.one_line(e)})") from None
    except ValueError:
        for f in held:
            f.close()
        raise
    return held


def _remove_made(made: list) -> None:
    """Remove the folders a failed start created (innermost first), with the lock files in them, if they hold
    nothing else."""
    for folder in reversed(made):
        try:
            for f in folder.glob(".extract*.lock"):
                f.unlink()
            folder.rmdir()
        except OSError:  # something else is there now: keep it
            pass


def _roots(inputs: list[str], out: str | None) -> list[Path]:
    """The folders a run writes into: -o, or each input folder and each input file's folder."""
    if out:
        return [Path(out)]
    return sorted({Path(a) if Path(a).is_dir() else Path(a).parent for a in inputs})


def _default_workers(device: torch.device) -> int:
    if device.type != "cuda":
        return 0  # on a CPU decoding takes cores from the model; one process does both in turn
    per_gpu = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(8, per_gpu - 1))


@contextlib.contextmanager
def _signals():
    """Ctrl-C and SIGTERM set a flag for the length of a run (see _on_signal); restored after."""
    import threading  # a signal that came during the imports (python extract.py) stays in _STOP
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _STOP.clear()


def main(argv=None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 some inputs failed, 2 usage error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    dist = torch.distributed
    with _signals():
        held, made = [], []
        rc = 2
        try:
            rc = _run(args, held, made)
            return rc
        except Interrupted:
            print("extract.py: interrupted; every output written is complete, and a rerun finishes the rest",
                  file=sys.stderr)
            return 128 + (_STOP[0] if _STOP else signal.SIGINT)
        finally:
            for f in held:
                f.close()
            if rc == 2:  # a failed start leaves no output folder it made behind (nothing was written into it)
                _remove_made(made)
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


def _run(args, held: list, made: list) -> int:
    dist = torch.distributed
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    master = rank == 0
    err = lambda msg: print(f"extract.py: {msg}", file=sys.stderr) if master else None  # noqa: E731
    if args.batch < 1 or not 0 <= (args.chunk or 0) < math.inf or not 0 <= args.overlap < math.inf:
        err("--batch must be >= 1 and --chunk/--overlap finite and >= 0")
        return 2
    if args.workers is not None and args.workers < 0:
        err("--workers must be >= 0")
        return 2
    if args.out_format == "shards" and not args.out:
        err("--out_format shards needs an output folder (-o)")
        return 2
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        err(f"-o {args.out}: exists and is not a folder")
        return 2
    ckpt = args.ckpt or DEFAULT_CKPT
    if args.ckpt is None and not DEFAULT_CKPT.exists():
        err(NO_DEFAULT_MSG.format(path=DEFAULT_CKPT))
        return 2
    try:
        shard = parse_shard(args.shard)
        device = pick_device(args.device)
        if world > 1 and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)  # each rank its own GPU
    except ValueError as e:
        err(str(e))
        return 2
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def gather(obj) -> list:
        if world == 1:
            return [obj]
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out
    check_stop()
    skipped_files = []
    try:
        jobs = resolve_jobs(args.inputs, args.out, skipped_files)
        if not jobs:
            err(f"no audio input: nothing in {', '.join(args.inputs)} that soundfile can decode "
                f"({' '.join(sorted(audio.AUDIO_EXTENSIONS))})")
            return 2
    except audio.AudioError as e:
        err(audio.one_line(e))
        return 2
    # The output folders: writable and locked before any work (rank 0 for all; the others hear its answer)
    problem = None
    if master:
        try:
            for root in _roots(args.inputs, args.out):
                held += take_lock(root, shard, made)
            if args.out_format == "shards":
                ShardSink.clean_folder(Path(args.out), None if shard[1] == 1 else f"{shard[0]:03d}of{shard[1]:03d}")
        except ValueError as e:
            problem = str(e)
    problem = gather(problem)[0]
    if problem:
        err(problem)
        return 2
    for path, why in skipped_files if master else []:
        print(f"error: {path}: {why}", file=sys.stderr)
    check_stop()
    try:
        dtype = getattr(torch, args.dtype)
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
    check_stop()
    # This process's share: part I of N (--shard), then this rank's part of that, balanced by file size
    sizes = [_size(src) for src, _ in jobs]
    mine = balanced_split(sizes, shard[1])[shard[0]]
    mine = [mine[i] for i in balanced_split([sizes[j] for j in mine], world)[rank]]
    part = f"{shard[0]:03d}of{shard[1]:03d}-r{rank:03d}of{world:03d}"
    sink = ShardSink(Path(args.out), part) if args.out_format == "shards" else NpySink()
    workers = _default_workers(device) if args.workers is None else args.workers
    stats, t0 = {}, time.time()
    try:
        n_done, skipped, failed = extract_files(
            model, [jobs[i] for i in mine], layers, args.pool, args.chunk, args.overlap, args.batch,
            args.overwrite, progress=local_rank == 0, normalize=args.normalize, chunk_stats=args.chunk_stats or "file",
            model_id=model_id, ckpt_name=str(ckpt), workers=workers, sink=sink, stats=stats,
            agree=lambda c: [x for r in gather(c) for x in r])
    except ValueError as e:
        err(str(e))
        return 2
    every = gather((n_done, skipped, failed, stats.get("seconds", 0.0)))
    if not master:
        return 1 if any(r[2] for r in every) or skipped_files else 0
    n_done, skipped = sum(r[0] for r in every), sum(r[1] for r in every)
    failed = [f"{p}: {why}" for p, why in skipped_files] + [m for r in every for m in r[2]]
    seconds, wall = sum(r[3] for r in every), time.time() - t0
    if args.out:  # every failure with its reason, one per line, for the next step of a pipeline
        name = "extract-failures.txt" if shard[1] == 1 else f"extract-failures.shard-{shard[0]}-of-{shard[1]}.txt"
        try:
            if failed:
                (Path(args.out) / name).write_text("".join(m + "\n" for m in failed))
            else:
                (Path(args.out) / name).unlink(missing_ok=True)
        except OSError as e:
            err(f"cannot write the list of failures: {audio.one_line(e)}")
    print(f"extract.py: {n_done} written, {skipped} already there, {len(failed)} failed; {seconds / 3600:.2f} h "
          f"of audio in {wall:.1f} s ({seconds / max(wall, 1e-9):.0f} audio-s/s"
          f"{f', {world} processes' if world > 1 else ''})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
