"""MERT-v2 on the CPU: time per audio-second and peak memory, and the error of bfloat16 against float32.

    python research/mert2_measure.py speed --seconds 360              # released size, random weights
    python research/mert2_measure.py speed --seconds 30 --model mert1-95m
    python research/mert2_measure.py bf16 --seconds 10 --blocks 2

speed: one process per measurement (peak RSS is the process's high-water mark, so run one per call):
builds the model at random initialisation (MERT-v2: the released widths and --blocks Conformer blocks;
mert1-95m: mert.py's 95m preset), then, after a 2 s warm-up, extracts every hidden state of a --seconds clip in one
forward, --repeat times, and prints one JSON line: seconds per audio-second (median), peak RSS and the model size.
bf16: the released widths with --blocks blocks and the seeded weights of research/mert2_reference.py
(random but at trained-like scales, GRN on), a --seconds clip, float32 against (a) torch.autocast
bfloat16 on float32 weights and (b) the model cast to bfloat16 (what extract.py's --dtype does);
prints the max abs error and the cosine similarity (over all frames, per state) for each.
"""
import argparse
import importlib.util
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import mert2  # noqa: E402


def reference_helpers():
    """research/mert2_reference.py's seeded weights and test signal (without importing the reference)."""
    spec = importlib.util.spec_from_file_location("mert2_reference", ROOT / "research" / "mert2_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def speed(args):
    torch.manual_seed(0)
    if args.model == "mert1-95m":
        import mert
        model = mert.MERT(mert.MERTConfig.from_preset("95m", n_codebooks=0, cqt_bins=0)).eval()
    else:
        model = mert2.MERT2(mert2.MERT2Config(num_hidden_layers=args.blocks, variant="fs")).eval()
    n_params = sum(p.numel() for p in model.parameters())
    wav = reference_helpers().wave(int(args.seconds * 24000), seed=1)[None]
    rss_model = peak_rss_gib()
    model.extract(wav[:, :48000])  # warm-up (first-call kernel setup), not timed
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        out = model.extract(wav)
        times.append(time.perf_counter() - t)
        shape = tuple(out.shape)
        del out
    print(json.dumps({"model": args.model, "blocks": args.blocks if args.model == "mert2" else None,
                      "params": n_params, "seconds": args.seconds, "threads": torch.get_num_threads(),
                      "s_per_audio_s": round(statistics.median(times) / args.seconds, 4),
                      "wall_s": [round(t, 2) for t in times], "states": shape,
                      "peak_rss_gib": round(peak_rss_gib(), 2), "rss_after_build_gib": round(rss_model, 2)}))


def bf16(args):
    ref = reference_helpers()
    cfg = mert2.MERT2Config(num_hidden_layers=args.blocks, variant="fs")
    model = mert2.MERT2(cfg).eval()
    model.load_state_dict(ref.seeded_state({k: v.shape for k, v in model.state_dict().items()}), strict=True)
    wav = ref.wave(int(args.seconds * 24000), seed=2)
    t = time.perf_counter()
    want = model.extract(wav)
    times = {"float32": time.perf_counter() - t}
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model.extract(wav).float()
    times["autocast"] = time.perf_counter() - t
    model.to(torch.bfloat16)
    t = time.perf_counter()
    cast = model.extract(wav).float()
    times["cast"] = time.perf_counter() - t
    report = {"seconds": args.seconds, "blocks": args.blocks, "wall_s": {k: round(v, 2) for k, v in times.items()}}
    for name, got in (("autocast_bf16", auto), ("model_bf16", cast)):
        report[name] = [{"state": i, "max_abs": round(float((got[i] - want[i]).abs().max()), 4),
                         "rms_ref": round(float(want[i].pow(2).mean().sqrt()), 4),
                         "cosine": round(float(torch.nn.functional.cosine_similarity(
                             got[i].flatten(), want[i].flatten(), dim=0)), 6),
                         "min_frame_cosine": round(float(torch.nn.functional.cosine_similarity(
                             got[i, 0], want[i, 0], dim=-1).min()), 6)} for i in range(len(want))]
    print(json.dumps(report))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="example: python research/mert2_measure.py speed --seconds 360")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed", help="time per audio-second and peak RSS of one whole-clip forward")
    s.add_argument("--seconds", type=float, default=360.0, help="clip length (default: 360)")
    s.add_argument("--blocks", type=int, default=24, help="Conformer blocks of MERT-v2 (default: 24)")
    s.add_argument("--model", choices=["mert2", "mert1-95m"], default="mert2", help="which model (default: mert2)")
    s.add_argument("--repeat", type=int, default=1, help="forwards timed, median reported (default: 1)")
    b = sub.add_parser("bf16", help="bfloat16 (autocast and cast model) against float32")
    b.add_argument("--seconds", type=float, default=10.0, help="clip length (default: 10)")
    b.add_argument("--blocks", type=int, default=2, help="Conformer blocks (default: 2)")
    args = p.parse_args()
    if args.what == "speed":
        speed(args)
    else:
        bf16(args)


if __name__ == "__main__":
    main()
