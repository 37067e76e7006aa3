"""MERT-v2 through the command lines: extract.py and probe.py on a MERT-v2 folder (tests/data/mert2/small: the
small config with seeded weights, GRN on), chunked frames from their chunks, bad inputs and bad checkpoints."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import audio
import extract
import mert2
import probe
from mert import MERT, MERTConfig

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "tests" / "data" / "mert2" / "small"


def music(n, seed=0):
    """Two seconds of something tonal with a pulse, plus a little noise, float32 at 24 kHz."""
    g = np.random.default_rng(seed)
    t = np.arange(n) / 24000
    x = sum(0.2 / h * np.sin(2 * np.pi * (196 + 20 * seed) * h * t) for h in range(1, 5))
    x = x * (0.6 + 0.4 * np.sign(np.sin(2 * np.pi * 2 * t))) + 0.02 * g.standard_normal(n)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def small():
    return mert2.MERT2.from_pretrained(SMALL)


def test_extract_cli_all_states_equal_the_model_and_bad_files_are_named(small, tmp_path):
    """`extract.py ... --ckpt <MERT-v2 folder> --layers all` as a user runs it: every state of MERT2.extract on the
    same samples, the record names the model and its 25 Hz grid; a too short and a NaN file are named on one line
    each and the run exits 1 with the good file written; --chunk_stats draws a note (MERT-v1 only)."""
    n = 56_880 + 123  # 2.37 s and a bit: not a whole number of 960-sample frames
    sf.write(tmp_path / "clip.wav", music(n), 24000, subtype="FLOAT")
    sf.write(tmp_path / "short.wav", music(1_024), 24000, subtype="FLOAT")  # one below the minimum
    bad = music(4_800)
    bad[100] = np.nan
    sf.write(tmp_path / "nan.wav", bad, 24000, subtype="FLOAT")
    res = subprocess.run([sys.executable, str(ROOT / "extract.py"), *(str(tmp_path / f) for f in
                          ("short.wav", "clip.wav", "nan.wav")), "--ckpt", str(SMALL), "--layers", "all",
                          "-o", str(tmp_path / "out"), "--chunk_stats", "chunk"], capture_output=True, text=True)
    assert res.returncode == 1, res.stderr
    err = res.stderr.splitlines()
    short = [line for line in err if "short.wav" in line]
    nan = [line for line in err if "nan.wav" in line]
    assert short == [f"error: {tmp_path / 'short.wav'}: too short (1024 samples at 24000 Hz; MERT-v2 needs at "
                     f"least 1025)"], err
    assert len(nan) == 1 and "non-finite" in nan[0], err
    assert any(line.startswith("note: --chunk_stats ignored: MERT-v2") for line in err), err
    assert "1 written, 0 already there, 2 failed" in res.stderr
    got = np.load(tmp_path / "out" / "clip.npy")
    want = small.extract(torch.from_numpy(audio.load(tmp_path / "clip.wav")))[:, 0].numpy()
    assert got.shape == (small.num_states, n // 960, 64) == want.shape
    np.testing.assert_array_equal(got, want)  # one forward, the same samples: the same numbers
    rec = json.loads((tmp_path / "out" / "clip.npy.json").read_text())
    assert rec["arch"] == "MERT-v2" and rec["frame_grid"] == [960, 360.0, 24000] and rec["chunk"] == 30.0
    assert rec["chunk_stats"] is None and rec["layers"] == [0, 1, 2]
    assert not (tmp_path / "out" / "short.npy").exists() and not (tmp_path / "out" / "nan.npy").exists()


def test_chunked_frames_come_from_their_chunks_and_batches_group_lengths(small, tmp_path):
    """A file longer than --chunk: each kept frame is the frame of the chunk that plan_chunks gives it (chunks at
    multiples of 960 samples, the last running to the end), batched three chunks at a time with the longer last
    chunk in the batch (MERT2.extract runs each length apart), and the bfloat16 run is float32 and close."""
    x = music(24000 * 3 + 517, seed=1)
    sf.write(tmp_path / "s.wav", x, 24000, subtype="FLOAT")
    argv = [str(tmp_path / "s.wav"), "--ckpt", str(SMALL), "--chunk", "1", "--overlap", "0.2", "--batch", "3"]
    assert extract.main(argv + ["-o", str(tmp_path / "c")]) == 0
    got = np.load(tmp_path / "c" / "s.npy")
    x = audio.load(tmp_path / "s.wav")
    plan = extract.plan_chunks(len(x) // 960, 25, 5)
    assert len(plan) == 4 and got.shape == (3, len(x) // 960, 64)
    for k, (start, length, lo, hi) in enumerate(plan):
        end = len(x) if k == len(plan) - 1 else (start + length) * 960
        part = small.extract(torch.from_numpy(x[start * 960:end]))[:, 0].numpy()
        np.testing.assert_allclose(got[:, lo:hi], part[:, lo - start:hi - start], rtol=0, atol=2e-5)
    whole = small.extract(torch.from_numpy(x))[:, 0].numpy()
    assert np.abs(got - whole).max() > 1e-3  # GRN and attention see the chunk only: chunks differ from one pass
    assert extract.main(argv + ["-o", str(tmp_path / "b"), "--dtype", "bfloat16"]) == 0
    b = np.load(tmp_path / "b" / "s.npy")
    assert b.dtype == np.float32 and b.shape == got.shape
    cos = (b * got).sum(-1) / np.linalg.norm(b, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cos.min() > 0.99 and np.abs(b - got).max() > 0  # bf16 ran, and stays close


def test_default_chunk_follows_the_variant(small, tmp_path):
    """--chunk defaults: 30 s for MERT-v1 and MERT-v2-30s, 360 s for MERT-v2-FullSong ("fs")."""
    assert extract.model_info(small).chunk_s == 30.0 and extract.model_info(small).grid == mert2.FRAME_GRID
    fs = mert2.MERT2(mert2.MERT2Config.from_dict({**json.loads((SMALL / "config.json").read_text()),
                                                  "variant": "fs"}))
    assert extract.model_info(fs).chunk_s == 360.0
    v1 = extract.model_info(MERT(MERTConfig.from_preset("tiny", n_layers=1)))
    assert (v1.chunk_s, v1.grid, v1.min_samples) == (30.0, (320, 200.0, 24000), 400)


def test_bad_checkpoints_exit_2_with_one_line(tmp_path, capsys):
    """A config.json of another model type, a MERT-v2 config with a problem, MERT-v2 weights of another layout:
    one line naming the file and the problem, exit 2, nothing written."""
    sf.write(tmp_path / "a.wav", music(4800), 24000, subtype="FLOAT")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    (tmp_path / "bert" / "model.safetensors").write_bytes(b"")
    bad_cfg = tmp_path / "badcfg"
    bad_cfg.mkdir()
    cfg = json.loads((SMALL / "config.json").read_text())
    (bad_cfg / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 5}))
    (bad_cfg / "model.safetensors").write_bytes((SMALL / "model.safetensors").read_bytes())
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32, "subsampling_channels": [32, 48, 32],
                                                   "intermediate_size": 64}))
    (other / "model.safetensors").write_bytes((SMALL / "model.safetensors").read_bytes())
    for ckpt, says in ((tmp_path / "bert", "model_type 'bert', not a MERT model"),
                       (bad_cfg, "must split into 5 heads"), (other, "not this MERT-v2 layout")):
        assert extract.main([str(tmp_path / "a.wav"), "--ckpt", str(ckpt), "-o", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("extract.py: ") and str(ckpt) in err[0] and says in err[0], err
    assert not (tmp_path / "o").exists()


def test_hub_id_of_another_model_type_is_refused(tmp_path, monkeypatch, capsys):
    """A hub id whose snapshot in the local cache is another model type: refused by its config.json's model_type,
    as a folder is (it went the MERT-v1 path before), one line, exit 2."""
    sf.write(tmp_path / "a.wav", music(4800), 24000, subtype="FLOAT")
    snap = tmp_path / "hub" / "models--org--bert-like" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    (snap / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert extract.main([str(tmp_path / "a.wav"), "--ckpt", "org/bert-like", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "org/bert-like" in err[0] and "model_type 'bert', not a MERT model" in err[0], err
    assert not (tmp_path / "o").exists()


def test_probe_frame_task_on_the_25hz_grid(tmp_path):
    """`probe.py chords.csv --task chords --ckpt <MERT-v2 folder>` as a user runs it: every state probed, frames
    at MERT-v2's centres (0.015 s + 0.04 s t), 2 s clips -> 50 frames each; then --feats over the features it
    cached reads the 25 Hz grid from their records."""
    rows = []
    for i, split in enumerate(["train"] * 3 + ["valid", "test"]):
        sf.write(tmp_path / f"c{i}.wav", music(48000, seed=i), 24000, subtype="FLOAT")
        (tmp_path / f"c{i}.lab").write_text("0.0 1.0 C:maj\n1.0 2.0 A:min\n" if i % 2 else "0.0 2.0 G:maj\n")
        rows.append([f"c{i}.wav", f"c{i}.lab", split])
    with open(tmp_path / "chords.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    fast = ["--task", "chords", "--epochs", "2", "--patience", "1", "--no_mlp"]
    res = subprocess.run([sys.executable, str(ROOT / "probe.py"), str(tmp_path / "chords.csv"), "--ckpt", str(SMALL),
                          "--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "r.json")] + fast,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["frame_times"] == {"first": 360 / 24000, "hop": 960 / 24000}
    assert r["frames"] == {"train": 150, "valid": 50, "test": 50} and r["layers"] == 3 and r["dim"] == 64
    assert [p["layer"] for p in r["per_layer"]] == [0, 1, 2]
    feats = next(p.parent for p in (tmp_path / "cache").rglob("c0.npy"))
    assert probe.main([str(tmp_path / "chords.csv"), "--feats", str(feats), "--json", str(tmp_path / "f.json")]
                      + fast) == 0
    assert json.loads((tmp_path / "f.json").read_text())["frame_times"] == r["frame_times"]


def test_chunk_dependence_script_takes_mert2(tmp_path, capsys):
    """research/chunk_dependence.py (docs/mert2.md's chunking table) on a MERT-v2 folder: one row per setting,
    no --chunk_stats modes, every state of a chunked file off the whole-file pass."""
    sys.path.insert(0, str(ROOT / "research"))
    try:
        import chunk_dependence
    finally:
        sys.path.pop(0)
    sf.write(tmp_path / "s.wav", music(24000 * 4, seed=2), 24000, subtype="FLOAT")
    chunk_dependence.main([str(tmp_path / "s.wav"), "--ckpt", str(SMALL), "--offset", "0", "--seconds", "4",
                           "--chunks", "2:0.5"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 / 0.5 s")]
    assert len(rows) == 1 and rows[0].split("|")[2].strip() == "-"
    rel = [float(v) for v in rows[0].split("|")[3:-1]]
    assert len(rel) == 3 and min(rel) > 1e-3
