"""Issue 27: every command, every mistake: one line on stderr, the right exit code, nothing lost or left behind;
Ctrl-C; probe.py's task decision; the Linear fast path under quantize_dynamic and bfloat16.

CLI cases run in-process through each command's main(argv) (capsys, exit codes, SystemExit) where one exists,
with a few real subprocesses for what only a process shows (signals, tracebacks). "Read-only" places are paths
under a regular file (`file.txt/sub`), which refuse writes for root too (the tests may run as root, which chmod
does not stop); a full disk is simulated by patching the writer in-process to raise ENOSPC."""
import errno
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
from mert import MERT, MERTConfig

ROOT = Path(__file__).resolve().parent.parent


def tone(seconds, sr=24000, f=220.0, seed=0):
    t = np.arange(int(seconds * sr)) / sr
    g = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * f * t) + 0.01 * g.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A very small MERT checkpoint (training-style heads included) and a short clip."""
    d = tmp_path_factory.mktemp("micro")
    torch.manual_seed(0)
    m = MERT(MERTConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, conv_dim=(32,) * 7, pos_conv_groups=4)).eval()
    m.save(d / "micro.pt")
    sf.write(d / "clip.wav", tone(1.5), 24000)
    return d


def one_line(err: str) -> str:
    """The stderr of a refusal: exactly one non-empty line, and no traceback."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- the Linear fast path


def test_fast_path_steps_aside_for_quantised_and_bf16_models(micro, tmp_path):
    """Why: quantize_dynamic(model, {nn.Linear}) failed in extract ('function' object has no attribute 'dtype');
    now the quantised and the bfloat16 model run through MERT.extract and extract.py's Python path."""
    model = MERT.from_pretrained(micro / "micro.pt").eval()
    wav = torch.from_numpy(tone(1.5))[None]
    ref = model.extract(wav)
    q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert type(q.encoder.layers[0].attention.qkv) is not nn.Linear  # really quantised
    b = MERT.from_pretrained(micro / "micro.pt").eval().to(torch.bfloat16)
    for m, tol in ((q, 0.1), (b, 0.05)):
        out = m.extract(wav.to(next(m.parameters()).dtype)).float()
        assert out.shape == ref.shape
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < tol, rel  # the same model, approximately (int8 / bf16 rounding)
        dst = tmp_path / f"{tol}.npy"
        extract.extract_files(m, [(micro / "clip.wav", dst)], list(range(m.num_states)), progress=False)
        feats = np.load(dst)
        assert feats.shape == tuple(ref[:, 0].shape) and np.isfinite(feats).all()


# ----------------------------------------------------------------------------- train.py

