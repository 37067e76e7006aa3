"""extract.py: chunk planning, layer selection, chunked alignment, and the CLI on good and bad files;
the CLI against transformers; records of what made each output; a SIGKILL mid-folder; quantised and
bfloat16 models through extraction (the Linear fast path steps aside)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn as nn

import extract
from conftest import need, sine
from mert import MERT, MERTConfig


def music(n, sr=24000, seed=0):
    g = np.random.default_rng(seed)
    t = np.arange(n) / sr
    x = sum(0.2 / h * np.sin(2 * np.pi * 196 * h * t) for h in range(1, 6))
    x = x * (0.6 + 0.4 * np.sign(np.sin(2 * np.pi * 1.5 * t))) + 0.02 * g.standard_normal(n)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny model whose hidden state 0 depends only on +-64 frames (LayerNorm extractor, no attention)."""
    torch.manual_seed(0)
    m = MERT(MERTConfig.from_preset("tiny", extractor_norm="layer", n_layers=2)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    m.save(path)
    return path


@pytest.mark.parametrize("n,chunk,overlap", [(10, 20, 5), (100, 20, 6), (101, 20, 0), (2249, 2250, 375),
                                             (45000, 2250, 375), (23, 10, 9)])
def test_plan_chunks_tiles_the_file(n, chunk, overlap):
    plan = extract.plan_chunks(n, chunk, overlap)
    assert plan[0][2] == 0 and plan[-1][3] == n
    for (s, length, lo, hi), nxt in zip(plan, plan[1:] + [None]):
        assert length == min(chunk, n) and s + length <= n and s <= lo < hi <= s + length
        if nxt is not None:
            assert nxt[2] == hi  # contiguous
            assert hi - nxt[0] >= overlap // 2 and s + length - hi >= overlap // 2  # margins from both edges


def test_parse_layers():
    assert extract.parse_layers("all", 13) == list(range(13))
    assert extract.parse_layers("6", 13) == [6]
    assert extract.parse_layers("4-8", 13) == [4, 5, 6, 7, 8]
    assert extract.parse_layers("0,12,-1", 13) == [0, 12]
    for bad in ("13", "x", "3-", ""):
        with pytest.raises(ValueError):
            extract.parse_layers(bad, 13)


def test_chunked_output_is_aligned(ckpt, tmp_path):
    """With margins wider than the receptive field, chunked hidden state 0 equals the whole-file one."""
    x = music(24000 * 10 + 777)
    sf.write(tmp_path / "a.wav", x, 24000, subtype="FLOAT")
    assert extract.main([str(tmp_path / "a.wav"), "-o", str(tmp_path / "whole"), "--ckpt", str(ckpt),
                         "--layers", "0", "--chunk", "0"]) == 0
    assert extract.main([str(tmp_path / "a.wav"), "-o", str(tmp_path / "chunked"), "--ckpt", str(ckpt),
                         "--layers", "0", "--chunk", "3", "--overlap", "2", "--batch", "3"]) == 0
    whole, chunked = np.load(tmp_path / "whole" / "a.npy"), np.load(tmp_path / "chunked" / "a.npy")
    assert whole.shape == chunked.shape == (1, (len(x) - 400) // 320 + 1, 256)
    assert np.abs(whole - chunked).max() < 1e-4


def test_batched_files_equal_one_by_one(ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    for i, n in enumerate([30000, 52000, 11000]):
        sf.write(tmp_path / "in" / f"{i}.wav", music(n, seed=i), 24000, subtype="FLOAT")
    assert extract.main([str(tmp_path / "in"), "-o", str(tmp_path / "b1"), "--ckpt", str(ckpt)]) == 0
    assert extract.main([str(tmp_path / "in"), "-o", str(tmp_path / "b3"), "--ckpt", str(ckpt), "--batch", "3"]) == 0
    for i in range(3):
        a, b = np.load(tmp_path / "b1" / f"{i}.npy"), np.load(tmp_path / "b3" / f"{i}.npy")
        assert a.shape == b.shape and a.dtype == np.float32 and np.abs(a - b).max() < 1e-4


def test_pooling(ckpt, tmp_path):
    sf.write(tmp_path / "p.wav", music(40000), 24000)
    args = [str(tmp_path / "p.wav"), "--ckpt", str(ckpt), "--layers", "1-2"]
    assert extract.main(args + ["-o", str(tmp_path / "full")]) == 0
    assert extract.main(args + ["-o", str(tmp_path / "mean"), "--pool", "mean"]) == 0
    assert extract.main(args + ["-o", str(tmp_path / "ms"), "--pool", "meanstd"]) == 0
    full = np.load(tmp_path / "full" / "p.npy")
    mean, ms = np.load(tmp_path / "mean" / "p.npy"), np.load(tmp_path / "ms" / "p.npy")
    assert mean.shape == (2, 256) and ms.shape == (2, 512)
    np.testing.assert_allclose(mean, full.mean(axis=1), atol=1e-5)
    np.testing.assert_allclose(ms[:, 256:], full.std(axis=1), atol=1e-4)


def test_folder_with_bad_files_and_a_long_song(micro_ckpt, tmp_path, capsys):
    """Every good file is written, each bad one named once, exit code 1; a rerun does no re-work."""
    src = tmp_path / "music"
    (src / "album").mkdir(parents=True)
    sf.write(src / "album" / "long.wav", np.tile(music(24000 * 20), 30), 24000, subtype="PCM_16")  # 10 minutes
    sf.write(src / "short44k.flac", music(44100 * 2, sr=44100), 44100)
    (src / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")
    sf.write(src / "empty.wav", np.zeros(0, np.float32), 24000)
    sf.write(src / "tiny.wav", np.zeros(300, np.float32), 24000)
    nan = music(24000)
    nan[100] = np.nan
    sf.write(src / "nan.wav", nan, 24000, subtype="FLOAT")
    out = tmp_path / "feats"
    args = [str(src), "-o", str(out), "--ckpt", str(micro_ckpt), "--layers", "2", "--chunk", "30"]
    assert extract.main(args) == 1
    err = capsys.readouterr().err
    for bad in ("corrupt.wav", "empty.wav", "tiny.wav", "nan.wav"):
        assert sum(bad in line for line in err.splitlines()) == 1, (bad, err)
    long = np.load(out / "album" / "long.npy", mmap_mode="r")
    assert long.shape == (1, (24000 * 600 - 400) // 320 + 1, 32) and np.isfinite(long).all()
    assert np.load(out / "short44k.npy").shape == (1, (48000 - 400) // 320 + 1, 32)
    assert sorted(p.name for p in out.rglob("*")) == [".extract.lock", "album", "extract-failures.txt", "long.npy",
                                                     "long.npy.json", "short44k.npy",
                                                     "short44k.npy.json"]  # records; no temp files left
    assert sorted(line.split(":")[0] for line in (out / "extract-failures.txt").read_text().splitlines()) == \
        sorted(str(src / bad) for bad in ("corrupt.wav", "empty.wav", "nan.wav", "tiny.wav"))
    mtime = (out / "short44k.npy").stat().st_mtime_ns
    assert extract.main(args) == 1  # the bad files fail again; the good ones are not recomputed
    assert "2 already there" in capsys.readouterr().err
    assert (out / "short44k.npy").stat().st_mtime_ns == mtime
    assert extract.main(args + ["--overwrite"]) == 1
    assert (out / "short44k.npy").stat().st_mtime_ns != mtime


def test_default_output_beside_input_and_no_default_model(ckpt, tmp_path, monkeypatch, capsys):
    sf.write(tmp_path / "song.wav", music(24000), 24000)
    assert extract.main([str(tmp_path / "song.wav"), "--ckpt", str(ckpt)]) == 0
    assert np.load(tmp_path / "song.npy").shape == (3, 74, 256)
    monkeypatch.setattr(extract, "DEFAULT_CKPT", tmp_path / "absent.pt")
    assert extract.main([str(tmp_path / "song.wav"), "--overwrite"]) == 2
    assert "shipped default model" in capsys.readouterr().err
    assert extract.main([str(tmp_path / "missing.wav"), "--ckpt", str(ckpt)]) == 2
    assert extract.main([str(tmp_path / "song.wav"), "--ckpt", str(ckpt), "--layers", "9"]) == 2


def test_bfloat16_output_is_close_and_float32(ckpt, tmp_path):
    sf.write(tmp_path / "b.wav", music(36000), 24000)
    base = [str(tmp_path / "b.wav"), "--ckpt", str(ckpt), "--layers", "2"]
    assert extract.main(base + ["-o", str(tmp_path / "f32")]) == 0
    assert extract.main(base + ["-o", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    a, b = np.load(tmp_path / "f32" / "b.npy"), np.load(tmp_path / "bf16" / "b.npy")
    assert b.dtype == np.float32 and a.shape == b.shape
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.05


def test_shipped_model_on_the_example_clip(tmp_path):
    """The README's second set-up command: the shipped model, no --ckpt, no network."""
    ckpt = torch.load(extract.DEFAULT_CKPT, weights_only=True)
    assert extract.DEFAULT_CKPT.stat().st_size <= 15_000_000
    assert ckpt["config"]["n_codebooks"] == 0 and ckpt["config"]["cqt_bins"] == 0  # encoder only
    assert ckpt["step"] > 0 and ckpt["train_config"]["teachers"] == "rvq+cqt"  # provenance travels with it
    clip = extract.DEFAULT_CKPT.parent.parent / "examples" / "clip.flac"
    assert extract.main([str(clip), "-o", str(tmp_path)]) == 0
    feats = np.load(tmp_path / "clip.npy")
    cfg = ckpt["config"]
    assert feats.shape == (cfg["n_layers"] + 1, 449, cfg["dim"]) and np.isfinite(feats).all()
    assert feats[1:].std() > 0.1  # a trained model, not zeros


# ---------------------------------------------------------------------------------------------
# extract.py itself against transformers; no silent wrong answers; a SIGKILL mid-folder
# ---------------------------------------------------------------------------------------------
def test_cli_matches_transformers_at_odd_lengths(tmp_path):
    """extract.py (the CLI) gives transformers' HubertModel's hidden states, every one to 1e-4, at lengths
    whose tail is not a whole frame (those samples feed the GroupNorm statistics); --normalize equals
    Wav2Vec2FeatureExtractor(do_normalize=True); a chunked file keeps layer 0 equal to the whole-file forward."""
    from test_mert import MERT_95M_HF, hf_model, hf_states
    transformers = need("transformers")
    hf = hf_model(MERT_95M_HF)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    src = tmp_path / "in"
    src.mkdir()
    lengths = {"a": 400 + 320 * 112 + 319, "b": 24000 * 2 + 157, "c": 24000 * 4 + 12111}
    for name, n in lengths.items():
        sf.write(src / f"{name}.wav", music(n, seed=n), 24000, subtype="FLOAT")
    ref = {name: hf_states(hf, torch.from_numpy(sf.read(src / f"{name}.wav", dtype="float32")[0])[None])[:, 0]
           for name in lengths}
    base = [str(src), "--ckpt", str(folder)]
    assert extract.main(base + ["-o", str(tmp_path / "whole")]) == 0
    for name, n in lengths.items():
        got = np.load(tmp_path / "whole" / f"{name}.npy")
        assert got.shape == tuple(ref[name].shape) == (3, (n - 400) // 320 + 1, 768)
        err = np.abs(got - ref[name].numpy()).max(axis=(1, 2))
        assert err.max() <= 1e-4, (name, err.tolist())

    # --normalize: what MARBLE feeds MERT-v1-95M
    wav = sf.read(src / "b.wav", dtype="float32")[0]
    fe = transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=24000, do_normalize=True)
    normed = torch.from_numpy(np.asarray(fe(wav, sampling_rate=24000, return_tensors="np").input_values[0]))
    assert extract.main([str(src / "b.wav"), "-o", str(tmp_path / "norm"), "--ckpt", str(folder), "--normalize"]) == 0
    err = np.abs(np.load(tmp_path / "norm" / "b.npy") - hf_states(hf, normed[None])[:, 0].numpy()).max()
    assert err <= 1e-4, err

    # 4.5 s in chunks of 3.5 s: margins of 0.9 s (67 frames) exceed the positional conv's reach (64), so with
    # the file's GroupNorm statistics (the default) layer 0 is the whole-file forward's; with each chunk's
    # own (--chunk-stats chunk, the hyphen spelling) it is not
    chunked = ["--chunk", "3.5", "--overlap", "1.8", "--layers", "0", str(src / "c.wav")]
    assert extract.main(base[1:] + chunked + ["-o", str(tmp_path / "file")]) == 0
    assert extract.main(base[1:] + chunked + ["-o", str(tmp_path / "own"), "--chunk-stats", "chunk"]) == 0
    assert np.abs(np.load(tmp_path / "file" / "c.npy")[0] - ref["c"][0].numpy()).max() <= 1e-4
    assert np.abs(np.load(tmp_path / "own" / "c.npy")[0] - ref["c"][0].numpy()).max() > 1e-2


def test_rerun_with_other_settings_is_refused_and_a_changed_input_recomputed(micro_ckpt, ckpt, tmp_path, capsys):
    sf.write(tmp_path / "s.wav", music(30000), 24000)
    out = tmp_path / "o"
    base = [str(tmp_path / "s.wav"), "-o", str(out), "--ckpt", str(micro_ckpt)]
    assert extract.main(base) == 0
    first = np.load(out / "s.npy")
    rec = json.loads((out / "s.npy.json").read_text())
    assert rec["pool"] == "none" and rec["layers"] == [0, 1, 2] and rec["model"].startswith("sha256:")
    assert rec["source"]["size"] == (tmp_path / "s.wav").stat().st_size and rec["shape"] == list(first.shape)
    capsys.readouterr()
    for extra, word in [(["--pool", "mean"], "pool"), (["--layers", "1"], "layers"), (["--chunk", "10"], "chunk"),
                        (["--normalize"], "normalize"), (["--dtype", "bfloat16"], "dtype"),
                        (["--ckpt", str(ckpt)], "another model")]:
        assert extract.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(out / "s.npy") in err and word in err, err
        assert "--overwrite" in err
        np.testing.assert_array_equal(np.load(out / "s.npy"), first)  # left as it was
    assert extract.main(base) == 0 and "1 already there" in capsys.readouterr().err  # same settings: reused
    assert extract.main(base + ["--pool", "mean", "--overwrite"]) == 0
    assert np.load(out / "s.npy").shape == (3, 32) and json.loads((out / "s.npy.json").read_text())["pool"] == "mean"
    capsys.readouterr()
    (out / "s.npy.json").unlink()  # an output without a record, as an older extract.py left them
    assert extract.main(base + ["--pool", "mean"]) == 2 and "no record" in capsys.readouterr().err
    assert extract.main(base + ["--pool", "mean", "--overwrite"]) == 0
    os.utime(tmp_path / "s.wav", ns=(1, 10**18))  # a copy: another time, the same content
    assert extract.main(base + ["--pool", "mean"]) == 0 and "1 already there" in capsys.readouterr().err
    sf.write(tmp_path / "s.wav", music(40000), 24000)  # the input changes: recomputed, and said
    capsys.readouterr()
    assert extract.main(base + ["--pool", "mean"]) == 0
    err = capsys.readouterr().err
    assert "recomputing, its input has changed" in err and "1 written" in err
    assert json.loads((out / "s.npy.json").read_text())["source"]["size"] == (tmp_path / "s.wav").stat().st_size


def test_no_input_is_an_error_and_undecodable_files_are_named(micro_ckpt, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not audio")
    assert extract.main([str(empty), "--ckpt", str(micro_ckpt)]) == 2
    assert "no audio input" in capsys.readouterr().err
    src = tmp_path / "mixed"
    (src / "sub").mkdir(parents=True)
    sf.write(src / "ok.wav", music(30000), 24000)
    (src / "a.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(200))
    (src / "sub" / "v.mp4").write_bytes(b"\x00\x00\x00\x20ftypisom" + bytes(200))
    (src / "cover.jpg").write_bytes(b"\xff\xd8\xff" + bytes(50))  # not audio: passed over in silence
    sf.write(src / "cut.ogg", music(24000 * 4), 24000, format="OGG", subtype="VORBIS")
    data = (src / "cut.ogg").read_bytes()
    (src / "cut.ogg").write_bytes(data[:len(data) // 2])
    out = tmp_path / "out"
    assert extract.main([str(src), "-o", str(out), "--ckpt", str(micro_ckpt)]) == 1
    err = capsys.readouterr().err.splitlines()
    for name, what in [("a.m4a", "cannot decode"), ("v.mp4", "cannot decode"), ("cut.ogg", "truncated Ogg")]:
        lines = [line for line in err if name in line]
        assert len(lines) == 1 and what in lines[0], (name, err)
    assert not any("cover.jpg" in line for line in err)
    assert "1 written" in err[-1] and "3 failed" in err[-1]
    assert sorted(p.name for p in out.glob("*.npy")) == ["ok.npy"]
    assert extract.main([str(src / "a.m4a"), "-o", str(out), "--ckpt", str(micro_ckpt)]) == 1  # named: one line
    assert "ffmpeg" in capsys.readouterr().err


def test_bad_device_output_and_checkpoint_are_one_line_errors(micro_ckpt, tmp_path, capsys, monkeypatch):
    sf.write(tmp_path / "s.wav", music(30000), 24000)
    song = str(tmp_path / "s.wav")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "notes.pt").write_text("these are my notes, not a model\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only torch
    for args, what in [(["--device", "cuda"], "CUDA is not available"),
                       (["-o", str(tmp_path / "file.txt")], "exists and is not a folder"),
                       (["--ckpt", str(tmp_path / "notes.pt")], "not a PyTorch checkpoint (a text file")]:
        assert extract.main([song, "--ckpt", str(micro_ckpt)] + args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and what in err, err


def test_help_states_each_default_once_and_takes_hyphen_aliases(capsys):
    p = extract.build_parser()
    for action in p._actions:
        text = p._get_formatter()._expand_help(action) if action.help else ""
        assert text.count("default") <= 1, text
    with pytest.raises(SystemExit):
        extract.main(["--help"])
    out = capsys.readouterr().out
    assert "--chunk_stats" in out and "--chunk-stats" in out
    assert p.parse_args(["x", "--chunk-stats", "chunk"]).chunk_stats == "chunk"


def test_sigkill_mid_folder_then_rerun_completes(micro_ckpt, tmp_path, capsys):
    """Issue 18: a run killed (SIGKILL) after its first output leaves only complete outputs; the rerun
    finishes the folder, equal to an uninterrupted run, with no temporary file left."""
    src = tmp_path / "in"
    src.mkdir()
    n_files = 6
    for i in range(n_files):  # each takes ~0.1 s; the kill lands within ~10 ms of the first output
        sf.write(src / f"{i:02d}.wav", music(24000 * 12, seed=i), 24000, subtype="FLOAT")
    args = ["--ckpt", str(micro_ckpt), "--chunk", "10", "--overlap", "2"]
    assert extract.main([str(src), "-o", str(tmp_path / "ref")] + args) == 0
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, extract.__file__, str(src), "-o", str(out)] + args, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob("*.npy")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(out.glob("*.npy"))
    assert 1 <= len(done) < n_files, f"not killed mid-folder: {len(done)} outputs"
    for f in done:  # whatever looks like an output is complete, and has its record
        np.testing.assert_allclose(np.load(f), np.load(tmp_path / "ref" / f.name), atol=1e-6)
        assert (out / (f.name + ".json")).exists()
    assert all(p.suffix in (".npy", ".json", ".tmp", ".lock") for p in out.iterdir())
    capsys.readouterr()
    assert extract.main([str(src), "-o", str(out)] + args) == 0
    assert f"{n_files - len(done)} written, {len(done)} already there" in capsys.readouterr().err
    for i in range(n_files):
        np.testing.assert_allclose(np.load(out / f"{i:02d}.npy"), np.load(tmp_path / "ref" / f"{i:02d}.npy"), atol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())


def test_chunk_dependence_script(micro_ckpt, tmp_path, capsys):
    """research/chunk_dependence.py (the README's chunking table): whole-file statistics make state 0 exact."""
    sys.path.insert(0, str(Path(extract.__file__).parent / "research"))
    try:
        import chunk_dependence
    finally:
        sys.path.pop(0)
    sf.write(tmp_path / "s.wav", music(24000 * 4), 24000)
    chunk_dependence.main([str(tmp_path / "s.wav"), "--ckpt", str(micro_ckpt), "--offset", "0", "--seconds", "4",
                           "--chunks", "3:2"])
    rows = {line.split("|")[2].strip(): [float(v) for v in line.split("|")[3:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| 3 / 2 s")}
    assert rows["file"][0] < 1e-6 < rows["chunk"][0] and len(rows["file"]) == 3


# ----------------------------------------------------------------------------- the Linear fast path


@pytest.mark.usefixtures("one_thread")  # last in the file: one_thread holds from here to the module's end
def test_fast_path_steps_aside_for_quantised_and_bf16_models(micro_ckpt, sine_clip, tmp_path):
    """Why: quantize_dynamic(model, {nn.Linear}) failed in extract ('function' object has no attribute 'dtype');
    now the quantised and the bfloat16 model run through MERT.extract and extract.py's Python path."""
    model = MERT.from_pretrained(micro_ckpt).eval()
    wav = torch.from_numpy(sine(1.5))[None]
    ref = model.extract(wav)
    q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert type(q.encoder.layers[0].attention.qkv) is not nn.Linear  # really quantised
    b = MERT.from_pretrained(micro_ckpt).eval().to(torch.bfloat16)
    for m, tol in ((q, 0.1), (b, 0.05)):
        out = m.extract(wav.to(next(m.parameters()).dtype)).float()
        assert out.shape == ref.shape
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < tol, rel  # the same model, approximately (int8 / bf16 rounding)
        dst = tmp_path / f"{tol}.npy"
        extract.extract_files(m, [(sine_clip, dst)], list(range(m.num_states)), progress=False)
        feats = np.load(dst)
        assert feats.shape == tuple(ref[:, 0].shape) and np.isfinite(feats).all()
