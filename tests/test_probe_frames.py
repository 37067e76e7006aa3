"""probe.py's frame tasks (chords, beats, notes, segments) end to end on the command line, the learned layer
combination, and the flag spellings."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mirmetrics as mm
import probe
from mert import MERT, MERTConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def timed(tmp_path_factory):
    """The timed tasks of make_probe_tasks.py at toy size (15 clips of 6 s each)."""
    out = tmp_path_factory.mktemp("timed")
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_probe_tasks.py"), str(out), "--tasks",
                    "chords,beats,notes,keys", "--n", "15"], check=True, capture_output=True)
    return out


FAST = ["--epochs", "12", "--patience", "4", "--hidden", "32"]


def test_frame_tasks_cli_print_the_metrics(timed, tmp_path, capsys):
    """Each frame task from the command line on CQT frames: the table names the field's metrics, --json holds
    every layer and split, and the scores are far above chance (CQT frames hold chords, pitches and onsets)."""
    want = {"chords": ["root", "majmin", "mirex"], "beats": ["beat_f", "downbeat_f"], "notes": ["onset_f", "note_f"],
            "keys": ["accuracy"]}
    for name, task in (("chords", "chords"), ("beats", "beats"), ("notes", "notes"), ("keys", "segments")):
        out = tmp_path / f"{name}.json"
        argv = [str(timed / f"{name}.csv"), "--task", task, "--features", "cqt", "--context", "1", "--json", str(out)]
        argv += FAST + ([] if name in ("chords", "beats") else ["--no_mlp"])  # the MLP path twice is enough
        if name == "chords":  # as a user runs it
            res = subprocess.run([sys.executable, str(ROOT / "probe.py")] + argv, capture_output=True, text=True)
            assert res.returncode == 0, res.stderr
            stdout = res.stdout
        else:
            assert probe.main(argv) == 0
            stdout = capsys.readouterr().out
        r = json.loads(out.read_text())
        assert r["task"] == task and r["metrics"] == want[name] and r["context"] == 1
        assert r["clips"] == {"train": 9, "valid": 3, "test": 3} and r["frames"]["train"] == 9 * 451  # 6 s // 320 + 1
        for m in want[name]:
            assert f"linear {m}" in stdout and (f"mlp {m}" in stdout) == (name in ("chords", "beats"))
        assert r["frame_times"] == {"first": 0.0, "hop": 320 / 24000}  # the CQT's frames are centred on 320 t
        best = r["best"]["linear"]["test"]  # the linear probe: the more stable at this toy size
        if name == "chords":
            assert len(r["classes"]) == 25 and best["root"] > 0.3 and best["majmin"] > 0.1  # chance 1/25
        elif name == "beats":
            assert best["beat_f"] > 0.6 and 0 < r["best"]["linear"]["valid"]["beat_f"] <= 1
            assert set(r["per_layer"][0]["linear"]["thresholds"]) == {"beat_f", "downbeat_f"}
        elif name == "notes":
            assert best["onset_f"] > 0.05 and best["note_f"] > 0.05
        else:
            assert best["accuracy"] > 1 / len(r["classes"])  # 13 keys seen in 9 clips: little to learn from


def test_frame_probe_model_layers_cache_and_seed(timed, tmp_path, capsys):
    """A tiny model's frames: every layer probed at its frame centres, only the layers asked for extracted and
    cached, the learned combination reported, a seeded rerun identical, and a bad annotation named once."""
    torch.manual_seed(0)
    cfg = MERTConfig(dim=16, n_layers=2, n_heads=2, ffn_dim=32, conv_dim=(16,) * 7, pos_conv_groups=4,
                     n_codebooks=0, cqt_bins=0)
    MERT(cfg).save(tmp_path / "m.pt")
    rows = [[str(timed / r[0]), str(timed / r[1]), r[2]] for r in list(csv.reader(open(timed / "chords.csv")))[1:]]
    bad = tmp_path / "bad.lab"
    bad.write_text("0.0 1.0 C:maj\n1.0 2.0 H:min\n")
    rows[0][1] = str(bad)  # absolute paths work too
    with open(tmp_path / "c.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    cache = tmp_path / "cache"
    args = [str(tmp_path / "c.csv"), "--task", "chords", "--ckpt", str(tmp_path / "m.pt"), "--cache", str(cache),
            "--layers", "1", "2", "--no-mlp"] + FAST  # space-separated (or 1,2 or 1-2)
    assert probe.main(args + ["--json", str(tmp_path / "a.json")]) == 1  # results, one clip left out
    cap = capsys.readouterr()
    assert cap.err.count("bad.lab") == 1 and "line 2: chord label 'H:min'" in cap.err
    assert "1 of 15 clips left out" in cap.err and "softmax" in cap.out
    a = json.loads((tmp_path / "a.json").read_text())
    assert [p["layer"] for p in a["per_layer"]] == [1, 2] and a["best"]["linear"]["layer"] in (1, 2)
    assert a["frame_times"] == {"first": 200 / 24000, "hop": 320 / 24000}  # extract.py's documented centres
    assert sum(a["weighted"]["linear"]["weights"]) == pytest.approx(1, abs=1e-3)
    feats = sorted(cache.rglob("*.npy"))
    assert len(feats) == 14 and np.load(feats[0]).shape == (2, 449, 16)  # (6 s * 24000 - 400) // 320 + 1 frames
    assert probe.main(args + ["--json", str(tmp_path / "b.json")]) == 1
    b = json.loads((tmp_path / "b.json").read_text())
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    capsys.readouterr()


def _noise_and_signal(g, n_layers, informative, shape, onehot):
    """Features [n_layers, *shape]: noise everywhere, plus the label in the informative layer's first dims."""
    f = g.standard_normal((n_layers,) + shape).astype(np.float32)
    f[informative, ..., :onehot.shape[-1]] += 2 * onehot
    return f