MICRO = ["--size", "tiny", "--dim", "32", "--n_layers", "2", "--n_heads", "2", "--ffn_dim", "64",
         "--conv_dim", "16,16,16,16,16,16,16", "--pos_conv_groups", "4", "--final_dim", "8",
         "--crop_seconds", "1.0", "--teachers", "randproj", "--num_workers", "0", "--warmup_steps", "5",
         "--eval_interval", "1000", "--ckpt_interval", "1000", "--batch_size", "2", "--max_steps", "4"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tracks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tracks")
    for i in range(3):
        sf.write(d / f"t{i}.wav", tone(3.5, f=150 + 60 * i, seed=i), 24000)
    return d


def test_train_usage_errors_exit_2_in_one_line_and_leave_no_run_folder(tracks, tmp_path, capsys):
    """Why: --size 95M, a missing --data, --init nope.pt exited 1; --device cuda on CPU torch and an --out that
    cannot be written gave tracebacks. Now: one line, exit 2, and no run folder left by a failed start."""
    import train
    (tmp_path / "file.txt").write_text("not a folder")
    cases = [(["--size", "95M", "--data", str(tracks)], "--size '95M'"),
             (["--out", str(tmp_path / "a")], "--data is required"),
             (["--data", str(tracks), "--init", str(tmp_path / "nope.pt")], "--init"),
             (["--data", str(tracks), "--device", "cuda"], "--device cuda"),
             (["--data", str(tracks), "--out", str(tmp_path / "file.txt" / "run")], "--out"),
             (["--size", "95M", "--print_config"], "--size '95M'")]
    if torch.cuda.is_available():
        cases = [c for c in cases if "--device" not in c[0]]
    for argv, named in cases:
        if "--out" not in argv:
            argv = argv + ["--out", str(tmp_path / "run")]
        with pytest.raises(SystemExit) as e:
            train.main(MICRO[:-2] + argv)
        assert e.value.code == 2, (argv, e.value.code)
        assert named in one_line(capsys.readouterr().err), argv
        assert not (tmp_path / "run").exists(), argv  # --init nope.pt got as far as making the folder before


def test_train_ctrl_c_finishes_the_step_checkpoints_and_exits_130(tracks, tmp_path, monkeypatch, capsys):
    """Why: Ctrl-C printed a KeyboardInterrupt traceback from inside Adam and wrote no checkpoint.
    Now it is SIGTERM's stop (the step finishes, a checkpoint, one line) with exit 130; the run continues."""
    import train
    out = tmp_path / "run"
    args = MICRO + ["--data", str(tracks), "--out", str(out)]
    real_forward, calls = train.MERT.forward, []

    def ctrl_c_in_step_1(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_forward(self, *a, **k)

    monkeypatch.setattr(train.MERT, "forward", ctrl_c_in_step_1)
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == train.EXIT_INTERRUPTED == 130
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2  # step 1 finished and was saved
    cap = capsys.readouterr()
    assert "Ctrl-C: finishing this step" in cap.err and "Traceback" not in cap.err
    assert "stopped by Ctrl-C at step 2" in cap.out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    monkeypatch.setattr(train.MERT, "forward", real_forward)
    assert train.main(args) == 0
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4


def test_train_second_ctrl_c_stops_at_once_in_one_line(tracks, tmp_path):
    """Why: Ctrl-C in train.py gave a traceback. A second Ctrl-C (a real process, real signals) stops at once:
    one line naming what is kept, exit 130, no traceback."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py")] + MICRO[:-1] + ["1000", "--data", str(tracks), "--out", str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in p.stdout:  # the loop is running
        if line.startswith("step 1 |"):
            break
    p.send_signal(signal.SIGINT)
    time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = [x for x in err.splitlines() if x.strip()][-1]
    assert last.startswith("train.py: stopped at once by Ctrl-C") or "stopped by Ctrl-C" in rest, (err, rest)


# ----------------------------------------------------------------------------- convert.py / train.py export


def test_export_refuses_to_replace_names_bad_places_and_leaves_no_temp_file(micro, tmp_path, monkeypatch, capsys):
    """Why: `train.py export ckpt.pt mine.pt` silently replaced an existing export; an export under a file or onto
    a full disk gave a traceback and left mine.pt.tmp; a missing checkpoint exited 1. Now one line each: exit 2
    for the flags, 1 for the full disk, 130 for Ctrl-C, and no temp file."""
    import convert
    import mert
    import train
    ck, mine = str(micro / "micro.pt"), tmp_path / "mine.pt"
    assert train.main(["export", ck, str(mine)]) == 0
    before = mine.read_bytes()
    (tmp_path / "file.txt").write_text("x")
    for argv, named in (([ck, str(mine)], "--overwrite"),
                        ([str(tmp_path / "nope.pt"), str(tmp_path / "b.pt")], "nope.pt"),
                        ([ck, str(tmp_path / "file.txt" / "m.pt")], "file.txt")):
        assert train.main(["export"] + argv) == 2, argv
        assert named in one_line(capsys.readouterr().err)
    assert mine.read_bytes() == before
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # writes part of the file, then the disk is full
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(mert.torch, "save", full_disk)
    assert convert.main([ck, str(mine), "--overwrite"]) == 1
    assert "No space left" in one_line(capsys.readouterr().err)

    def ctrl_c(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(mert.torch, "save", ctrl_c)
    assert convert.main([ck, str(tmp_path / "c.pt")]) == 130
    assert "interrupted" in one_line(capsys.readouterr().err)
    monkeypatch.setattr(mert.torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "mine.pt"] and mine.read_bytes() == before
    assert convert.main([ck, str(mine), "--overwrite"]) == 0


# ----------------------------------------------------------------------------- rvq.py, teachers.py, audio.py prepare


def test_rvq_teachers_prepare_refuse_in_one_line_before_any_work(micro, tmp_path, monkeypatch, capsys):
    """Why: `rvq.py --eval --ckpt nope.pt` and `teachers.py labels --acoustic_ckpt <text file>` gave a traceback
    or a bare 'error: 101'; `rvq.py --out <unwritable>` trained to the end, then died saving; `audio.py prepare
    emptydir` exited 0 having made nothing. Now each is one line naming the flag or folder, before any work."""
    import audio
    import rvq
    import teachers
    bad, clip = tmp_path / "notes.txt", str(micro / "clip.wav")
    bad.write_text("not a checkpoint\n")
    (tmp_path / "empty").mkdir()
    trained = []
    monkeypatch.setattr(rvq, "train", lambda *a, **k: trained.append(1))
    cases = [(rvq.main, ["--eval", "--ckpt", str(tmp_path / "nope.pt"), "--data", clip], 2, "--ckpt"),
             (rvq.main, ["--eval", "--ckpt", str(bad), "--data", clip], 1, "not a checkpoint"),
             (rvq.main, ["--data", clip, "--out", str(bad / "teacher.pt")], 2, "--out"),
             (teachers.main, ["labels", clip, "--start", "0", "--acoustic_ckpt", str(bad)], 2, "--acoustic_ckpt"),
             (teachers.main, ["labels", clip, "--start", "0", "--acoustic_ckpt", "nope.th"], 2, "--acoustic_ckpt"),
             (teachers.main, ["labels", clip, "--start", "0", "--teachers", "mfcc", "--mfcc_ckpt", str(bad)], 2,
              "--mfcc_ckpt"),
             (teachers.main, ["fit-mfcc", "--data", clip, "--out", str(bad / "km.pt")], 2, "--out"),
             (audio.main, ["prepare", str(tmp_path / "empty"), "--out", str(tmp_path / "shards")], 1, "no audio files"),
             (audio.main, ["prepare", clip, "--out", str(bad / "shards")], 2, "--out")]
    if not torch.cuda.is_available():
        cases.append((rvq.main, ["--data", clip, "--out", str(tmp_path / "t.pt"), "--device", "cuda"], 2, "--device"))
    for fn, argv, code, named in cases:
        assert fn(argv) == code, argv
        assert named in one_line(capsys.readouterr().err), argv
    assert not trained and not (tmp_path / "shards").exists()

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(audio, "_expand_sources", ctrl_c)
    assert audio.main(["prepare", clip, "--out", str(tmp_path / "s2")]) == 130
    monkeypatch.setattr(rvq, "train", ctrl_c)
    assert rvq.main(["--data", clip, "--out", str(tmp_path / "t.pt")]) == 130
    for line in capsys.readouterr().err.splitlines():
        assert "Traceback" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes.txt"]


# ----------------------------------------------------------------------------- probe.py


@pytest.fixture(scope="module")
def beats_task(tmp_path_factory):
    """Ten 2-second clips of clicks on a 0.5 s grid and their .beats files (time, beat-in-bar); one file empty."""
    d = tmp_path_factory.mktemp("beats")
    rows = ["path,label,split"]
    for i in range(10):
        x = tone(2.0, f=110 + 20 * i, seed=i) * 0.2
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


def test_probe_refuses_to_guess_names_bad_files_and_keeps_every_metric(beats_task, tmp_path, monkeypatch, capsys):
    """Why: without --task, annotation files were classified as 30 class names (accuracy 0, exit 0) and a tempo
    column with one 'fast' became a 93-class task; one empty .beats file dropped downbeat scoring for every clip;
    --device cuda gave a traceback; a read-only cache failed once per clip after extracting everything. Now:
    refusals naming rows and the flag to pass (exit 2), the decision printed, the empty file named and left out
    with every metric kept, progress lines in the log, and the cache checked before any work."""
    import probe
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
