"""Extract MERT features from audio files: one .npy per input, named after it.

    python extract.py song.wav                         # -> song.npy beside it: [layers, frames, dim] float32
    python extract.py music/ -o feats/ --layers 4-8 --pool mean   # -> feats/<sub/dirs>/<stem>.npy: [layers, dim]

Any format soundfile reads, any sample rate or channel count (mixed to mono, resampled to 24 kHz).
Long files run in chunks of --chunk seconds that overlap by --overlap seconds; each output frame is taken
from the chunk where it lies furthest from an edge, so the frame count and timestamps are those of the
whole file: frame t covers samples [320 t, 320 t + 400) at 24 kHz, i.e. it is centred on (320 t + 200) / 24000 s.

      file  |------------------------------------------------------------------|
      chunk |==========keep======|~~~~|                        overlap ~~, boundary at its middle
      chunk              |~~~~|======keep=======|~~~~|
      chunk                                |~~~~|=========keep====(to the end)=|

Unreadable, empty, too-short or NaN-containing files are named on stderr and skipped; the exit code is 1
when any input failed, 2 on usage errors.
"""

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import audio
from mert import MERT, CheckpointError

# The model extract.py uses when --ckpt is not given: a small model pretrained by this repository's own
# pipeline on freely licensed music, shipped with it (README, "The shipped model").
DEFAULT_CKPT = Path(__file__).resolve().parent / "models" / "mert_default.pt"
NO_DEFAULT_MSG = (
    "no --ckpt given and the shipped default model {path} is missing (copy models/ along with extract.py).\n"
    "Or name a model: the official weights from your local Hugging Face cache, e.g. --ckpt m-a-p/MERT-v1-95M\n"
    "(fetch once with `huggingface-cli download m-a-p/MERT-v1-95M`), a folder with config.json and\n"
    "pytorch_model.bin / model.safetensors, a fairseq MERT .pt, or a checkpoint written by train.py.")


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


class NpyWriter:
    """Writes a [layers, frames, dim] float32 .npy piece by piece (seek + write, so memory stays flat),
    to a temporary file renamed into place when complete."""

    def __init__(self, src: Path, path: Path, shape: tuple):
        self.src, self.path, self.shape = src, path, shape
        self.tmp = path.with_name(path.name + ".tmp")
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
        os.replace(self.tmp, self.path)

    def abort(self):
        self.f.close()
        self.tmp.unlink(missing_ok=True)


class PoolWriter:
    """Accumulates per-layer sums over frames; writes [layers, dim] (mean) or [layers, 2*dim] (mean ++ std)."""

    def __init__(self, src: Path, path: Path, shape: tuple, mode: str):
        self.src, self.path, self.mode, self.n = src, path, mode, shape[1]
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
        tmp = self.path.with_name(self.path.name + ".tmp.npy")
        np.save(tmp, out.astype(np.float32))
        os.replace(tmp, self.path)

    def abort(self):
        pass


