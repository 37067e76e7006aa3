"""Speed and memory against the peer packages, measured side by side in the same run.

    python bench.py extract          # mert.py vs transformers' HubertModel (sdpa), 95M, same weights
    python bench.py cqt              # cqt.py vs nnAudio's CQT and librosa.cqt, MERT's settings
    python bench.py rvq              # rvq.py encode speed: encodec24k vs the encodec package, and small
    python bench.py data             # loader audio-seconds/s per core, prepared shards vs raw files
    python bench.py train            # a pretraining step: ms, audio-s/s (MFU, memory on a GPU)
    python bench.py extract --quick  # --quick skips the slow 10-minute inputs
    python bench.py extract --pipeline --files 300 --batch 8   # extract.py's audio-s/s vs the model alone

Every figure is a ratio to the peer measured in the same process (time: median of --repeat runs,
candidates interleaved so that machine noise hits both alike) or in fresh subprocesses (peak memory:
the rise of the peak resident set size over the resident size after set-up, via /proc/self/clear_refs).
"""

import argparse
import importlib.machinery
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
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


def _time_crops(ds, indices, repeat: int) -> tuple:
    """Median (CPU seconds, wall seconds) of reading ds[i] for all indices, over `repeat` runs."""
    ds[indices[0]]  # opens shard maps, warms the page cache and the imports
    cpu, wall = [], []
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        for i in indices:
            ds[i]
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def bench_data(args):
    """Audio-seconds per second per core that CropDataset delivers from shards and from raw files.

    One thread, as in a DataLoader worker (workers are processes: a machine delivers about this times
    the cores given to them). Per CPU-second (process time, little disturbed by other load) and per
    wall-second, median of --repeat runs over the same indices (page cache warm).
    """
    import shutil
    import audio
    audio.worker_init(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    crop_s, n_shard, n_raw = 5.0, 400, 24
    try:
        if args.data:
            sources, raw_sets = [args.data], {"raw": [args.data]}
        else:
            files = _synth_files(tmp / "raw", 12, 30.0)
            sources, raw_sets = [tmp / "raw"], {"raw (mixed)": [tmp / "raw"]}
            for ext in ("wav", "flac", "mp3"):
                raw_sets[f"raw {ext}"] = [f for f in files if f.suffix == f".{ext}"]
        c0, w0 = time.process_time(), time.perf_counter()
        summary = audio.prepare(sources, tmp / "shards", workers=1, progress=False)
        prep_cpu, prep_wall = time.process_time() - c0, time.perf_counter() - w0
        crop = int(crop_s * SR)
        results = {"shards": (_time_crops(audio.CropDataset([tmp / "shards"], crop, seed=0), range(n_shard),
                                          args.repeat), n_shard)}
        for name, src in raw_sets.items():
            results[name] = _time_crops(audio.CropDataset(src, crop, seed=0), range(n_raw), args.repeat), n_raw
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"data: {crop_s:g} s crops at 24 kHz from {summary['files']} files ({summary['seconds'] / 3600:.2f} h); "
          f"one thread; median of {args.repeat} runs")
    print(f"  {'source':<12} {'audio-s/CPU-s':>14} {'audio-s/wall-s':>15} {'shards are':>11}")
    base = None
    for name, ((cpu, wall), n) in results.items():
        per_cpu, per_wall = n * crop_s / cpu, n * crop_s / wall
        base = base or per_cpu
        print(f"  {name:<12} {per_cpu:>14.0f} {per_wall:>15.0f} {base / per_cpu:>10.1f}x")
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
# train: one optimiser step of pretraining, teachers included


TRAIN_BATCH = {"tiny": 8, "95m": 32, "330m": 16}  # clips per device (GPU runs); --batch overrides


