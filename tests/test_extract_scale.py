"""extract.py at scale (issue 26) and its faults (issue 27): torchrun and --shard splits, decoding workers,
the shards format and its README reader, the output lock, a read-only folder, Ctrl-C, a killed rank."""
import faulthandler
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import audio
from conftest import children
import extract

ROOT = Path(extract.__file__).resolve().parent


def music(n, sr=24000, seed=0, channels=1):
    g = np.random.default_rng(seed)
    t = np.arange(n) / sr
    x = sum(0.2 / h * np.sin(2 * np.pi * (150 + 20 * seed) * h * t) for h in range(1, 5)) + 0.02 * g.standard_normal(n)
    return np.stack([x, 0.5 * x[::-1]], 1).astype(np.float32) if channels == 2 else x.astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Eight short files of mixed formats, rates, channel counts and lengths."""
    src = tmp_path_factory.mktemp("music")
    (src / "sub").mkdir()
    for i in range(8):
        n_sec = 1.0 + 0.7 * i
        if i % 3 == 0:
            sf.write(src / f"{i}.flac", music(int(44100 * n_sec), 44100, i, 2), 44100)
        elif i % 3 == 1:
            sf.write(src / "sub" / f"{i}.ogg", music(int(48000 * n_sec), 48000, i), 48000, format="OGG")
        else:
            sf.write(src / f"{i}.wav", music(int(22050 * n_sec), 22050, i), 22050, subtype="FLOAT")
    return src


def npys(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.npy"))}


def test_balanced_split_and_shard_flag(folder, micro_ckpt, tmp_path, capsys):
    """Every index in exactly one part, totals within the largest item; --shard I/N parts cover the
    folder once between them, side by side in one folder; a bad --shard is one line, exit 2."""
    sizes = list(np.random.default_rng(0).integers(1, 1000, 101))
    for n in (1, 3, 7):
        parts = extract.balanced_split(sizes, n)
        assert sorted(i for p in parts for i in p) == list(range(101))
        totals = [sum(sizes[i] for i in p) for p in parts]
        assert max(totals) - min(totals) <= max(sizes)
        assert parts == extract.balanced_split(sizes, n)  # deterministic
    out = tmp_path / "o"
    base = [str(folder), "-o", str(out), "--ckpt", str(micro_ckpt), "--layers", "2"]
    got = []
    for i in range(3):
        assert extract.main(base + ["--shard", f"{i}/3"]) == 0
        got.append(int(re.search(r"(\d+) written, 0 already there", capsys.readouterr().err)[1]))
    assert sum(got) == 8 and min(got) >= 1 and len(npys(out)) == 8
    assert extract.main(base) == 0 and "0 written, 8 already there" in capsys.readouterr().err
    for bad in ("3/3", "x", "1/0"):
        assert extract.main(base + ["--shard", bad]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "--shard" in err, err


def test_worker_decoding_equals_in_process_and_a_crashing_decoder_is_named(folder, monkeypatch):
    files = audio.find_audio([folder])
    ds = extract.DecodeSet(files, 24000, 400, False)
    order = list(range(len(files)))
    alone = {k: x for k, x, msg, _ in extract.decoded(ds, order, 0)}
    got = {k: x for k, x, msg, _ in extract.decoded(ds, order, 2)}
    assert sorted(got) == order
    for k in order:  # bit for bit: BLAS runs on one thread in both
        assert got[k].dtype == torch.float32 and torch.equal(got[k], alone[k]), files[k]
    real_load = audio.load

    def load(path, sr):  # a decoder that takes its process down on one file (a libsndfile crash)
        if Path(path).name == "3.flac":
            faulthandler.disable()  # pytest's dump of the crash is noise here
            os.kill(os.getpid(), signal.SIGSEGV)
        return real_load(path, sr)
    monkeypatch.setattr(audio, "load", load)  # forked workers inherit it
    items = list(extract.decoded(ds, order, 2))
    assert sorted(k for k, *_ in items) == order
    bad = [(k, msg) for k, x, msg, _ in items if x is None]
    assert len(bad) == 1 and files[bad[0][0]].name == "3.flac" and "crashed" in bad[0][1] and "SIGSEGV" in bad[0][1]
    for k, x, _, _ in items:
        if x is not None:
            assert torch.equal(x, alone[k])


README_READER = re.compile(r"```python\n(# read --out_format shards.*?)```", re.S)


def test_shards_round_trip_through_the_readme_reader(folder, micro_ckpt, tmp_path, capsys, monkeypatch):
    """Shards hold each input's array as the .npy format does, read back by README's reader; a rerun skips,
    a changed input is recomputed and listed once, other settings are refused; small shards roll over."""
    ns = {}
    exec(README_READER.search((ROOT / "README.md").read_text())[1], ns)
    src = tmp_path / "in"
    src.mkdir()
    for f in audio.find_audio([folder]):
        (src / f.name).write_bytes(f.read_bytes())
    base = [str(src), "--ckpt", str(micro_ckpt), "--layers", "1-2"]
    assert extract.main(base + ["-o", str(tmp_path / "npy")]) == 0
    ref = {p.stem: np.load(p) for p in (tmp_path / "npy").glob("*.npy")}
    monkeypatch.setattr(extract, "SHARD_BYTES", 3 * max(a.nbytes for a in ref.values()))
    out = tmp_path / "sh"
    sh = base + ["-o", str(out), "--out_format", "shards", "--batch", "3", "--workers", "1"]
    assert extract.main(sh) == 0

    def read():
        got = {}
        for path, arr in ns["read_features"](str(out)):
            assert path not in got
            got[path] = np.array(arr)
        return got
    got = read()
    assert sorted(got) == sorted(str(p) for p in src.iterdir()) and len(list(out.glob("feats-*.bin"))) >= 2
    for path, arr in got.items():
        assert arr.shape == ref[Path(path).stem].shape and np.abs(arr - ref[Path(path).stem]).max() < 1e-4
    capsys.readouterr()
    assert extract.main(sh) == 0 and "0 written, 8 already there" in capsys.readouterr().err
    sf.write(src / "2.wav", music(30000, seed=9), 24000)
    assert extract.main(sh) == 0 and "1 written, 7 already there" in capsys.readouterr().err
    got2 = read()
    assert sorted(got2) == sorted(got) and got2[str(src / "2.wav")].shape[1] == (30000 - 400) // 320 + 1
    assert extract.main(sh + ["--pool", "mean"]) == 2 and "pool" in capsys.readouterr().err
    assert extract.main(sh + ["--pool", "mean", "--overwrite"]) == 0
    assert all(a.shape == (2, 32) for a in read().values()) and len(read()) == 8
    assert not list(out.glob("*.tmp"))


def test_lock_and_read_only_folder_are_one_line_before_any_work(folder, micro_ckpt, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    base = [str(folder), "--ckpt", str(micro_ckpt)]
    with open(out / ".extract.lock", "a+") as f:  # another run holds the folder
        f.write("pid 1 on elsewhere")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX)
        assert extract.main(base + ["-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "another extract.py is writing there (pid 1" in err, err
        assert extract.main(base + ["-o", str(out), "--shard", "0/2"]) == 2  # a part waits for a whole run too
        capsys.readouterr()
    assert not list(out.rglob("*.npy"))
    if os.geteuid() == 0:  # root writes into a chmod-ed folder; /sys refuses even root
        ro = Path("/sys")
        if not ro.is_dir():
            pytest.skip("running as root without /sys")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
    assert extract.main(base + ["-o", str(ro)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{ro}: cannot write there" in err, err


def test_ctrl_c_during_startup_and_mid_folder(micro_ckpt, tmp_path):
    """SIGINT while torch imports, and again after the first output: one line, exit 130, no C++ abort,
    only complete outputs (each with its record), no temporary file."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        sf.write(src / f"{i}.wav", music(24000 * 12, seed=i), 24000, subtype="FLOAT")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for when in ("startup", "first output"):
        out = tmp_path / when.replace(" ", "_")
        p = subprocess.Popen([sys.executable, str(ROOT / "extract.py"), str(src), "-o", str(out), "--ckpt",
                              str(micro_ckpt), "--chunk", "10", "--overlap", "2", "--workers", "1"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if when == "startup":
            time.sleep(0.4)
        else:
            deadline = time.time() + 120
            while not list(out.glob("*.npy")) and p.poll() is None and time.time() < deadline:
                time.sleep(0.005)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 130, (when, p.returncode, err)
        assert err.strip().splitlines() == ["extract.py: interrupted; every output written is complete, and a "
                                            "rerun finishes the rest"], (when, err)
        done = sorted(out.glob("*.npy")) if out.exists() else []
        assert len(done) < 6, when
        for f in done:
            assert np.load(f).shape == (3, (24000 * 12 - 400) // 320 + 1, 32) and (out / (f.name + ".json")).exists()
        assert not [q for q in (out.iterdir() if out.exists() else []) if q.suffix == ".tmp"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
def test_torchrun_with_a_killed_rank_then_rerun_equals_one_process_byte_for_byte(micro_ckpt, tmp_path, capsys):
    """torchrun, 2 gloo ranks, --batch 1: one rank SIGKILLed mid-folder; the same command again completes
    the folder, each input once, every .npy byte-identical to a one-process run."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(10):
        sf.write(src / f"{i:02d}.wav", music(24000 * (4 + i % 5), seed=i), 24000, subtype="FLOAT")
    args = ["--ckpt", str(micro_ckpt), "--chunk", "3", "--overlap", "1"]
    assert extract.main([str(src), "-o", str(tmp_path / "ref")] + args) == 0
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "extract.py"), str(src), "-o", str(out)] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not list(out.glob("*.npy")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    ranks = children(p.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGKILL)
    log, _ = p.communicate(timeout=240)
    assert p.returncode != 0
    first = len(list(out.glob("*.npy")))
    assert 1 <= first < 10, log[-3000:]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = [line for line in p.stderr.splitlines() if " written, " in line]
    assert len(summary) == 1 and f"{10 - first} written, {first} already there, 0 failed" in summary[0], p.stderr
    assert "2 processes" in summary[0]
    assert npys(out) == npys(tmp_path / "ref")
    assert sorted(q.name for q in out.iterdir()) == sorted(q.name for q in (tmp_path / "ref").iterdir())
