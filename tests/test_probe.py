"""probe.py: metrics against hand-worked values, the labels file, and the CLI end to end on synthesised clips;
the --task decision and its refusals, an empty annotation file left out with every metric kept, Ctrl-C."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import probe
from conftest import one_line, sine
from mert import MERT, MERTConfig

SR = 24000


def tone(f0, seconds=1.0, seed=0, harmonics=4):
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = sum(0.3 / h * np.sin(2 * np.pi * f0 * h * t + g.uniform(0, 6.3)) for h in range(1, harmonics + 1))
    return (x + 0.01 * g.standard_normal(len(t))).astype(np.float32)


def write_set(folder, rows, name="labels.csv"):
    """rows: (file name, audio, label, split) -> the CSV's path."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for fname, x, label, split in rows:
            if x is not None:
                (folder / fname).parent.mkdir(parents=True, exist_ok=True)
                sf.write(folder / fname, x, SR)
            w.writerow([fname, label, split])
    return folder / name


def split_of(i):
    return ("train", "train", "train", "valid", "test")[i % 5]


def test_regress_metric_by_hand():
    r2 = probe.metrics("regress", np.array([1.0, 2.0, 3.0]), np.array([[1.0], [2.0], [4.0]]))["r2"]
    assert r2 == pytest.approx(1 - 1 / 2)