def bench_train(args):
    """Step time, audio-seconds/s (and MFU and peak memory on a GPU) of a full pretraining step."""
    import teachers as teachers_lib
    import train
    from mert import MERT, MERTConfig, compute_mask_indices
    from train import mix_noise
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sizes = args.sizes.split(",") if args.sizes else (["tiny", "95m", "330m"] if cuda else ["tiny"])
    print(f"train: device {device}, {'bf16 autocast' if cuda else 'fp32'}, teachers randproj+cqt, "
          f"median of {args.repeat} steps", flush=True)
    for size in sizes:
        tc = train.TrainConfig(**{**train.TRAIN_PRESETS[size], "size": size})
        B = args.batch or (TRAIN_BATCH[size] if cuda else 4)
        crop = int(round(tc.crop_seconds * SR))
        teach = teachers_lib.build_teachers("randproj,cqt", device=device, log=lambda *a: None).to(device)
        torch.manual_seed(0)
        cfg = MERTConfig.from_preset(size, n_codebooks=teach.n_codebooks, codebook_size=teach.codebook_size,
                                     cqt_bins=teach.cqt_bins)
        model = MERT(cfg).to(device).train()
        opt = train.configure_optimizer(model, tc, fused=cuda)
        wav = music_like(crop, B).to(device)
        T = model.num_frames(crop)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

        def step():
            with torch.no_grad():
                targets = teach(wav, T)
            rng = np.random.default_rng(0)
            mask = compute_mask_indices(B, T, cfg.mask_prob, cfg.mask_length, cfg.min_masks, rng=rng)
            with autocast:
                _, loss, _ = model(mix_noise(wav, rng), targets=targets, mask=mask)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        dt = interleaved_medians({"step": step}, args.repeat, warmup=2)["step"]
        line = (f"{size:>5}  batch {B:3d} x {tc.crop_seconds:g} s  {dt * 1000:8.1f} ms/step  "
                f"{B * tc.crop_seconds / dt:8.1f} audio-s/s")
        peak = train.peak_flops(device)
        if peak:
            mfu = train.estimate_flops_per_clip(cfg, crop) * B / dt / peak
            line += f"  MFU {mfu * 100:5.1f}%  peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        print(line, flush=True)
        del model, opt, teach


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
    p.add_argument("what", choices=["extract", "cqt", "rvq", "data", "train"], help="which comparison to run")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per candidate (the median is reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for every candidate")
    p.add_argument("--quick", action="store_true", help="skip the slow long-input measurements")
    p.add_argument("--long_peers", "--long-peers", action="store_true", help="cqt: peak memory of the peers on 10 minutes too")
    p.add_argument("--data", default=None, help="data: a folder or manifest of your own audio (default: synthesise)")
    p.add_argument("--ckpt", default=None, help="rvq: time this trained `small` checkpoint instead of random weights")
    p.add_argument("--sizes", default="", help="train: comma-separated sizes (default: tiny on CPU; all on a GPU)")
    p.add_argument("--batch", type=int, default=0, help="train: clips per step (default: per size); "
                   "extract --pipeline: chunks per forward (default there: 8)")
    p.add_argument("--pipeline", action="store_true", help="extract: extract.py's audio-s/s with 0/1/2 decoding "
                   "workers against the model alone, shipped model and 95M")
    p.add_argument("--files", type=int, default=300, help="extract --pipeline: synthetic files in the folder")
    p.add_argument("--max_seconds", "--max-seconds", type=float, default=40.0,
                   help="extract --pipeline: longest file (lengths uniform from 1 s)")
    p.add_argument("--device", default="auto", help="extract --pipeline: auto, cpu or cuda")
    args = p.parse_args()
    if args.what == "extract" and args.pipeline and not args.batch:
        args.batch = 8
    if args.repeat < 5:
        p.error("--repeat must be >= 5: every figure is a median")
    {"extract": bench_extract, "cqt": bench_cqt, "rvq": bench_rvq, "data": bench_data,
     "train": bench_train}[args.what](args)


if __name__ == "__main__":
    main()
