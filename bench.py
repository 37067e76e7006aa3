"""Speed and memory: against the peer packages side by side (extract, cqt, rvq); our own pipeline (data, train, gpu).

    python bench.py extract          # mert.py vs transformers' HubertModel (sdpa), 95M, same weights
    python bench.py cqt              # cqt.py vs nnAudio's CQT and librosa.cqt, MERT's settings
    python bench.py rvq              # rvq.py encode speed: encodec24k vs the encodec package, and small
    python bench.py data             # loading CPU-s per 330m GPU-step: raw FLAC/WAV/MP3, shards, shards + codes
    python bench.py train            # train.py's step split into data, teachers, model (MFU, memory on a GPU)
    python bench.py gpu              # the prepared device check (<= 8 min on an H100/H200): one JSON
    python bench.py extract --quick  # --quick skips the slow 10-minute inputs
    python bench.py extract --pipeline --files 300 --batch 8   # extract.py's audio-s/s vs the model alone

Every peer figure is a ratio to the peer measured in the same process (time: median of --repeat runs,
candidates interleaved so that machine noise hits both alike) or in fresh subprocesses (peak memory:
the rise of the peak resident set size over the resident size after set-up, via /proc/self/clear_refs).
"""

import argparse
import importlib.machinery
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SR = 24_000  # MERT's sample rate: every signal here is made at it

# -----------------------------------------------------------------------------
# measurement helpers


def interleaved_medians(fns: dict, repeat: int, warmup: int = 1) -> dict:
    """Median wall time of each callable, running them in turn so that drifting load hits all alike."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_rise(fn) -> float:
    """MB by which the peak resident set size rises above the current one while fn() runs (Linux)."""
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current RSS
    fn()
    return (_status_kb("VmHWM") - before) / 1024


def in_subprocess(*args) -> dict:
    """Run `python bench.py _child ARGS` and return the JSON it prints last."""
    # glibc serves large blocks with mmap, so freed memory leaves the resident set between phases
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, __file__, "_child", *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"bench child {args} failed:\n{proc.stderr[-2000:]}")
    out = proc.stdout
    return json.loads(out.strip().splitlines()[-1])


def music_like(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A deterministic music-like test signal [batch, n] (tones, onsets, noise) at a realistic level."""
    g = np.random.default_rng(seed)
    t = np.arange(n) / SR
    out = np.zeros((batch, n), np.float32)
    for b in range(batch):
        f0 = 110 * 2 ** (g.integers(0, 24) / 12)
        x = sum(0.2 / h * np.sin(2 * np.pi * f0 * h * t + g.uniform(0, 6)) for h in range(1, 8))
        x = x * (0.6 + 0.4 * np.sign(np.sin(2 * np.pi * 2 * t)))  # on/off notes at 2 Hz
        out[b] = x + 0.02 * g.standard_normal(n)
    return torch.from_numpy(out)


def ratio_row(name: str, peer: float, ours: float, unit: str) -> str:
    """One printed line: both values and their ratio peer / ours (> 1: we are faster or smaller)."""
    return f"{name:<28} peer {peer:9.3f} {unit:<3} ours {ours:9.3f} {unit:<3} ratio {peer / ours:5.2f}x"


# -----------------------------------------------------------------------------
# extract: mert.py vs transformers HubertModel


def _hf_95m_folder(root: Path, layers: int = 12) -> Path:
    """A transformers HubertModel with MERT-v1-95M's config and random weights, saved with save_pretrained."""
    from transformers import HubertConfig, HubertModel
    folder = root / f"hf95m_{layers}"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        cfg = HubertConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                           intermediate_size=3072, feat_extract_norm="group", conv_bias=False,
                           do_stable_layer_norm=False, num_conv_pos_embeddings=128,
                           num_conv_pos_embedding_groups=16)
        HubertModel(cfg).save_pretrained(folder)
    return folder


def _load_extract_candidate(which: str, folder: Path):
    """(callable running one forward with all hidden states) for 'ours' or 'hf'."""
    if which == "ours":
        from mert import MERT
        m = MERT.from_pretrained(folder)
        return lambda x: m.extract(x)
    from transformers import HubertModel
    m = HubertModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    return lambda x: m(x, output_hidden_states=True)


def bench_extract(args):
    """mert.py vs transformers HubertModel (sdpa) on the same 95M weights: time and peak memory ratios."""
    if args.pipeline:
        return bench_extract_pipeline(args)
    torch.set_num_threads(args.threads)
    cases = [(1, 5.0), (1, 30.0), (8, 5.0)]
    root = Path(tempfile.mkdtemp(prefix="mert_bench_"))
    folder = _hf_95m_folder(root)
    ours, hf = _load_extract_candidate("ours", folder), _load_extract_candidate("hf", folder)
    print(f"extract: 95M (MERT-v1-95M config, random weights), fp32, {torch.get_num_threads()} threads, "
          f"median of {args.repeat}", flush=True)
    rows = []
    with torch.inference_mode():
        for B, sec in cases:
            x = music_like(int(sec * SR), B)
            t = interleaved_medians({"hf": lambda: hf(x), "ours": lambda: ours(x)}, args.repeat)
            rows.append(ratio_row(f"time {B}x{sec:g}s", t["hf"], t["ours"], "s"))
            print(rows[-1], flush=True)
    del ours, hf
    for B, sec in cases:
        mem = {w: in_subprocess("extract_mem", w, folder, B, sec, args.threads)["mb"] for w in ("hf", "ours")}
        rows.append(ratio_row(f"peak memory {B}x{sec:g}s", mem["hf"], mem["ours"], "MB"))
        print(rows[-1], flush=True)
    if not args.quick:
        rows.append(_bench_long_song(root, folder, args))
    print("\nsummary (ratio = peer / ours: > 1 is faster, >= 1 is no more memory)")
    print("\n".join(rows))