def test_learned_layer_weights_move_to_the_informative_layer(tmp_path):
    """One layer holds the label, the others noise: the softmax layer weights must move towards it, for a clip
    task and a frame task (they stayed at exactly 1/L: the mixing logits moved by the probe's lr per step)."""
    g = np.random.default_rng(0)
    feats, rows = tmp_path / "feats", []
    for i in range(300):
        y = i % 3
        (feats / f"c{i}.npy").parent.mkdir(parents=True, exist_ok=True)
        np.save(feats / f"c{i}.npy", _noise_and_signal(g, 5, 2, (32,), np.eye(3)[y]))
        rows.append(f"c{i}.wav,{'abc'[y]},{('train', 'train', 'train', 'valid', 'test')[i % 5]}\n")
    (tmp_path / "clip.csv").write_text("".join(rows))
    # frames: two segments per clip, at extract.py's frame centres (320 t + 200) / 24000 s
    T, rows = 150, []
    times = (320 * np.arange(T) + 200) / 24000
    for i in range(60):
        cut = g.uniform(0.5, 1.5)
        labels = [int(g.integers(3)), int(g.integers(3))]
        y = np.where(times < cut, labels[0], labels[1])
        np.save(feats / f"f{i}.npy", _noise_and_signal(g, 5, 3, (T, 16), np.eye(3)[y]))
        (tmp_path / f"f{i}.lab").write_text(f"0 {cut} {'abc'[labels[0]]}\n{cut} 2.1 {'abc'[labels[1]]}\n")
        rows.append(f"f{i}.wav,f{i}.lab,{('train', 'train', 'train', 'valid', 'test')[i % 5]}\n")
    (tmp_path / "frames.csv").write_text("".join(rows))
    for name, task, informative in (("clip", "classify", 2), ("frames", "segments", 3)):
        out = tmp_path / f"{name}.json"
        assert probe.main([str(tmp_path / f"{name}.csv"), "--task", task, "--feats", str(feats), "--json", str(out),
                           "--hidden", "32", "--epochs", "60"]) == 0
        r = json.loads(out.read_text())
        for kind in ("linear", "mlp"):
            w = r["weighted"][kind]["weights"]
            assert int(np.argmax(w)) == informative and w[informative] > 0.5, (name, kind, w)


def test_flag_aliases_and_help():
    """--weight_decay is canonical and --weight-decay an alias (as every multi-word flag); --help shows each
    flag and default once."""
    p = probe.build_parser()
    a = p.parse_args(["x.csv", "--weight-decay", "0.5", "--batch-size", "7", "--no-mlp", "--mix-lr", "0.2",
                      "--min-beat-time", "5", "--pitch-unit", "midi"])
    b = p.parse_args(["x.csv", "--weight_decay", "0.5", "--batch_size", "7", "--no_mlp", "--mix_lr", "0.2",
                      "--min_beat_time", "5", "--pitch_unit", "midi"])
    assert vars(a) == vars(b) and a.weight_decay == 0.5 and a.batch_size == 7 and a.no_mlp
    for layers in (["1", "3-4"], ["1,3-4"], ["1,", "3-4"]):  # a list flag: space- and comma-separated
        assert probe.extract.parse_layers(probe._layer_spec(p.parse_args(["x.csv", "--layers", *layers])), 6) == [1, 3, 4]
    text = p.format_help()
    assert "--weight-decay WEIGHT_DECAY" not in text and text.count("--weight_decay") == 2  # usage and options
    assert text.count("(default: 0.0001)") == 1 and "(default: None)" not in text and "(default: False)" not in text


def test_chord_vocabulary_peaks_and_segments():
    """The 25-class training targets, peak picking and frame-to-segment conversion by hand."""
    assert mm.MAJMIN_VOCAB[probe.chord_class("A:min7/5")] == "A:min"
    assert mm.MAJMIN_VOCAB[probe.chord_class("Db:7")] == "C#:maj" and probe.chord_class("N") == 0
    assert probe.chord_class("C:dim") == probe.chord_class("C:sus4") == probe.chord_class("X") == -100
    act = np.array([0.1, 0.9, 0.9, 0.2, 0.8, 0.1, 0.1, 0.7])
    assert np.flatnonzero(mm.pick_peaks(act, 1)).tolist() == [1, 4, 7]  # a plateau peaks once, at its start
    assert np.flatnonzero(mm.pick_peaks(act, 3)).tolist() == [1]
    times = probe.frame_times(4, probe.MERT_GRID)
    assert times.tolist() == pytest.approx([200 / 24000, 520 / 24000, 840 / 24000, 1160 / 24000])
    iv, labels = mm.frames_to_segments(["N", "C:maj", "C:maj", "N"], times, 0.06)
    assert labels == ["N", "C:maj", "N"] and iv[0, 0] == 0 and iv[-1, 1] == 0.06
    assert iv[1].tolist() == pytest.approx([(times[0] + times[1]) / 2, (times[2] + times[3]) / 2])