def test_labels_file_errors_name_the_file_and_row(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label,split\na.wav,x,train\nb.wav,y,holdout\n")
    with pytest.raises(probe.ProbeError, match=r"bad.csv: row 2: split 'holdout'"):
        probe.read_labels(bad)
    bad.write_text("a.wav,1.5,train\nb.wav,loud,valid\nc.wav,2,test\n")
    with pytest.raises(probe.ProbeError, match=r"bad.csv: row 2: label 'loud' is not a number"):
        probe.read_labels(bad, "regress")
    bad.write_text("a.wav\n")
    with pytest.raises(probe.ProbeError, match="row 1 needs path,label"):
        probe.read_labels(bad)
    # no split column: a seeded 60/20/20 split; the task is guessed from the labels
    ok = tmp_path / "ok.csv"
    ok.write_text("".join(f"c{i}.wav,{i * 1.5}\n" for i in range(20)))
    items, splits, task = probe.read_labels(ok, seed=3)
    assert task == "regress" and splits.count("train") == 12 and splits.count("test") == 4
    assert probe.read_labels(ok, seed=3)[1] == splits and probe.read_labels(ok, seed=4)[1] != splits
    ok.write_text("".join(f"c{i}.wav,{'a;b' if i % 2 else 'a'}\n" for i in range(10)))
    assert probe.read_labels(ok)[2] == "tag"


@pytest.fixture(scope="module")
def pitch_set(tmp_path_factory):
    """Three pitch classes of harmonic tones plus one corrupt file and one missing file."""
    folder = tmp_path_factory.mktemp("pitch")
    rows = [(f"sub/p{i:02d}.wav", tone([196.0, 261.6, 392.0][i % 3] * 2 ** (0.2 * (i % 4) / 12), seed=i),
             ["G3", "C4", "G4"][i % 3], split_of(i // 3)) for i in range(45)]
    rows.append(("corrupt.wav", None, "C4", "train"))
    rows.append(("missing.wav", None, "G4", "test"))
    csv_path = write_set(folder, rows)
    (folder / "corrupt.wav").write_bytes(b"RIFF not really a wave file")
    return csv_path


def test_classify_with_handmade_features_names_bad_files(pitch_set, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert probe.main([str(pitch_set), "--features", "mfcc", "--json", str(out)]) == 1  # results, clips left out
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert sum("corrupt.wav" in ln for ln in lines) == 1 and sum("missing.wav" in ln for ln in lines) == 1
    assert "2 of 47 clips left out" in cap.err
    r = json.loads(out.read_text())
    assert r["task"] == "classify" and r["clips"] == {"train": 27, "valid": 9, "test": 9}
    assert r["best"]["linear"]["test"]["accuracy"] >= 0.85  # three octave-spread pitches: easy from MFCC
    assert "linear accuracy" in cap.out and "best" in cap.out


def test_cached_features_of_another_extraction_convention_are_not_reused(pitch_set, tmp_path, monkeypatch):
    """extract.py's convention changed (whole files, last chunk to the end): cached features made under an older
    one are stale, so the cache key names the convention and a new one recomputes."""
    torch.manual_seed(0)
    model = MERT(MERTConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=32, conv_dim=(16,) * 7, pos_conv_groups=4,
                            n_codebooks=0, cqt_bins=0))
    model.save(tmp_path / "m.pt")
    args = [str(pitch_set), "--ckpt", str(tmp_path / "m.pt"), "--cache", str(tmp_path / "cache"), "--epochs", "2",
            "--no-mlp"]
    assert probe.main(args) == 1  # pitch_set holds two unreadable clips
    monkeypatch.setattr(probe.extract, "EXTRACT_VERSION", probe.extract.EXTRACT_VERSION + 1)
    assert probe.main(args) == 1
    assert len(list((tmp_path / "cache").glob("model-*"))) == 2


def test_model_features_per_layer_cached_and_seeded(pitch_set, tmp_path, capsys):
    torch.manual_seed(0)
    model = MERT(MERTConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, conv_dim=(32,) * 7, pos_conv_groups=4,
                            n_codebooks=0, cqt_bins=0))
    ckpt = tmp_path / "m.pt"
    model.save(ckpt)
    cache = tmp_path / "cache"
    args = [str(pitch_set), "--ckpt", str(ckpt), "--cache", str(cache), "--epochs", "60"]
    assert probe.main(args + ["--json", str(tmp_path / "a.json")]) == 1  # pitch_set holds two unreadable clips
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["layers"] == 3 and a["dim"] == 32 and len(a["per_layer"]) == 3
    assert {"linear", "mlp"} <= set(a["per_layer"][0]) and len(a["weighted"]["mlp"]["weights"]) == 3
    assert sum(a["weighted"]["linear"]["weights"]) == pytest.approx(1, abs=1e-3)
    feats = sorted(cache.rglob("*.npy"))
    assert len(feats) == 45 and np.load(feats[0]).shape == (3, 32)  # [layers, dim], mirrored paths
    assert all(f.parent.name == "sub" for f in feats)
    stamp = [f.stat().st_mtime_ns for f in feats]
    assert probe.main(args + ["--json", str(tmp_path / "b.json")]) == 1
    assert [f.stat().st_mtime_ns for f in feats] == stamp  # read back from the cache, not recomputed
    b = json.loads((tmp_path / "b.json").read_text())
    for r in (a, b):
        r.pop("seconds")
    assert a == b  # seeded: identical results
    # the same architecture at random initialisation is a different feature set, cached separately
    assert probe.main(args + ["--features", "random", "--seed", "1"]) == 1
    assert len(list(cache.glob("random-*"))) == 1
    capsys.readouterr()


def test_tagging_and_regression(tmp_path):
    g = np.random.default_rng(0)
    rows = []
    for i in range(60):
        low, high = bool(i % 2), bool((i // 2) % 2) or not i % 2  # at least one tag per clip
        x = (tone(110.0, seed=i) if low else 0) + (tone(1760.0, seed=i + 99) if high else 0)
        rows.append((f"t{i}.wav", x, ";".join(t for t, on in (("high", high), ("low", low)) if on), split_of(i)))
    csv_path = write_set(tmp_path / "tag", rows)
    assert probe.main([str(csv_path), "--features", "cqt", "--json", str(tmp_path / "t.json")]) == 0
    t = json.loads((tmp_path / "t.json").read_text())
    assert t["task"] == "tag" and t["classes"] == ["high", "low"]
    assert t["best"]["linear"]["test"]["roc_auc"] > 0.8 and t["best"]["mlp"]["test"]["roc_auc"] > 0.95
    assert t["best"]["mlp"]["test"]["average_precision"] > 0.95

    rows = []
    for i in range(60):
        f0 = float(g.uniform(100, 800))
        rows.append((f"r{i}.wav", tone(f0, seed=i), f"{np.log2(f0):.4f}", split_of(i)))
    csv_path = write_set(tmp_path / "reg", rows)
    assert probe.main([str(csv_path), "--features", "cqt", "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    # log f0 is not linear in the mean CQT (the peak moves), and 36 clips are few for 672 dims: the MLP's job
    assert r["task"] == "regress" and r["best"]["mlp"]["test"]["r2"] > 0.6


def test_no_model_and_bad_labels_exit_2(tmp_path, monkeypatch, capsys):
    import extract
    (tmp_path / "l.csv").write_text("a.wav,x,train\n")
    monkeypatch.setattr(extract, "DEFAULT_CKPT", tmp_path / "absent.pt")
    assert probe.main([str(tmp_path / "l.csv")]) == 2
    assert probe.main([str(tmp_path / "l.csv"), "--features", "mfcc"]) == 2  # valid and test splits empty
    err = capsys.readouterr().err
    assert "no shipped model" in err and "l.csv: the valid split is empty" in err


def test_probe_tasks_and_evidence_scripts(tmp_path):
    """The README's evidence commands, at toy size: synthesis is seeded, and the table has a row per task."""
    root = Path(__file__).resolve().parent.parent
    make = [sys.executable, str(root / "examples" / "make_probe_tasks.py"), "--n", "30", "--seconds", "1",
            "--tasks", "chord,tempo"]
    subprocess.run(make + [str(tmp_path / "a")], check=True, capture_output=True)
    subprocess.run(make + [str(tmp_path / "b")], check=True, capture_output=True)
    for f in ("chord.csv", "chord/chord_00007.flac", "tempo.csv", "tempo/tempo_00003.flac"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    rows = list(csv.reader(open(tmp_path / "a" / "tempo.csv")))
    assert rows[0] == ["path", "label", "split"] and len(rows) == 31 and 70 <= float(rows[1][1]) <= 170
    assert {r[2] for r in rows[1:]} == {"train", "valid", "test"}
    out = subprocess.run([sys.executable, str(root / "examples" / "probe_evidence.py"), str(tmp_path / "a"),
                          "--features", "mfcc", "--only", "chord,tempo", "--json", str(tmp_path / "e.json")],
                         check=True, capture_output=True, text=True).stdout
    assert "| chord | accuracy |" in out and "| tempo | r2 |" in out
    assert set(json.loads((tmp_path / "e.json").read_text())) == {"chord/mfcc", "tempo/mfcc"}
    bound = [sys.executable, str(root / "research" / "supervised_bound.py"), str(tmp_path / "a"), "--task", "chord",
             "--steps", "2", "--batch", "2", "--eval_every", "2", "--threads", "1"]
    broken = next(r[0] for r in csv.reader(open(tmp_path / "a" / "chord.csv")) if r[2] == "train")
    (tmp_path / "a" / broken).write_bytes(b"not audio")  # one bad clip is named and left out
    res = subprocess.run(bound + ["--crop", "0.5"], check=True, capture_output=True, text=True)
    out = res.stdout
    assert "6 classes (chance 0.167)" in out and "step 2 |" in out and "test accuracy" in out
    assert "skipped" in res.stderr and Path(broken).name in res.stderr and "17 training clips" in out
    bad = subprocess.run(bound + ["--crop", "2"], capture_output=True, text=True)
    assert bad.returncode != 0 and "fewer than --crop" in bad.stderr


def test_cqt_decode_ridge_and_table(tmp_path):
    """research/cqt_decode.py: the ridge R² is ~1 for features that hold the target and ~0 for noise; the CLI
    prints a row per reference, conv stack and layer, and a real spectrum decodes the CQT of harmonic tones."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "research"))
    try:
        import cqt_decode
    finally:
        sys.path.remove(str(root / "research"))
    g = torch.Generator().manual_seed(0)
    y = torch.randn(9, 50, 24, generator=g)
    err, var = cqt_decode.ridge_errors(y @ torch.randn(24, 40, generator=g), y, 6)
    assert 1 - err.sum() / var.sum() > 0.95
    err, var = cqt_decode.ridge_errors(torch.randn(9, 50, 20, generator=g), y, 6)
    assert abs(1 - err.sum() / var.sum()) < 0.1
    rng = np.random.default_rng(0)
    for i in range(4):  # 6 s of 12 random notes each
        notes = [tone(110 * 2 ** (rng.integers(0, 36) / 12), 0.5, seed=10 * i + j, harmonics=8) for j in range(12)]
        sf.write(tmp_path / f"m{i}.wav", np.concatenate(notes), SR)
    cfg = MERTConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, conv_dim=(16,) * 7, pos_conv_groups=4,
                     n_codebooks=0, cqt_bins=0)
    MERT(cfg).save(tmp_path / "m.pt")
    cmd = [sys.executable, str(root / "research" / "cqt_decode.py"), str(tmp_path), "--ckpt", str(tmp_path / "m.pt"),
           "--clips", "9", "--threads", "1"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = {r.split(" | ")[0].lstrip("| "): r.split(" | ")[1:] for r in out.splitlines() if r.startswith("| ")}
    assert {"m.pt, conv features", "m.pt, layer 0", "m.pt, layer 2"} <= set(rows)
    assert float(rows["log STFT, 2048-sample window"][0]) > 0.5
    bad = subprocess.run(cmd[:-4] + ["--clips", "3"], capture_output=True, text=True)
    assert bad.returncode != 0 and "at least 6" in bad.stderr


def test_frontend_fit_gabor_bank_and_cli(tmp_path):
    """research/frontend_fit.py: each Gabor channel peaks at its own constant-Q centre frequency; the CLI
    trains the front end on harmonic tones and prints the held-out R² before, during and after training."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "research"))
    try:
        import frontend_fit
    finally:
        sys.path.remove(str(root / "research"))
    w = frontend_fit.gabor_bank(96, 1024)[:, 0].double()
    spec = torch.fft.rfft(w, n=1 << 16).abs()
    peak = spec.argmax(1).double() * SR / (1 << 16)
    centre = 110.0 * 2.0 ** (torch.arange(96, dtype=torch.float64) / 24)
    assert torch.allclose(peak, centre, rtol=0.01, atol=2.0)
    with pytest.raises(ValueError, match="Nyquist"):
        frontend_fit.gabor_bank(256, 64)
    rng = np.random.default_rng(1)
    for i in range(3):
        notes = [tone(110 * 2 ** (rng.integers(0, 36) / 12), 0.5, seed=10 * i + j, harmonics=8) for j in range(8)]
        sf.write(tmp_path / f"m{i}.wav", np.concatenate(notes), SR)
    cmd = [sys.executable, str(root / "research" / "frontend_fit.py"), str(tmp_path), "--val", str(tmp_path),
           "--kernels", "64,3,3,3,3,2,2", "--gabor", "--freeze-first", "--steps", "4", "--every", "2",
           "--batch", "2", "--val-clips", "2", "--threads", "1"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    assert "receptive field 454 samples" in out and "first conv frozen True" in out
    steps = [int(line.split("|")[0].split()[1]) for line in out.splitlines() if line.startswith("step")]
    assert steps == [0, 2, 4]
    bad = subprocess.run(cmd[:5] + ["--kernels", "10,3"], capture_output=True, text=True)
    assert bad.returncode != 0 and "same length" in bad.stderr


def test_a_plateau_of_the_metric_is_broken_by_the_validation_loss(tmp_path):
    """Separable clips reach validation accuracy 1 within a few epochs; the probe must keep training while the
    validation loss falls (ties of the metric are ties: they once compared in float32 and never counted)."""
    g = np.random.default_rng(0)
    (tmp_path / "f").mkdir()
    rows = []
    for i in range(40):
        np.save(tmp_path / "f" / f"c{i}.npy", (g.standard_normal((1, 8)) + 6 * (i % 2)).astype(np.float32))
        rows.append(f"c{i}.wav,{'ab'[i % 2]},{('train', 'train', 'train', 'valid', 'test')[i % 5]}\n")
    (tmp_path / "l.csv").write_text("".join(rows))
    assert probe.main([str(tmp_path / "l.csv"), "--feats", str(tmp_path / "f"), "--no-mlp", "--epochs", "120",
                       "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["best"]["linear"]["valid"]["accuracy"] == 1.0 and r["per_layer"][0]["linear"]["epochs"] > 100


# ----------------------------------------------------------------------------- the task decision and refusals


@pytest.fixture(scope="module")
def beats_task(tmp_path_factory):
    """Ten 2-second clips of clicks on a 0.5 s grid and their .beats files (time, beat-in-bar); one file empty."""
    d = tmp_path_factory.mktemp("beats")
    rows = ["path,label,split"]
    for i in range(10):
        x = sine(2.0, f=110 + 20 * i, seed=i) * 0.2
        for k, t in enumerate(np.arange(0.1 + 0.02 * i, 2.0, 0.5)):
            a = int(t * 24000)
            x[a:a + 240] += np.hanning(240).astype(np.float32) * (1.0 if k % 4 == 0 else 0.5)
        sf.write(d / f"c{i}.wav", x, 24000)
        times = np.arange(0.1 + 0.02 * i, 2.0, 0.5)
        beats = "" if i == 3 else "".join(f"{t:.3f} {k % 4 + 1}\n" for k, t in enumerate(times))
        (d / f"c{i}.beats").write_text(beats)
        rows.append(f"c{i}.wav,c{i}.beats,{'train' if i < 6 else 'valid' if i < 8 else 'test'}")
    (d / "beats.csv").write_text("\n".join(rows) + "\n")
    return d


@pytest.mark.usefixtures("one_thread")  # last in the file: one_thread holds from here to the module's end
def test_probe_refuses_to_guess_names_bad_files_and_keeps_every_metric(beats_task, tmp_path, monkeypatch, capsys):
    """Why: without --task, annotation files were classified as 30 class names (accuracy 0, exit 0) and a tempo
    column with one 'fast' became a 93-class task; one empty .beats file dropped downbeat scoring for every clip;
    --device cuda gave a traceback; a read-only cache failed once per clip after extracting everything. Now:
    refusals naming rows and the flag to pass (exit 2), the decision printed, the empty file named and left out
    with every metric kept, progress lines in the log, and the cache checked before any work."""
    d = beats_task
    (tmp_path / "file.txt").write_text("x")
    numbers = tmp_path / "tempo.csv"
    rows = "".join(f"{d}/c{i}.wav,{90 + 7 * i}\n" for i in range(9))
    numbers.write_text("path,label\n" + rows + f"{d}/c9.wav,fast\n")
    fast = ["--features", "cqt", "--epochs", "3", "--patience", "2", "--no_mlp"]
    cases = [([str(d / "beats.csv")] + fast, "--task chords, beats, notes or segments"),
             ([str(numbers)] + fast, "rows 10 are not"),
             ([str(d / "beats.csv"), "--task", "beats", "--cache", str(tmp_path / "file.txt" / "c")] + fast, "--cache"),
             ([str(d / "beats.csv"), "--task", "beats", "--json", str(tmp_path / "file.txt" / "r.json")] + fast,
              "--json")]
    if not torch.cuda.is_available():
        cases.append(([str(d / "beats.csv"), "--task", "beats", "--device", "cuda"], "--device cuda"))
    for argv, named in cases:
        assert probe.main(argv) == 2, argv
        err = capsys.readouterr().err  # (the cache's refusal comes after the annotations were read: c3 is named)
        assert named in one_line("\n".join(x for x in err.splitlines() if "c3.beats: no beats" not in x)), argv
    assert not (d / ".probe_cache").exists()
    numbers.write_text("path,label\n" + "".join(f"{d}/c{i}.wav,{90 + 7 * i}\n" for i in range(10)))
    probe.read_labels(numbers)
    assert "--task auto: regress (every label is a number, 10 distinct values in 10 rows)" in capsys.readouterr().err

    out = tmp_path / "r.json"
    assert probe.main([str(d / "beats.csv"), "--task", "beats", "--json", str(out)] + fast) == 1  # one clip left out
    err = capsys.readouterr().err
    assert err.count("c3.beats: no beats in the file") == 1
    assert "linear probes of 1 layers: done after" in err and "best valid beat_f" in err  # the log's progress
    r = json.loads(out.read_text())
    assert r["metrics"] == ["beat_f", "downbeat_f"] and r["clips_left_out"] == 1
    assert "downbeat_f" in r["best"]["linear"]["test"]

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(probe, "compute_features", ctrl_c)
    assert probe.main([str(d / "beats.csv"), "--task", "beats"] + fast) == 130
    assert "interrupted" in capsys.readouterr().err.splitlines()[-1]