def _pipeline_folder(root: Path, n: int, max_s: float) -> Path:
    """n synthetic files: wav / flac / ogg in turn, at 24, 44.1 and 48 kHz, mono and stereo, 1 s to max_s."""
    import soundfile as sf
    src = root / "pipeline_music"
    src.mkdir(exist_ok=True)
    g = np.random.default_rng(0)
    for i in range(n):
        sr = (24000, 44100, 48000)[i % 3]
        fmt = ("wav", "flac", "ogg")[(i // 3) % 3]
        x = music_like(int(g.uniform(1.0, max_s) * sr), 1)[0].numpy()
        if i % 2:
            x = np.stack([x, 0.7 * x], 1)
        sf.write(src / f"{i:04d}.{fmt}", x, sr, **({"format": "OGG"} if fmt == "ogg" else {}))
    return src


def bench_extract_pipeline(args):
    """extract.py (decode, resample, forward, write) with 0, 1, 2 decoding workers against the model's
    forward alone on the same decoded audio and the same batches: audio-s/s and their ratio (efficiency)."""
    import extract
    from mert import MERT, MERTConfig
    torch.set_num_threads(args.threads)
    dev = extract.pick_device(args.device)
    root = Path(tempfile.mkdtemp(prefix="mert_pipeline_"))
    src = _pipeline_folder(root, args.files, args.max_seconds)
    jobs = extract.resolve_jobs([str(src)], str(root / "feats"))
    torch.manual_seed(0)
    models = {"shipped": extract.load_model(extract.DEFAULT_CKPT),
              "95M (random)": MERT(MERTConfig.from_preset("95m"))}
    ds = extract.DecodeSet([s for s, _ in jobs], SR, 400, False)
    clips = [x for _, x, _, _ in extract.decoded(ds, list(range(len(jobs))), 0)]
    pieces = []  # what extract.py feeds the model: files up to 30 s whole, longer ones in 30 s chunks, 5 s overlap
    for x in clips:
        for start, length, _, _ in extract.plan_chunks((len(x) - 400) // 320 + 1, 2250, 375):
            pieces.append(x[start * 320:start * 320 + (length - 1) * 320 + 400])
    pieces.sort(key=len, reverse=True)
    audio_s = sum(len(x) for x in clips) / SR
    print(f"extract pipeline: {len(jobs)} files ({audio_s / 60:.1f} min of audio), {dev}, batch {args.batch}, "
          f"{torch.get_num_threads()} torch threads, median of {args.repeat}", flush=True)
    rows = ["| model | model alone | 0 workers | 1 worker | 2 workers |", "|---|---|---|---|---|"]
    for name, m in models.items():
        m = m.to(dev).eval()

        def model_alone():
            with torch.inference_mode():
                for i in range(0, len(pieces), args.batch):
                    b = pieces[i:i + args.batch]
                    lens = [len(x) for x in b]
                    wav = torch.zeros(len(b), max(lens))
                    for j, x in enumerate(b):
                        wav[j, :lens[j]] = x
                    m.extract(wav.to(dev), lengths=lens if len(set(lens)) > 1 else None).float().cpu()

        def pipeline(workers):
            def run():
                with torch.inference_mode():
                    done, _, failed = extract.extract_files(m, jobs, list(range(m.num_states)), batch=args.batch,
                                                            overwrite=True, progress=False, model_id="bench",
                                                            workers=workers)
                assert done == len(jobs) and not failed, failed
            return run
        t = interleaved_medians({"alone": model_alone, **{w: pipeline(w) for w in (0, 1, 2)}}, args.repeat)
        rate = {k: audio_s / v for k, v in t.items()}
        rows.append(f"| {name} | {rate['alone']:.0f} audio-s/s | " + " | ".join(
            f"{rate[w]:.0f} ({rate[w] / rate['alone']:.2f})" for w in (0, 1, 2)) + " |")
        print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


def _bench_long_song(root: Path, folder: Path, args) -> str:
    """extract.py on a 10-minute song with --chunk 30: peak RSS of the whole process."""
    import soundfile as sf
    song = root / "song10min.wav"
    sf.write(song, music_like(600 * SR)[0].numpy(), SR, subtype="PCM_16")
    t0 = time.perf_counter()
    with open(root / "extract.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(HERE / "extract.py"), str(song), "-o", str(root / "feats"),
                                 "--ckpt", str(folder), "--chunk", "30", "--batch", "1"], stdout=log, stderr=log,
                                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not the largest of all children
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"extract.py failed: {(root / 'extract.log').read_text()[-2000:]}")
    peak_gb = usage.ru_maxrss / 1024 ** 2
    shape = np.load(root / "feats" / "song10min.npy", mmap_mode="r").shape
    row = (f"10-min song, --chunk 30       peak RSS {peak_gb:.2f} GB (goal < 2 GB), {wall:.0f} s, "
           f"output {shape}")
    print(row, flush=True)
    return row


# -----------------------------------------------------------------------------
# cqt: cqt.CQT vs nnAudio's CQT (CQT1992v2) and librosa.cqt, MERT's settings

CQT_ARGS = dict(sr=SR, hop_length=320, fmin=32.7, n_bins=336, bins_per_octave=48)
CQT_CASES = {"1x30s": (1, 30.0), "8x5s": (8, 5.0), "1x10min": (1, 600.0)}


def _cqt_candidate(name: str):
    """Build candidate `name` (kernels included) -> callable(x: float32 tensor [B, samples])."""
    if name == "ours":
        from cqt import CQT
        m = CQT(**CQT_ARGS)
        return lambda x: m(x)
    if name == "nnAudio":
        from nnAudio.features.cqt import CQT as NNAudioCQT
        m = NNAudioCQT(**CQT_ARGS, pad_mode="constant", verbose=False)
        return lambda x: m(x)
    if name == "librosa":
        import librosa
        return lambda x: np.abs(librosa.cqt(x.numpy(), **CQT_ARGS))  # multichannel: [B, bins, frames]
    raise ValueError(f"unknown candidate {name!r}")


def _cqt_signal(case: str) -> torch.Tensor:
    batch, seconds = CQT_CASES[case]
    return music_like(int(seconds * SR), batch)


def _available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception as e:  # a missing or broken peer is reported and skipped, not fatal
        print(f"{module} unavailable ({type(e).__name__}: {e}); skipped", file=sys.stderr)
        return False


def bench_cqt(args):
    """Time and peak memory of cqt.CQT vs nnAudio's CQT and librosa.cqt, printed as ratios."""
    torch.set_num_threads(args.threads)
    peers = [p for p, mod in (("nnAudio", "nnAudio.features.cqt"), ("librosa", "librosa")) if _available(mod)]
    print(f"cqt: MERT settings, {args.threads} threads, median of {args.repeat}", flush=True)
    fns = {n: _cqt_candidate(n) for n in ("ours", *peers)}
    with torch.inference_mode():
        for case in ("1x30s", "8x5s"):
            x = _cqt_signal(case)
            med = interleaved_medians({n: (lambda f=f: f(x)) for n, f in fns.items()}, args.repeat)
            for p in peers:
                print(ratio_row(f"time {case} vs {p}", 1e3 * med[p], 1e3 * med["ours"], "ms"), flush=True)
        if not args.quick:
            x = _cqt_signal("1x10min")
            med = interleaved_medians({"ours": lambda: fns["ours"](x)}, args.repeat)
            print(f"{'time 1x10min ours':<28} {1e3 * med['ours']:9.1f} ms", flush=True)
    del fns
    cases = ["1x30s", "8x5s"] + ([] if args.quick else ["1x10min"])
    for case in cases:
        names = ("ours", *peers) if case != "1x10min" or args.long_peers else ("ours",)
        mem = {n: in_subprocess("cqt_mem", n, case, args.threads) for n in names}
        if case == cases[0]:
            for p in peers:
                if mem[p]["build_mb"] > 0.5:  # librosa builds nothing up front
                    print(ratio_row(f"kernels vs {p}", mem[p]["build_mb"], mem["ours"]["build_mb"], "MB"))
        for p in names[1:]:
            print(ratio_row(f"peak memory {case} vs {p}", mem[p]["run_mb"], mem["ours"]["run_mb"], "MB"), flush=True)
        if len(names) == 1:
            print(f"{'peak memory ' + case + ' ours':<28} {mem['ours']['run_mb']:9.1f} MB", flush=True)


def _cqt_mem_child(name: str, case: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    x = _cqt_signal(case)
    with torch.inference_mode():
        box = {}
        build = peak_rss_rise(lambda: box.setdefault("fn", _cqt_candidate(name)))
        box["fn"](music_like(SR, 1))  # first-call allocations stay out of the figure
        run = peak_rss_rise(lambda: box["fn"](x))
    return {"build_mb": build, "run_mb": run}


# -----------------------------------------------------------------------------
# data: loader throughput from prepared shards and from raw files


def _synth_files(root: Path, n_files: int, seconds: float, sr: int = 44100) -> list:
    """n_files synthesised stereo files at sr (decaying harmonic notes over noise), cycling FLAC, MP3, WAV."""
    import soundfile as sf
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(n_files):
        rng = np.random.default_rng(k)
        n = int(seconds * sr)
        t = np.arange(n) / sr
        x = 0.02 * rng.standard_normal((n, 2))
        for onset in np.arange(0, seconds, 0.5):
            a, b = int(onset * sr), min(n, int((onset + 2.0) * sr))
            tt = t[a:b] - onset
            f0 = 110 * 2 ** (rng.integers(0, 36) / 12)
            note = sum(np.sin(2 * np.pi * h * f0 * tt) / h for h in range(1, 6) if h * f0 < sr / 2)
            pan = rng.uniform(0.2, 0.8)
            x[a:b] += 0.15 * (np.exp(-3 * tt) * note)[:, None] * np.array([pan, 1 - pan])
        ext = ("flac", "mp3", "wav")[k % 3]
        p = root / f"song{k:03d}.{ext}"
        sf.write(p, np.clip(x, -1, 1).astype(np.float32), sr, **({"subtype": "PCM_16"} if ext == "wav" else {}))
        files.append(p)
    return files


def _small_codes_ckpt(root: Path) -> Path:
    """A cheap teacher for the reader's benchmark: rvq.py's `small` architecture, random, 8 x 1024 codes (reading
    codes costs the same whichever teacher made them)."""
    import dataclasses
    import rvq
    path = root / "small_random.pt"
    torch.manual_seed(0)
    cfg = dataclasses.replace(rvq.PRESETS["small"], kmeans_iters=1)
    m = rvq.RVQVAE(cfg).eval()
    with torch.no_grad():
        m.quantizer.init_(m.encoder(music_like(2 * SR, 1)[:, None]))
    rvq.save_atomic({"config": dataclasses.asdict(cfg), "model": m.state_dict()}, path)
    return path


def _time_batches(ds, batch: int, n_batches: int, repeat: int) -> float:
    """Median CPU seconds (this process) per training batch of `batch` examples through audio.make_loader (epoch
    batches, collated), over `repeat` runs of the same n_batches batches (page cache warm)."""
    import audio
    next(iter(audio.make_loader(ds, batch, sampling="epoch")))  # opens shard maps, warms the imports
    cpu = []
    for _ in range(repeat):
        it = iter(audio.make_loader(ds, batch, sampling="epoch", num_batches=n_batches))
        c0 = time.process_time()
        for _ in range(n_batches):
            next(it)
        cpu.append(time.process_time() - c0)
    return statistics.median(cpu) / n_batches


# the 330m preset per GPU and optimiser step: 7 clips of 5.12 s per micro-batch, 8 micro-batches (64 GPUs)
DATA_330M = dict(batch=7, accum=8, crop_seconds=5.12, context_seconds=10.0)
# The model's time for those 56 clips on an H100, estimated: 874 GFLOP per clip (MERT.estimate_flops)
# x 56 = 49 TFLOP, at 31-40% MFU of 989 TFLOP/s: 0.16-0.125 s; the same rate as 1-1.3 s for the 448 clips a GPU
# steps through on one 8-GPU node (accumulation 64). `bench.py gpu` measures it. Workers scale with the ratio.
STEP_ESTIMATES = (0.16, 0.125)


def bench_data(args):
    """CPU-seconds of loading per GPU per optimiser step of the 330m preset from raw FLAC, WAV and MP3 (crops with
    10 s of context for the on-the-fly teacher), shards (the same) and shards with codes (no context), and the
    loader workers per GPU that keeps up with a given step time.

    One thread, as a DataLoader worker (audio.worker_init); process time, little disturbed by other load; the
    real access pattern (CropDataset.example with its context, collated batches of 7), median of --repeat runs.
    """
    import shutil
    import audio
    import teachers
    audio.worker_init(0)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    b, accum, crop_s, ctx_s = (DATA_330M[k] for k in ("batch", "accum", "crop_seconds", "context_seconds"))
    crop, ctx = int(crop_s * SR), -(-int(ctx_s * SR) // 320) * 320   # the context on the 320-sample grid
    try:
        if args.data:
            sources, raw_sets = [args.data], {"raw (yours)": [args.data]}
        else:
            # 30 s songs, 44.1 kHz stereo as most collections are: a crop with 10 s before it reads 15.12 s
            files = _synth_files(tmp / "raw", 12, 30.0)
            sources, raw_sets = [tmp / "raw"], {}
            for ext in ("flac", "wav", "mp3"):
                raw_sets[f"raw {ext.upper()}"] = [f for f in files if f.suffix == f".{ext}"]
        c0, w0 = time.process_time(), time.perf_counter()
        summary = audio.prepare(sources, tmp / "shards", workers=1, progress=False)
        prep_cpu, prep_wall = time.process_time() - c0, time.perf_counter() - w0
        coder = teachers.FileCoder(_small_codes_ckpt(tmp), n_q=8, device="cpu")
        audio.prepare(sources, tmp / "shards_codes", workers=1, progress=False, codes=coder)
        kw = dict(crop_samples=crop, seed=0, hop=320)
        cases = {name: (audio.CropDataset(src, context=(ctx, 0), **kw), 3) for name, src in raw_sets.items()}
        cases["shards"] = (audio.CropDataset([tmp / "shards"], context=(ctx, 0), **kw), 30)
        cases["shards + codes"] = (audio.CropDataset([tmp / "shards_codes"], codes=True, **kw), 30)
        rows = {}
        for name, (ds, n) in cases.items():
            per_batch = _time_batches(ds, b, n, args.repeat)
            read = ds.context[0] + crop  # samples read per crop (fewer within 10 s of a file's start)
            rows[name] = (per_batch * accum, b * read / SR / per_batch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"data: the 330m preset per GPU-step ({b} clips x {crop_s:g} s x accumulation {accum}; on the fly each crop "
          f"reads {ctx_s:g} s of context before it, with codes from the shards none); one thread, process time, "
          f"median of {args.repeat}; {summary['files']} files, {summary['seconds'] / 3600:.2f} h")
    head = "".join(f" {f'{t:g} s':>7}" for t in STEP_ESTIMATES)
    print(f"  {'source':<15} {'audio-s/CPU-s':>14} {'CPU-s/GPU-step':>15}   workers per GPU, model step of{head}")
    for name, (cpu_step, rate) in rows.items():
        workers = "".join(f" {math.ceil(cpu_step / t):>7d}" for t in STEP_ESTIMATES)
        print(f"  {name:<15} {rate:>14.0f} {cpu_step:>15.3f}   {'':<30}{workers}")
    print(f"  model step: an H100's time for those {b * accum} clips of 330m, estimated from FLOPs (49 TFLOP at 31-40% "
          f"MFU; = 1-1.3 s for the {b * 64} clips of accumulation 64 on one 8-GPU node); `python bench.py gpu` "
          f"measures it. Workers = CPU-s / model step, rounded up, each a process with a core of its own")
    print(f"  one-time prepare (decode + resample + write, 1 process): {summary['seconds'] / prep_cpu:.0f} "
          f"audio-s/CPU-s, {summary['seconds'] / prep_wall:.0f} audio-s/wall-s")


# -----------------------------------------------------------------------------
# rvq: encode speed of rvq.py (encodec24k vs the encodec package, and small)


RVQ_CASES = [(1, 10.0), (8, 5.0)]  # (batch, seconds): one long clip; a MERT training batch of crops


def _import_encodec():
    """Import `encodec` with a stub `torchaudio` (unused by the model; its wheels do not load beside our torch)."""
    try:
        import torchaudio  # noqa: F401
    except Exception:
        stub = types.ModuleType("torchaudio")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        stub.transforms = types.ModuleType("torchaudio.transforms")
        sys.modules.setdefault("torchaudio", stub)
        sys.modules.setdefault("torchaudio.transforms", stub.transforms)
    import encodec
    return encodec


def _encodec_weights(path: Path) -> Path:
    """Random EnCodec 24 kHz weights with codebooks set to real latent frames, saved as a bare state dict."""
    if not path.exists():
        encodec = _import_encodec()
        torch.manual_seed(0)
        ref = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
        with torch.no_grad():
            frames = ref.encoder(music_like(14 * SR, 1)[:, None])[0].T      # (1050, 128)
            for k, layer in enumerate(ref.quantizer.vq.layers):
                # speed does not depend on the values; scale later codebooks like shrinking residuals
                pick = torch.randperm(frames.shape[0], generator=torch.Generator().manual_seed(k))[:1024]
                layer._codebook.embed.copy_(frames[pick] * 0.5 ** k)
                layer._codebook.inited.fill_(1.0)
        torch.save(ref.state_dict(), path)
    return path


def _small_model(ckpt):
    """A `small` model: the given checkpoint, or random weights with k-means-initialised codebooks."""
    import rvq
    if ckpt:
        return rvq.load(ckpt)
    torch.manual_seed(0)
    model = rvq.RVQVAE(rvq.PRESETS["small"])
    with torch.no_grad():
        model.quantizer.init_(model.encoder(music_like(20 * SR, 1)[:, None]))
    return model.eval()


def _rvq_candidate(which: str, weights: Path, ckpt):
    """A callable wav (B, L) -> codes for 'encodec' (the package), 'ours' (encodec24k) or 'small'."""
    if which == "encodec":
        encodec = _import_encodec()
        ref = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
        ref.load_state_dict(torch.load(weights, weights_only=True))
        ref.set_target_bandwidth(6.0)
        return lambda x: ref.encode(x[:, None])[0][0]
    import rvq
    model = rvq.load(weights) if which == "ours" else _small_model(ckpt)
    return lambda x: model.encode(x, n_q=8)


def bench_rvq(args):
    """encodec24k vs the encodec package (time, memory ratios) and `small` throughput in x real time."""
    torch.set_num_threads(args.threads)
    ckpt = getattr(args, "ckpt", None)
    weights = _encodec_weights(Path(tempfile.mkdtemp(prefix="rvq_bench_")) / "encodec_24khz-random.th")
    peer, ours, small = (_rvq_candidate(w, weights, ckpt) for w in ("encodec", "ours", "small"))
    print(f"rvq: encode at 6 kbps (8 codebooks), fp32, {torch.get_num_threads()} threads, "
          f"median of {args.repeat}", flush=True)
    rows = []
    with torch.inference_mode():
        for B, sec in RVQ_CASES:
            x = music_like(int(sec * SR), B)
            assert torch.equal(peer(x), ours(x)), "encodec24k codes differ from the encodec package"
            t = interleaved_medians({"peer": lambda: peer(x), "ours": lambda: ours(x),
                                     "small": lambda: small(x)}, args.repeat)
            rows.append(ratio_row(f"encodec24k time {B}x{sec:g}s", t["peer"], t["ours"], "s"))
            print(rows[-1], flush=True)
            rows.append(f"{'encodec24k ' + f'{B}x{sec:g}s':<28} {B * sec / t['ours']:7.1f}x real time "
                        f"(encodec package {B * sec / t['peer']:.1f}x)")
            rows.append(f"{'small ' + f'{B}x{sec:g}s':<28} {B * sec / t['small']:7.1f}x real time "
                        f"(goal >= 200x), {t['small'] * 1e3:.0f} ms")
            print(rows[-2] + "\n" + rows[-1], flush=True)
    for B, sec in RVQ_CASES[1:]:
        mem = {w: in_subprocess("rvq_mem", w, weights, B, sec, args.threads, ckpt or "")["mb"]
               for w in ("encodec", "ours", "small")}
        rows.append(ratio_row(f"encodec24k peak mem {B}x{sec:g}s", mem["encodec"], mem["ours"], "MB"))
        rows.append(f"{'small peak mem ' + f'{B}x{sec:g}s':<28} {mem['small']:9.1f} MB")
        print(rows[-2] + "\n" + rows[-1], flush=True)
    print("\nsummary (ratio = peer / ours: > 1 means we are faster or use less memory)")
    print("\n".join(rows))


def _rvq_mem_child(argv):
    """Subprocess side of the rvq memory measurement: prints one JSON line."""
    which, weights, B, sec, threads, ckpt = argv[1], Path(argv[2]), int(argv[3]), float(argv[4]), int(argv[5]), argv[6]
    torch.set_num_threads(threads)
    run = _rvq_candidate(which, weights, ckpt or None)
    x = music_like(int(sec * SR), B)
    with torch.inference_mode():
        run(music_like(SR, 1))                  # first-call allocations stay out of the figure
        mb = peak_rss_rise(lambda: run(x))
    print(json.dumps({"mb": mb}))



# -----------------------------------------------------------------------------
# train: train.py's own step (its functions, the frame-weighted micro-batch loop), split into data, teachers, model


def _encodec_ckpt(root: Path, width: int = 32) -> Path:
    """rvq.py's encodec24k architecture (causal SEANet, 2-layer LSTM) with random weights and 8 codebooks of 1024
    seeded on its latents of a music-like signal, saved as an rvq.py checkpoint (width: the first conv's channels,
    32 as EnCodec; smaller only for the CPU check)."""
    import dataclasses
    import rvq
    path = root / f"encodec24k_random_w{width}.pt"
    if not path.exists():
        torch.manual_seed(0)
        cfg = dataclasses.replace(rvq.PRESETS["encodec24k"], n_filters=width, n_q=8, kmeans_iters=2)
        m = rvq.RVQVAE(cfg).eval()
        with torch.no_grad():  # speed does not depend on the values; seeded codebooks give varied codes
            m.quantizer.init_(m.encoder(music_like(3 * SR, 1)[:, None]))
        rvq.save_atomic({"config": dataclasses.asdict(cfg), "model": m.state_dict()}, path)
    return path


def _train_data(root: Path, ckpt: Path, n_files: int, seconds: float, device) -> dict:
    """Synthetic songs at 24 kHz prepared twice: plain shards (teachers on the fly) and shards with the teacher's
    codes (`prepare --codes`); {"fly": folder, "codes": folder}."""
    import soundfile as sf
    import audio
    import teachers
    songs = root / "songs"
    songs.mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        if not (songs / f"s{k:03d}.wav").exists():
            sf.write(songs / f"s{k:03d}.wav", music_like(int(seconds * SR), 1, seed=k)[0].numpy(), SR, subtype="PCM_16")
    audio.prepare([songs], root / "shards", progress=False)
    coder = teachers.FileCoder(ckpt, n_q=8, device=str(device))
    audio.prepare([songs], root / "shards_codes", progress=False, codes=coder)
    return {"fly": root / "shards", "codes": root / "shards_codes"}


class _Timed:
    """The teachers, timed: each call's wall time (the device synchronised around it) is added to .seconds."""

    def __init__(self, fn, device: torch.device):
        self.fn, self.device, self.seconds = fn, device, 0.0

    def __call__(self, *a, **k):
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.fn(*a, **k)
        _sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_train_step(size: str, data: Path, ckpt: Path, device: torch.device, batch: int = 0, accum: int = 1,
                    steps: int = 5, dtype: str = "bfloat16", model_over: dict | None = None, crop_seconds: float = 0,
                    context_seconds: float | None = None, root: Path | None = None, sdpa_probe: bool = False) -> dict:
    """train.py's step, timed: its config (train.configs_from), teachers (train.build_teachers), data (train.load_data,
    train.make_loader), model and optimiser (train.build_model), and per micro-batch train.forward_micro with the
    loop's frame-weighted gradient (loss x masked frames, summed, divided by the step's frames), clipping and
    fairseq's Adam step. Median over `steps` steps (after 2 warm-up steps) of the step's wall time and its data
    (the loader's next(), in this process), teachers (their calls, synchronised) and model (the rest) parts.
    sdpa_probe: the second warm-up step runs under the profiler, which names the SDPA backend the model used."""
    import audio
    import mert
    import train
    given = {"size": size, "data": str(data), "out": str(root or data.parent), "teachers": "rvq+cqt",
             "acoustic_ckpt": str(ckpt), "num_workers": 0, "device": device.type, "dtype": dtype}
    given.update({"batch_size": batch} if batch else {})
    given.update({"crop_seconds": crop_seconds} if crop_seconds else {})
    given.update({"acoustic_context": context_seconds} if context_seconds is not None else {})
    tc, over = train.configs_from(given)
    tc.total_batch_size = tc.batch_size * accum
    proc, quiet = train.Proc(False, 0, 1, device), (lambda *a, **k: None)
    teach = train.build_teachers(tc, device, quiet)
    crop = int(round(tc.crop_seconds * audio.SAMPLE_RATE))
    ds, _ = train.load_data(tc, proc, crop, teach)
    if ds.codes_info is not None:
        teach.code_teacher.cpu()  # as train.py: the codes come from the shards
    cfg, _ = train.fresh_model_config(tc, teach, {**over, **(model_over or {})}, quiet)
    model, opt, _ = train.build_model(tc, cfg, None, None, None, device)
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else torch.autocast(
        device.type, enabled=False)
    loader, timed = train.make_loader(ds, tc, proc, 0, []), _Timed(teach, device)
    rows, used = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def one_step(step):
        timed.seconds, data_s = 0.0, 0.0
        _sync(device)
        t0 = time.perf_counter()
        sums = {"n": 0.0, "loss": 0.0}
        for micro in range(accum):
            g = train.micro_index(step, micro, accum, 1, 0)
            torch.manual_seed(hash((tc.seed, g)) % (2 ** 62))
            t = time.perf_counter()
            batch_ = next(loader)
            data_s += time.perf_counter() - t
            loss, _, n = train.forward_micro(model, model, timed, batch_, g, tc, ds.context, autocast)
            (loss * n).backward()
            sums["n"] += n
            sums["loss"] += loss.detach().float() * n
        n_total = train.reduce_step(sums, proc)["n"]
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, 1 / n_total.clamp(min=1).item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        train.set_fairseq_eps(opt, tc)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0, data_s, timed.seconds

    for step in range(2 + steps):
        if step == 1 and sdpa_probe:
            box = {}
            used = _sdpa_used(lambda: box.setdefault("r", one_step(step)))
        else:
            r = one_step(step)
            if step >= 2:
                rows.append(r)
    total, data_s, teach_s = (statistics.median(r[i] for r in rows) for i in range(3))
    model_s = statistics.median(r[0] - r[1] - r[2] for r in rows)
    clips = tc.batch_size * accum
    out = {"size": size, "route": "codes from shards" if ds.codes_info is not None else "teachers on the fly",
           "batch": tc.batch_size, "accumulation": accum, "crop_seconds": tc.crop_seconds,
           "context_seconds": ds.context[0] / SR, "dtype": dtype, "ms_per_step": 1e3 * total,
           "audio_s_per_s": clips * tc.crop_seconds / total, "data_ms": 1e3 * data_s, "teachers_ms": 1e3 * teach_s,
           "model_ms": 1e3 * model_s, "teachers_share": teach_s / total, "data_share": data_s / total,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if used is not None:
        out["sdpa_backend_used"] = used
    peak = mert.gpu_peak_flops(device)
    if peak:
        flops = model.estimate_flops(crop) * clips
        out.update(mfu=flops / total / peak, mfu_model_only=flops / model_s / peak,
                   peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30)
    del model, opt, teach, loader
    return out


def bench_train(args):
    """train.py's step with the EnCodec-architecture teacher (random weights) and its 10 s context, then with codes
    from the shards instead: ms per step split into data, teachers and model."""
    import shutil
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sizes = args.sizes.split(",") if args.sizes else (["95m", "330m"] if cuda else ["tiny"])
    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        ckpt = _encodec_ckpt(root)
        # 30 s songs: most crops have their whole 10 s of context (at the start of a file there is less)
        data = _train_data(root, ckpt, max(8, args.batch or 16), 30.0, device)
        print(f"train: train.py's step on {device} ({'bf16 autocast' if cuda else 'fp32'}), teachers rvq+cqt with "
              f"rvq.py's encodec24k architecture (random weights), median of {args.repeat} steps", flush=True)
        print(f"  {'size':>5} {'route':<20} {'clips':>8} {'ms/step':>9} {'data':>8} {'teachers':>9} {'model':>8} "
              f"{'teach %':>8} {'audio-s/s':>10}")
        for size in sizes:
            for route in ("fly", "codes"):
                r = time_train_step(size, data[route], ckpt, device,
                                    batch=args.batch or (GPU_MICRO_BATCH.get(size, 0) if cuda else 2),
                                    accum=args.accum, steps=args.repeat, dtype="bfloat16" if cuda else "float32",
                                    root=root)
                print(f"  {size:>5} {r['route']:<20} {r['batch']:>3} x {r['accumulation']:<2} {r['ms_per_step']:>9.0f} "
                      f"{r['data_ms']:>8.0f} {r['teachers_ms']:>9.0f} {r['model_ms']:>8.0f} "
                      f"{100 * r['teachers_share']:>7.1f}% {r['audio_s_per_s']:>10.1f}"
                      + (f"  MFU {100 * r['mfu']:.1f}%  {r['peak_mem_gib']:.1f} GiB" if "mfu" in r else ""), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("data: the loader's work in this process (num_workers 0; in training, loader workers do it beside the "
          "step); teachers: their calls; model: the rest (forward, backward, optimiser)")


# -----------------------------------------------------------------------------
# gpu: the prepared device check, one JSON


# The official per-GPU micro-batches: MERT_RVQ-VAE_CQT_95M.yaml, 64 GPUs x max_tokens 2,000,000 samples = 16 clips
# of 5 s; MERT_RVQ-VAE_CQT_330M.yaml with run_training.sh's max_tokens 920k = 7 clips of 5.12 s
GPU_MICRO_BATCH = {"95m": 16, "330m": 7}
GPU_CROP_SECONDS = {"95m": 5.0, "330m": 5.12}
_SDPA_OPS = {"_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
             "_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_efficient_attention": "efficient",
             "_scaled_dot_product_cudnn_attention": "cudnn", "_scaled_dot_product_fused_attention_overrideable":
             "overrideable", "_scaled_dot_product_attention_math": "math"}


class _TimeUp(Exception):
    """A part of `bench.py gpu` ran past its time box."""


class _TimeBox:
    """Raise _TimeUp in the main thread after `seconds` (SIGALRM; between Python calls, so a long CUDA kernel ends
    first)."""

    def __init__(self, seconds: float):
        self.seconds = max(1.0, seconds)

    def __enter__(self):
        import signal

        def fire(signum, frame):
            raise _TimeUp(f"timed out after {self.seconds:.0f} s")
        self.old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        import signal
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old)
        return False


def _sdpa_used(fn) -> list:
    """The SDPA backends (by their aten op) that one call of fn runs, read from the profiler's CPU-side op names."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key.removeprefix("aten::") for e in prof.key_averages()}
    return sorted({label for op, label in _SDPA_OPS.items() if op in names})


def sdpa_backends(size: str, device: torch.device, batch: int, crop: int, model_over: dict | None = None) -> dict:
    """Each SDPA backend (torch.nn.attention.sdpa_kernel) on the attention of a training step of `size` (its heads,
    head size, frames, dropout; bf16 on CUDA): forward + backward ms (median of 5) or why it cannot run."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import teachers
    from mert import MERTConfig
    cfg = MERTConfig.from_preset(size, **(model_over or {}))
    T, H, hd = teachers.model_frames(crop), cfg.n_heads, cfg.dim // cfg.n_heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(batch, H, T, hd, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    out = {"shape": [batch, H, T, hd], "dtype": str(dtype).replace("torch.", ""), "dropout": cfg.attn_dropout}

    def run():
        F.scaled_dot_product_attention(q, k, v, dropout_p=cfg.attn_dropout).sum().backward()
        _sync(device)

    out["default"] = _sdpa_used(run)
    times = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend, key = getattr(SDPBackend, name, None), name.lower().removesuffix("_attention")
        if backend is None:
            out[key + "_ms"] = "not in this torch"
            continue
        try:
            with sdpa_kernel([backend]), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the reasons a backend refuses come back in the error
                out[key + "_ms"] = times[key] = round(1e3 * interleaved_medians({"a": run}, 5)["a"], 3)
        except Exception as e:  # this backend does not take these inputs on this device
            out[key + "_ms"] = "unavailable: " + " ".join(str(e).split())[:200]
    out["fastest"] = min(times, key=times.get) if times else None
    return out


def time_extract(size: str, device: torch.device, dtype: torch.dtype, batch: int, seconds: float,
                 model_over: dict | None = None) -> dict:
    """MERT(size) encoder with random weights in `dtype` (as extract.py --dtype converts it), model.extract of every
    hidden state on batch x seconds of audio: audio-s/s, ms (median of 5 after a warm-up), peak memory."""
    from mert import MERT, MERTConfig
    torch.manual_seed(0)
    model = MERT(MERTConfig.from_preset(size, n_codebooks=0, cqt_bins=0, **(model_over or {}))).to(device, dtype).eval()
    x = music_like(int(seconds * SR), batch).to(device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        def run():
            model.extract(x)
            _sync(device)
        dt = interleaved_medians({"a": run}, 5)["a"]
    out = {"batch": batch, "seconds": seconds, "dtype": str(dtype).replace("torch.", ""), "ms": 1e3 * dt,
           "audio_s_per_s": batch * seconds / dt}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        out["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return out


TINY_MODEL = dict(dim=64, n_layers=2, n_heads=2, ffn_dim=128, conv_dim=(32,) * 7, pos_conv_groups=4, final_dim=16)


def bench_gpu(args):
    """The prepared device check: 95m and 330m training steps at the official per-GPU micro-batch in bf16 (ms, audio-
    s/s, MFU, peak memory, teachers' share, SDPA backend used), each backend tried, and 95M/330M extraction of
    8 x 30 s in bf16 and fp32; one JSON on stdout. Every part guarded and time-boxed (an error or overrun is
    recorded, the rest runs), the whole within --budget seconds. --tiny (or no CUDA): the same code at tiny size."""
    import gc
    import shutil
    start = time.perf_counter()
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    tiny = args.tiny or not cuda
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    report = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "tiny": tiny,
              "peak_tflops_bf16": None, "budget_s": args.budget, "setup": {}, "train": {}, "sdpa": {}, "extract": {},
              "errors": [], "skipped": []}
    from mert import gpu_peak_flops
    report["peak_tflops_bf16"] = (gpu_peak_flops(name) or 0) / 1e12 or None
    try:  # train.py needs soundfile (audio.py); without it the training parts fail and say so, the others run
        import train  # noqa: F401 (only whether it imports: the training parts below import it again)
    except ImportError as e:
        report["errors"].append(f"import train: {e} (pip install -r requirements.txt)")
    if tiny:  # tiny sizes, the same code paths: what CI runs on a CPU
        sizes, over, crop_s, ctx_s, width, song_s = ["tiny"], TINY_MODEL, 1.0, 0.5, 2, 3.0
        micro, ext = {"tiny": 2}, (1, 2.0)
    else:
        # 30 s songs: most crops have their whole 10 s of context, as in 4-minute songs
        sizes, over, crop_s, ctx_s, width, song_s = ["95m", "330m"], {}, 0, None, 32, 30.0
        micro, ext = GPU_MICRO_BATCH, (8, 30.0)

    def part(keys: tuple, fn, limit: float):
        """Run fn() within its time box; its result, or its error, goes to report[keys[0]][keys[1]]..."""
        left = args.budget - (time.perf_counter() - start) - 5
        if left < 5:
            result = {"skipped": f"the {args.budget:g} s budget is spent"}
        else:
            t0 = time.perf_counter()
            try:
                with _TimeBox(min(limit, left)):
                    result = fn()
            except _TimeUp as e:
                result = {"error": str(e)}
            except Exception as e:  # out of memory or anything else: recorded, the next part runs
                result = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"}
            result = {**result, "wall_s": round(time.perf_counter() - t0, 1)} if isinstance(result, dict) else result
        if "skipped" in result:
            report["skipped"].append("/".join(keys))
        if "error" in result:
            report["errors"].append(f"{'/'.join(keys)}: {result['error']}")
            print(f"bench.py gpu: {'/'.join(keys)}: {result['error']}", file=sys.stderr, flush=True)
        else:
            print(f"bench.py gpu: {'/'.join(keys)} done", file=sys.stderr, flush=True)
        d = report
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = result
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        return result

    root = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    try:
        box = {}

        def setup():
            box["ckpt"] = _encodec_ckpt(root, width)
            box["data"] = _train_data(root, box["ckpt"], max(micro.values()), song_s, device)
            return {"teacher": f"rvq.py encodec24k architecture, n_filters {width}, random weights, 8 x 1024 codes",
                    "songs": f"{max(micro.values())} x {song_s:g} s"}
        part(("setup",), setup, 120)
        for size in sizes:
            for route in ("fly", "codes"):
                part(("train", size, route), lambda: {"error": "no data: the setup part failed"} if "data" not in box
                     else time_train_step(size, box["data"][route], box["ckpt"], device, batch=micro[size], steps=5,
                                          dtype="bfloat16" if cuda else "float32", model_over=over, crop_seconds=crop_s,
                                          context_seconds=ctx_s, root=root, sdpa_probe=True), 150)
            crop = int(round((crop_s or GPU_CROP_SECONDS[size]) * SR))
            part(("sdpa", size), lambda: sdpa_backends(size, device, micro[size], crop, over), 60)
        for size in (["tiny"] if tiny else ["95m", "330m"]):
            for dt in (torch.bfloat16, torch.float32):
                part(("extract", size, str(dt).replace("torch.", "")),
                     lambda: time_extract(size, device, dt, ext[0], ext[1], over if tiny else None), 60)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["total_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text, flush=True)


def _child(argv):
    """Subprocess side of the memory measurements: prints one JSON line."""
    what = argv[0]
    if what == "extract_mem":
        which, folder, B, sec, threads = argv[1], Path(argv[2]), int(argv[3]), float(argv[4]), int(argv[5])
        torch.set_num_threads(threads)
        run = _load_extract_candidate(which, folder)
        x = music_like(int(sec * SR), B)
        with torch.inference_mode():
            run(music_like(SR, 1))  # first-call allocations (kernels, caches) stay out of the figure
            mb = peak_rss_rise(lambda: run(x))
        print(json.dumps({"mb": mb}))
    elif what == "rvq_mem":
        _rvq_mem_child(argv)
    elif what == "cqt_mem":
        print(json.dumps(_cqt_mem_child(argv[1], argv[2], int(argv[3]))))
    else:
        raise SystemExit(f"unknown child task {what}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        return _child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="example: python bench.py extract --repeat 7",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", choices=["extract", "cqt", "rvq", "data", "train", "gpu"], help="which comparison to run")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per candidate (the median is reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for every candidate")
    p.add_argument("--quick", action="store_true", help="skip the slow long-input measurements")
    p.add_argument("--long_peers", "--long-peers", action="store_true", help="cqt: peak memory of the peers on 10 minutes too")
    p.add_argument("--data", default=None, help="data: a folder or manifest of your own audio (default: synthesise)")
    p.add_argument("--ckpt", default=None, help="rvq: time this trained `small` checkpoint instead of random weights")
    p.add_argument("--sizes", default="", help="train: comma-separated sizes (default: tiny on a CPU; 95m,330m on GPU)")
    p.add_argument("--batch", type=int, default=0, help="train: clips per micro-batch (default: official; 2 on a "
                   "CPU); extract --pipeline: chunks per forward (default there: 8)")
    p.add_argument("--accum", type=int, default=1, help="train: micro-batches per optimiser step")
    p.add_argument("--tiny", action="store_true", help="gpu: tiny sizes, the same code paths (automatic without CUDA)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="gpu, extract --pipeline: where to run")
    p.add_argument("--budget", type=float, default=450.0, help="gpu: seconds for the whole check; parts past it are "
                                                                 "skipped and say so")
    p.add_argument("--json", default=None, help="gpu: also write the JSON report to this file")
    p.add_argument("--pipeline", action="store_true", help="extract: extract.py's audio-s/s with 0/1/2 decoding "
                   "workers against the model alone, shipped model and 95M")
    p.add_argument("--files", type=int, default=300, help="extract --pipeline: synthetic files in the folder")
    p.add_argument("--max_seconds", "--max-seconds", type=float, default=40.0,
                   help="extract --pipeline: longest file (lengths uniform from 1 s)")
    args = p.parse_args()
    if args.what == "extract" and args.pipeline and not args.batch:
        args.batch = 8
    if args.repeat < 5:
        p.error("--repeat must be >= 5: every figure is a median")
    {"extract": bench_extract, "cqt": bench_cqt, "rvq": bench_rvq, "data": bench_data,
     "train": bench_train, "gpu": bench_gpu}[args.what](args)


if __name__ == "__main__":
    main()
