"""Measurements behind docs/recipe.md: masked fraction by rows per device, acoustic-code agreement of
per-crop encodes with whole-file encodes by frame position and left context, and the teacher's cost.

    OMP_NUM_THREADS=1 python research/recipe_measure.py masks
    OMP_NUM_THREADS=1 python research/recipe_measure.py codes --files 6 --crops 5 --contexts 0,1,2,5,10
    OMP_NUM_THREADS=1 python research/recipe_measure.py codes --float64 --max_seconds 60 --files 3 --crops 4 \
        --contexts 0,0.5,1,2,5,10
    OMP_NUM_THREADS=1 python research/recipe_measure.py floor --files 2 --skip 1
    OMP_NUM_THREADS=1 python research/recipe_measure.py cost --contexts 0,1,2,5,10

The acoustic teacher is an EnCodec-24 kHz-architecture RVQ-VAE (rvq.py preset "encodec24k": causal
SEANet, 2-layer LSTM) with random weights (torch seed 0) whose 8 codebooks are k-means-seeded on the
encoder's latents of real music, as in the issue: no trained EnCodec weights are reachable here.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import audio  # noqa: E402
import rvq  # noqa: E402
from mert import compute_mask_indices  # noqa: E402

HOP, SR = 320, 24000


def masks(args):
    T = 374  # a 5 s crop
    out = {}
    for rows in (1, 2, 4, 7, 8, 16, 56, 64, 512):
        runs = max(20, 4000 // rows)
        fr = [compute_mask_indices(rows, T, 0.8, 5, 2, rng=np.random.default_rng([7, s])).mean() for s in range(runs)]
        out[rows] = round(float(np.mean(fr)), 4)
        print(f"rows {rows:4d}: masked fraction {np.mean(fr):.4f} (+- {np.std(fr) / np.sqrt(runs):.4f}, {runs} draws)", flush=True)
    return out


def teacher(files, seconds=30.0):
    """EnCodec-architecture RVQ-VAE, random weights, codebooks k-means-seeded on real music latents."""
    torch.manual_seed(0)
    m = rvq.RVQVAE(rvq.PRESETS["encodec24k"]).eval()
    zs = []
    with torch.no_grad():
        for f in files[:3]:
            x = torch.from_numpy(audio.load(f)[: int(seconds * SR)])[None]
            zs.append(m.encoder(x[:, None]))
    z = torch.cat(zs, -1)
    m.quantizer.codebooks = m.quantizer.codebooks[:8]
    torch.manual_seed(1)
    m.quantizer.init_(z)
    m.cfg.n_q = 8
    return m


def codes(args):
    files = sorted(Path(args.music).glob("*"))
    m = teacher(files)
    files = files[args.skip: args.skip + args.files]
    if args.float64:  # rounding cannot flip a near-tie: what is left is context
        m.double()
    crop = int(args.crop * SR) // HOP * HOP
    T = (crop - 400) // HOP + 1
    contexts = [float(c) for c in args.contexts.split(",")]
    stats = {c: {"first25": [], "all": [], "from100": [], "exact_frames": 0, "frames": 0, "crops_exact": 0}
             for c in contexts}
    rng = np.random.default_rng(0)
    n_crops = 0
    for f in files:
        x = torch.from_numpy(audio.load(f))
        if args.max_seconds:  # a causal teacher's codes of a file's first seconds do not depend on the rest
            x = x[: int(args.max_seconds * SR)]
        x = x.double() if args.float64 else x
        n = len(x) // HOP * HOP
        with torch.no_grad():
            whole = m.encode(x[None], n_q=8)[0]  # (8, frames) of the whole file in one pass
        for _ in range(args.crops):
            max_ctx = int(max(contexts) * SR)
            start = int(rng.integers(max_ctx // HOP, (n - crop) // HOP)) * HOP  # room for every context
            ref = whole[:, start // HOP: start // HOP + T]
            n_crops += 1
            for c in contexts:
                left = int(c * SR) // HOP * HOP
                with torch.no_grad():
                    got = m.encode(x[None, start - left: start + crop], n_q=8)[0, :, left // HOP: left // HOP + T]
                eq = (got == ref).float()  # (8, T)
                s = stats[c]
                s["first25"].append(eq[:, :25].mean().item())
                s["all"].append(eq.mean().item())
                s["from100"].append(eq[:, 100:].mean().item())
                s["exact_frames"] += int(eq.all(0).sum())
                s["frames"] += T
                s["crops_exact"] += int(bool(eq.all()))
        print(f"{f.name}: done ({n_crops} crops)", file=sys.stderr, flush=True)
        summarise(stats, contexts, n_crops, file=sys.stderr)
    return summarise(stats, contexts, n_crops)


def summarise(stats, contexts, n_crops, file=sys.stdout):
    out = {}
    for c in contexts:
        s = stats[c]
        out[c] = {"first25": round(float(np.mean(s["first25"])), 4), "all": round(float(np.mean(s["all"])), 4),
                  "from100": round(float(np.mean(s["from100"])), 4),
                  "frames_all8_equal": round(s["exact_frames"] / s["frames"], 5),
                  "crops_exact": f"{s['crops_exact']}/{n_crops}"}
        print(f"context {c:5.2f} s: code agreement first 25 frames {out[c]['first25']:.4f}, all {out[c]['all']:.4f}, "
              f"from frame 100 {out[c]['from100']:.4f}; frames with all 8 codes equal {out[c]['frames_all8_equal']:.5f}; "
              f"crops exactly equal {out[c]['crops_exact']}", file=file, flush=True)
    return out


def floor(args):
    """The rounding floor: the whole file against the file encoded from 1.09 s on (a start 75 + 7 frames later),
    compared from 30 s on, where the shifted encode has had 29 s of context. Any difference there is float
    rounding (convolutions over the same samples at another offset in the tensor round differently) flipping
    a near-tie, not missing context."""
    files = sorted(Path(args.music).glob("*"))
    m = teacher(files)
    files = files[args.skip: args.skip + args.files]
    shift = SR + 7 * HOP
    eq_all, eq_code, n = 0, 0.0, 0
    for f in files:
        x = torch.from_numpy(audio.load(f))
        with torch.no_grad():
            a = m.encode(x[None], n_q=8)[0]
            b = m.encode(x[None, shift:], n_q=8)[0]
        j0 = 30 * 75
        k = b.shape[1] - 1 - j0
        eq = a[:, shift // HOP + j0: shift // HOP + j0 + k] == b[:, j0: j0 + k]
        eq_all += int(eq.all(0).sum())
        eq_code += float(eq.float().sum())
        n += k
        print(f"{f.name}: codes equal {eq.float().mean().item():.5f}, frames with all 8 equal {eq.all(0).float().mean().item():.5f}",
              file=sys.stderr, flush=True)
    out = {"codes_equal": round(eq_code / (8 * n), 5), "frames_all8_equal": round(eq_all / n, 5), "frames": n}
    print(f"whole file vs the file from 1.09 s on, frames from 30 s: codes equal {out['codes_equal']:.5f}, frames with "
          f"all 8 codes equal {out['frames_all8_equal']:.5f} over {n} frames", flush=True)
    return out


def cost(args):
    """Teacher throughput in crop-audio-seconds per second for 8 crops of 5 s, with each left context;
    the contexts are timed in turn within each repeat, so a busy machine slows them alike."""
    files = sorted(Path(args.music).glob("*"))
    m = teacher(files)
    x = torch.from_numpy(audio.load(files[0]))
    crop = int(args.crop * SR) // HOP * HOP
    contexts = [float(c) for c in args.contexts.split(",")]
    times = {c: [] for c in contexts}
    for _ in range(args.repeats):
        for c in contexts:
            left = int(c * SR) // HOP * HOP
            wav = torch.stack([x[left + i * crop: 2 * left + (i + 1) * crop] for i in range(8)])  # 8 crops + context
            t0 = time.perf_counter()
            with torch.no_grad():
                m.encode(wav, n_q=8)
            times[c].append(time.perf_counter() - t0)
    out = {}
    for c in contexts:
        med = statistics.median(times[c])
        out[c] = round(8 * crop / SR / med, 2)
        print(f"context {c:5.2f} s: {out[c]:.2f} crop-audio-s/s (median of {args.repeats}; {med:.3f} s per 8 crops), "
              f"{out[c] / out[contexts[0]]:.2f} x the first", flush=True)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["masks", "codes", "floor", "cost"])
    p.add_argument("--music", default="/work/music/train", help="folder of real music")
    p.add_argument("--files", type=int, default=12, help="music files used")
    p.add_argument("--crops", type=int, default=8, help="random crops per file")
    p.add_argument("--crop", type=float, default=5.0, help="crop seconds")
    p.add_argument("--contexts", default="0,0.25,0.5,1,2,3,5,10", help="left contexts in seconds")
    p.add_argument("--repeats", type=int, default=7, help="timing repeats (median)")
    p.add_argument("--float64", action="store_true", help="codes: run the teacher in float64")
    p.add_argument("--max_seconds", type=float, default=0, help="codes: use only each file's first seconds (0: all)")
    p.add_argument("--skip", type=int, default=0, help="codes: skip this many files of the sorted folder first")
    p.add_argument("--json", help="also write the numbers here")
    a = p.parse_args()
    torch.set_num_threads(1)
    res = {"masks": masks, "codes": codes, "floor": floor, "cost": cost}[a.what](a)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