def resolve_jobs(inputs: list[str], out_dir: str | None) -> list[tuple[Path, Path]]:
    """(audio file, output .npy) pairs: a file maps to <out or its folder>/<stem>.npy, a folder's files
    to <out or the folder>/<relative path>.npy. Raises audio.AudioError for a path that does not exist."""
    jobs = []
    for arg in inputs:
        p = Path(arg)
        if p.is_dir():
            base = Path(out_dir) if out_dir else p
            for f in audio.find_audio([p], recursive=True):
                jobs.append((f, base / f.relative_to(p).with_suffix(".npy")))
        elif p.exists():
            jobs.append((p, (Path(out_dir) if out_dir else p.parent) / (p.stem + ".npy")))
        else:
            raise audio.AudioError(f"{p}: no such file or folder")
    return jobs


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def extract_files(model: MERT, jobs: list[tuple[Path, Path]], layers: list[int], pool: str = "none",
                  chunk_s: float = 30.0, overlap_s: float = 5.0, batch: int = 1, overwrite: bool = False,
                  progress: bool = True) -> tuple[int, int, list[str]]:
    """Write features of each (audio file, .npy) pair with a loaded model; returns (written, skipped, errors).

    A file that cannot be read or run is named in the errors and on stderr, and the others go on."""
    cfg = model.config
    hop, rf = cfg.hop, cfg.receptive_field
    device = next(model.parameters()).device
    chunk = int(round(chunk_s * cfg.sample_rate / hop))
    overlap = int(round(overlap_s * cfg.sample_rate / hop))
    if chunk and overlap >= chunk:
        raise ValueError("--overlap must be shorter than --chunk")

    seen, todo, skipped, failed = {}, [], 0, []

    def fail(msg):
        failed.append(msg)
        tqdm.write(f"error: {msg}", file=sys.stderr)
    for src, dst in jobs:
        if dst in seen:
            fail(f"{src}: its output {dst} collides with that of {seen[dst]}")
            continue
        seen[dst] = src
        if dst.exists() and not overwrite:
            skipped += 1
        else:
            todo.append((src, dst))

    pending = []  # (writer, wav segment, keep_lo, keep_hi, start) waiting for a batch
    remaining = {}  # writer -> chunks not yet written
    n_done = 0
    bar = tqdm(total=len(todo), unit="file", desc="extract", file=sys.stderr, disable=None if progress else True)

    def run_batch():
        nonlocal n_done
        lens = [seg.shape[0] for _, seg, _, _, _ in pending]
        wav = torch.zeros(len(pending), max(lens))
        for i, (_, seg, _, _, _) in enumerate(pending):
            wav[i, :len(seg)] = torch.from_numpy(seg)
        try:
            feats = model.extract(wav.to(device), lengths=lens if len(set(lens)) > 1 else None, layers=layers)
            feats = feats.float().cpu().numpy()  # (layers, B, T, dim)
        except RuntimeError as e:  # out of memory and the like: fail these files, keep going
            for w, *_ in pending:
                if w in remaining:
                    fail(f"{w.src}: model failed ({type(e).__name__}: {str(e).splitlines()[0]})")
                    w.abort()
                    del remaining[w]
            pending.clear()
            return
        for i, (w, _, lo, hi, start) in enumerate(pending):
            if w not in remaining:
                continue
            w.write(lo, feats[:, i, lo - start:hi - start])
            remaining[w] -= 1
            if remaining[w] == 0:
                w.close()
                del remaining[w]
                n_done += 1
                bar.update(1)
        pending.clear()

    for src, dst in todo:
        try:
            x = audio.load(src, sr=cfg.sample_rate)
            if len(x) < rf:
                raise audio.AudioError(f"{src}: too short ({len(x)} samples at {cfg.sample_rate} Hz; one frame needs {rf})")
        except audio.AudioError as e:
            fail(str(e))
            bar.update(1)
            continue
        n_frames = int(model.num_frames(len(x)))
        shape = (len(layers), n_frames, cfg.dim)
        w = PoolWriter(src, dst, shape, pool) if pool != "none" else NpyWriter(src, dst, shape)
        plan = plan_chunks(n_frames, chunk, overlap)
        remaining[w] = len(plan)
        for start, length, lo, hi in plan:
            seg = x[start * hop: start * hop + (length - 1) * hop + rf]
            pending.append((w, seg, lo, hi, start))
            if len(pending) >= batch:
                run_batch()
    if pending:
        run_batch()
    bar.close()
    return n_done, skipped, failed


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    p = argparse.ArgumentParser(
        description="Extract MERT features (all hidden states, 75 frames/s) from audio files or folders.",
        epilog="example: python extract.py music/ -o feats/ --ckpt m-a-p/MERT-v1-95M --layers 4-8 --pool mean",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="audio files and/or folders (searched recursively)")
    p.add_argument("-o", "--out", default=None, help="output folder (default: beside each input)")
    p.add_argument("--ckpt", default=None, help="model: HF folder, hub id in the local HF cache, fairseq .pt or ours (default: the shipped model)")
    p.add_argument("--layers", default="all", help="hidden states to keep: all, N, A-B, or a comma list (0 = input of layer 1)")
    p.add_argument("--pool", default="none", choices=["none", "mean", "meanstd"], help="pool over time: none -> [layers, frames, dim]; mean -> [layers, dim]; meanstd -> [layers, 2*dim]")
    p.add_argument("--chunk", type=float, default=30.0, help="seconds per chunk for long files (0: whole file at once)")
    p.add_argument("--overlap", type=float, default=5.0, help="seconds of overlap between chunks")
    p.add_argument("--batch", type=int, default=1, help="chunks per forward pass (clips of unequal length are padded exactly)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype (outputs are float32)")
    p.add_argument("--overwrite", action="store_true", help="recompute inputs whose output already exists")
    return p


def main(argv=None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 some inputs failed, 2 usage error)."""
    args = build_parser().parse_args(argv)
    err = lambda msg: print(f"extract.py: {msg}", file=sys.stderr)  # noqa: E731
    if args.batch < 1 or args.chunk < 0 or args.overlap < 0:
        err("--batch must be >= 1 and --chunk/--overlap >= 0")
        return 2
    ckpt = args.ckpt or DEFAULT_CKPT
    if args.ckpt is None and not DEFAULT_CKPT.exists():
        err(NO_DEFAULT_MSG.format(path=DEFAULT_CKPT))
        return 2
    try:
        jobs = resolve_jobs(args.inputs, args.out)
        model = MERT.from_pretrained(ckpt)
        device, dtype = pick_device(args.device), getattr(torch, args.dtype)
        model = model.to(device=device, dtype=dtype)
        layers = parse_layers(args.layers, model.num_states)
    except (audio.AudioError, CheckpointError, ValueError, RuntimeError) as e:
        err(str(e))
        return 2
    try:
        t0 = time.time()
        n_done, skipped, failed = extract_files(model, jobs, layers, args.pool, args.chunk, args.overlap,
                                                args.batch, args.overwrite)
    except ValueError as e:
        err(str(e))
        return 2
    print(f"extract.py: {n_done} written, {skipped} already there, {len(failed)} failed "
          f"({time.time() - t0:.1f} s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
