"""How much do extract.py's chunked features differ from one forward over the whole file?

    python research/chunk_dependence.py music/heldout/*.ogg --seconds 75 --chunks 30:5,20:5,10:2
    python research/chunk_dependence.py music/heldout/*.ogg --ckpt random:95m --seconds 75
    python research/chunk_dependence.py long.wav --ckpt random:mert2 --blocks 4 --seconds 75 --chunks 30:5,10:2

For each file (cut to --seconds from --offset, so the whole-file forward fits in memory and time), runs
extract.py's own code path (extract_files, pool none) once with --chunk 0 (the whole excerpt in one forward,
the reference) and once per chunk:overlap setting and --chunk_stats mode, and prints the relative L2 error
per hidden state, ||chunked - whole|| / ||whole|| over all frames, and its mean over the files.
--ckpt takes anything extract.py does (MERT-v1 or MERT-v2), random:<preset> for that MERT-v1 preset at random
initialisation (seed 0), or random:mert2 for MERT-v2 at the released widths with --blocks Conformer blocks and
research/mert2_reference.py's seeded weights (random, at trained-like scales, GRN on: a fresh MERT-v2's GRN is the
identity). MERT-v2 has no --chunk_stats (no GroupNorm): its rows say "-".
"""
import importlib.util
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import audio  # noqa: E402
import extract  # noqa: E402
import mert2  # noqa: E402
from mert import MERT, MERTConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def load_model(spec: str, blocks: int = 24):
    """A checkpoint as extract.py loads it, random:<preset> (seed 0, encoder only) or random:mert2 (seeded)."""
    if spec == "random:mert2":
        ref_spec = importlib.util.spec_from_file_location("mert2_reference", ROOT / "research" / "mert2_reference.py")
        ref = importlib.util.module_from_spec(ref_spec)
        ref_spec.loader.exec_module(ref)  # its seeded weights only; the reference itself is not imported
        model = mert2.MERT2(mert2.MERT2Config(num_hidden_layers=blocks))
        model.load_state_dict(ref.seeded_state({k: v.shape for k, v in model.state_dict().items()}), strict=True)
        return model.eval()
    if spec.startswith("random:"):
        torch.manual_seed(0)
        return MERT(MERTConfig.from_preset(spec.split(":", 1)[1], n_codebooks=0, cqt_bins=0)).eval()
    return extract.load_model(spec)


def features(model, wav_path: Path, out: Path, chunk: float, overlap: float, stats: str) -> np.ndarray:
    """extract.py's [layers, frames, dim] for one file at these settings."""
    dst = out / f"{chunk}_{overlap}_{stats}.npy"
    written, _, failed = extract.extract_files(model, [(wav_path, dst)], list(range(model.num_states)),
                                               chunk_s=chunk, overlap_s=overlap, chunk_stats=stats,
                                               progress=False, model_id="measure")
    assert written == 1 and not failed, failed
    return np.load(dst)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="audio files")
    p.add_argument("--ckpt", default=str(extract.DEFAULT_CKPT), help="model (default: the shipped one), or random:95m")
    p.add_argument("--seconds", type=float, default=75.0, help="length of the excerpt of each file (default: 75)")
    p.add_argument("--offset", type=float, default=30.0, help="where the excerpt starts, seconds (default: 30)")
    p.add_argument("--chunks", default="30:5,20:5,10:2", help="chunk:overlap settings, seconds (default: 30:5,20:5,10:2)")
    p.add_argument("--stats", default="chunk,file", help="--chunk_stats modes to measure (default: chunk,file)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--blocks", type=int, default=24, help="Conformer blocks of random:mert2 (default: 24)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.ckpt, args.blocks)
    settings = [tuple(float(v) for v in s.split(":")) for s in args.chunks.split(",")]
    modes = args.stats.split(",") if extract.model_info(model).file_stats else ["-"]  # MERT-v2: no statistics
    rows = {}  # (chunk, overlap, mode) -> [per-file rel L2 per layer]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, f in enumerate(args.files):
            x = audio.load(f, sr=24000)
            a = int(args.offset * 24000)
            x = x[a:a + int(args.seconds * 24000)]
            (tmp / str(i)).mkdir()
            wav = tmp / str(i) / "excerpt.wav"
            sf.write(wav, x, 24000, subtype="FLOAT")
            whole = features(model, wav, tmp / str(i), 0.0, 0.0, "file")
            norm = np.linalg.norm(whole.reshape(whole.shape[0], -1), axis=1)
            print(f"{Path(f).name}: {len(x) / 24000:.1f} s, {whole.shape[1]} frames", flush=True)
            for chunk, overlap in settings:
                for mode in modes:
                    got = features(model, wav, tmp / str(i), chunk, overlap, "file" if mode == "-" else mode)
                    rel = np.linalg.norm((got - whole).reshape(whole.shape[0], -1), axis=1) / norm
                    rows.setdefault((chunk, overlap, mode), []).append(rel)
                    print(f"  chunk {chunk:g}/{overlap:g} s, stats {mode:5s}: " + " ".join(f"{r:.3f}" for r in rel),
                          flush=True)
    print(f"\nmean over {len(args.files)} file(s), {args.ckpt}; relative L2 per hidden state 0..{model.num_states - 1}")
    for (chunk, overlap, mode), rels in rows.items():
        print(f"| {chunk:g} / {overlap:g} s | {mode} | " + " | ".join(f"{r:.3f}" for r in np.mean(rels, axis=0)) + " |")


if __name__ == "__main__":
    main()
