"""Faults a long train.py run must survive: restarts resume by themselves (torchrun --max-restarts, a
requeued job), SIGTERM stops at the step with a checkpoint, damaged checkpoints fall back to an older
one, a full disk keeps the previous checkpoint, data that goes bad mid-run is named and skipped. Each
case ends in the weights of an uninterrupted run, bit for bit."""
import json
import os
import shutil
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
import checkpoints
import train
from test_train import MICRO, ROOT

# the micro model, 8 steps of 2 clips, a checkpoint every 2 steps (the default keeps the newest 2)
BASE = MICRO + ["--max_steps", "8", "--batch_size", "2", "--ckpt_interval", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tracks(tmp_path_factory):
    """Six readable 4-second tracks (no bad files: these tests break files themselves)."""
    d = tmp_path_factory.mktemp("tracks")
    rng = np.random.default_rng(1)
    t = np.arange(4 * 24000) / 24000
    for i in range(6):
        f0 = 110 * 2 ** (rng.integers(0, 24) / 12)
        x = sum(0.2 / h * np.sin(2 * np.pi * f0 * h * t) for h in range(1, 6)) + 0.01 * rng.standard_normal(len(t))
        sf.write(d / f"track{i}.flac", x.astype(np.float32), 24000)
    return d


def run(args):
    return train.main(args)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"differ: {bad[:5]}"


def train_steps(out):
    steps = [r["step"] for r in checkpoints.read_log(Path(out) / "log.jsonl") if "loss" in r]
    return steps


@pytest.fixture(scope="module")
def reference(tracks, tmp_path_factory):
    """An uninterrupted in-process run of BASE."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert run(BASE + ["--data", str(tracks), "--out", str(out)]) == 0
    return out


def die_after_checkpoint(monkeypatch, step, also=None):
    """Make the run stop dead (KeyboardInterrupt, as a kill) right after writing its step-`step` checkpoint;
    also(step) runs after every checkpoint."""
    real = checkpoints.write_checkpoint

    def write(out, obj, keep):
        path = real(out, obj, keep)
        if also is not None:
            also(obj["step"])
        if obj["step"] == step:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoints, "write_checkpoint", write)


# -- restarts: the same command continues; nothing is overwritten without an explicit flag


def test_rerun_resumes_and_the_log_holds_each_step_once(tracks, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = BASE + ["--data", str(tracks), "--out", str(out)]
    real_forward, calls = train.MERT.forward, []

    def crash_in_step_5(self, *a, **k):  # the process dies in step 5: steps 4 and 5 are replayed
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_forward(self, *a, **k)

    monkeypatch.setattr(train.MERT, "forward", crash_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(args)
    monkeypatch.setattr(train.MERT, "forward", real_forward)
    assert train_steps(out) == [0, 1, 2, 3, 4]
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a torn last line, as a kill mid-write leaves
    capsys.readouterr()
    assert run(args) == 0  # the same command, no --resume: it continues at step 4
    stdout = capsys.readouterr().out
    assert "resuming" in stdout and "at step 4" in stdout and f"final checkpoint {out / 'ckpt.pt'}" in stdout
    assert train_steps(out) == list(range(8))
    events = [r for r in checkpoints.read_log(out / "log.jsonl") if "event" in r]
    assert [e["event"] for e in events] == ["start", "resume"] and events[1]["step"] == 4
    assert_same_weights(out / "ckpt.pt", reference / "ckpt.pt")
    assert sorted(p.name for p in out.glob("ckpt*")) == ["ckpt.pt", "ckpt_6.pt", "ckpt_8.pt"]  # keep 2

    # a finished run: the same command again does nothing and says so
    assert run(args) == 0 and "nothing to do" in capsys.readouterr().out
    # --resume false never overwrites a run; the checkpoint is untouched
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        run(args + ["--resume", "false"])
    assert e.value.code == 2 and "already holds a run" in capsys.readouterr().err
    assert (out / "ckpt.pt").read_bytes() == before
    # --resume true (or bare --resume) on a folder without a run is an error, not a fresh start
    with pytest.raises(SystemExit) as e:
        run(BASE + ["--data", str(tracks), "--out", str(tmp_path / "empty"), "--resume"])
    assert e.value.code == 2 and "holds no checkpoint" in capsys.readouterr().err


def test_a_log_without_checkpoint(tracks, tmp_path, capsys):
    """The run's own log (it died before its first checkpoint) starts over; another run's log is refused."""
    src = tmp_path / "src"
    assert run(BASE + ["--data", str(tracks), "--out", str(src), "--max_steps", "1"]) == 0
    own = tmp_path / "own"
    own.mkdir()
    shutil.copy(src / "log.jsonl", own / "log.jsonl")
    capsys.readouterr()
    assert run(BASE + ["--data", str(tracks), "--out", str(own), "--max_steps", "1"]) == 0
    assert "stopped before its first checkpoint" in capsys.readouterr().out and train_steps(own) == [0]
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(src / "log.jsonl", other / "log.jsonl")
    with pytest.raises(SystemExit) as e:
        run(BASE + ["--data", str(tracks), "--out", str(other), "--n_layers", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "another run's log (--n_layers 2 -> 3)" in err and len(err.splitlines()) == 1
    (other / "log.jsonl").write_text('{"step": 0, "loss": 3.0}\n')  # a log without a start record
    with pytest.raises(SystemExit) as e:
        run(BASE + ["--data", str(tracks), "--out", str(other)])
    assert e.value.code == 2 and "another run's log" in capsys.readouterr().err
    assert not list(other.glob("ckpt*"))


def test_resume_applies_schedule_flags_and_refuses_fixed_ones(tracks, tmp_path, capsys):
    out = tmp_path / "run"
    args = BASE + ["--data", str(tracks), "--out", str(out)]
    assert run(args + ["--max_steps", "2"]) == 0
    for flag, value, shown in (("--n_layers", "6", "--n_layers 2 -> 6"), ("--seed", "1", "--seed 1337 -> 1"),
                               ("--batch_size", "4", "--batch_size 2 -> 4")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run(args + ["--max_steps", "3", flag, value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"cannot change {shown}" in err and len(err.splitlines()) == 1
    # without flags a resume keeps the run's own settings (not the preset's); given ones are applied
    assert run(MICRO + ["--data", str(tracks), "--out", str(out), "--max_steps", "3", "--lr", "1e-3",
                        "--weight_decay", "0.05"]) == 0
    stdout = capsys.readouterr().out
    assert "applying --max_steps 2 -> 3, --lr 0.002 -> 0.001, --weight_decay 0.01 -> 0.05" in stdout
    config = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("train config: "))[14:])
    assert config["lr"] == 1e-3 and config["ckpt_interval"] == 1000  # printed as applied
    assert config["batch_size"] == 2  # not given: the run's 2, not the preset's 8
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 3 and ck["train_config"]["lr"] == 1e-3
    assert {g["weight_decay"] for g in ck["optimizer"]["param_groups"]} == {0.05}  # MERT: every parameter decays


# -- pre-emption


def test_sigterm_writes_a_checkpoint_at_the_step_and_exits_75(tracks, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = BASE + ["--data", str(tracks), "--out", str(out)]
    real_forward, calls = train.MERT.forward, []

    def sigterm_in_step_4(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # as Slurm or Kubernetes would
        return real_forward(self, *a, **k)

    monkeypatch.setattr(train.MERT, "forward", sigterm_in_step_4)
    with pytest.raises(SystemExit) as e:
        run(args)
    assert e.value.code == train.EXIT_PREEMPTED == 75
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 5  # step 4 finished, not interval 4
    assert "stopped by SIGTERM at step 5" in capsys.readouterr().out
    monkeypatch.setattr(train.MERT, "forward", real_forward)
    assert run(args) == 0
    assert_same_weights(out / "ckpt.pt", reference / "ckpt.pt")
    assert train_steps(out) == list(range(8))


# -- checkpoint integrity


def test_damaged_checkpoints_fall_back_to_the_newest_valid_one(tracks, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = BASE + ["--data", str(tracks), "--out", str(out)]
    die_after_checkpoint(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        run(args)
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("ckpt*")) == ["ckpt.pt", "ckpt_4.pt", "ckpt_6.pt"]
    # flip one byte inside ckpt.pt's weights (ckpt_6.pt is the same file: a hard link), and put another
    # run's step-8 checkpoint beside them
    data = bytearray((out / "ckpt.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(out / "ckpt.pt", "r+b") as f:
        f.write(data)
    shutil.copy(reference / "ckpt.pt", out / "ckpt_8.pt")
    capsys.readouterr()
    assert run(args) == 0
    stdout = capsys.readouterr().out
    assert "ckpt.pt: corrupt checkpoint (CRC mismatch" in stdout
    assert "ckpt_8.pt: written by another run" in stdout and "resuming" in stdout and "at step 4" in stdout
    assert {"ckpt.pt.bad", "ckpt_6.pt.bad", "ckpt_8.pt.bad"} <= {p.name for p in out.iterdir()}
    assert_same_weights(out / "ckpt.pt", reference / "ckpt.pt")

    # nothing valid left: a clear error, and nothing started over or removed
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ckpt.pt").write_bytes((reference / "ckpt.pt").read_bytes()[:5000])  # truncated
    shutil.copy(reference / "log.jsonl", bad / "log.jsonl")
    with pytest.raises(SystemExit) as e:
        run(BASE + ["--data", str(tracks), "--out", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "no valid checkpoint" in err and "ckpt.pt: truncated or damaged" in err
    assert sorted(p.name for p in bad.iterdir()) == ["ckpt.pt", "log.jsonl"]
    assert (bad / "log.jsonl").read_bytes() == (reference / "log.jsonl").read_bytes()


def test_full_disk_keeps_the_previous_checkpoint(tracks, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = BASE + ["--data", str(tracks), "--out", str(out)]
    real_save = torch.save

    def disk_full_from_step_4(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step", 0) >= 4:
            f.write(b"PK\x03\x04" + bytes(1000))  # part of the file, then the disk is full
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full_from_step_4)
    assert run(args) == 1  # the final checkpoint is missing: not a success
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "step 4: could not write a checkpoint" in err and "No space left on device" in err
    assert "the newest one left is ckpt.pt" in err
    assert sorted(p.name for p in out.glob("ckpt*")) == ["ckpt.pt", "ckpt_2.pt"]  # no temp file left
    assert checkpoints.read_checkpoint(out / "ckpt.pt")["step"] == 2
    assert run(args) == 0  # disk space again: the same command continues from step 2
    assert_same_weights(out / "ckpt.pt", reference / "ckpt.pt")


# -- data that goes bad mid-run


def test_ctrl_c_inside_torch_save_is_an_interrupt_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Why: a second Ctrl-C that landed inside torch.save made its zip writer raise RuntimeError ("unexpected pos")
    over the KeyboardInterrupt: train.py died with two tracebacks and exit 1 instead of its one line and 130.
    checkpoints.save turns it back into the interrupt; no temp file stays and the previous file is untouched."""
    path = tmp_path / "ckpt.pt"
    checkpoints.save(path, {"step": 1})
    before = path.read_bytes()

    class CtrlCOnThirdWrite:  # a real file whose third write is interrupted, as a signal would interrupt it
        def __init__(self, *a):
            self.f, self.writes = open(*a), 0

        def write(self, b):
            self.writes += 1
            if self.writes == 3:
                raise KeyboardInterrupt
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(checkpoints, "open", CtrlCOnThirdWrite, raising=False)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(path, {"step": 2, "model": {"w": torch.randn(50_000)}})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


@pytest.mark.parametrize("kind", ["file", "shard"])
def test_data_gone_bad_mid_run_is_named_once_skipped_and_resumes_exactly(kind, tracks, tmp_path, monkeypatch,
                                                                         capfd):
    """A file deleted (or a prepared shard truncated) after step 2: named once, skipped; a run that dies
    at step 4 and resumes with the data still bad ends as the run that went straight through."""

    def data_copy(name):
        d = tmp_path / name
        if kind == "file":
            shutil.copytree(tracks, d)
        else:
            audio.prepare([tracks], d, shard_bytes=400_000, progress=False)  # two tracks per shard
        return d

    def damage(d):
        if kind == "file":
            # the file drawn most in steps 2-7 (samples 4-15): it must go missing while still in use
            ds = audio.CropDataset([d], crop_samples=24000, seed=1337)
            items = [ds.crop(i)[1] for i in range(4, 16)]
            victim = Path(ds.paths[ds.ref[max(set(items), key=items.count)]])
            victim.unlink()
        else:
            victim = d / "shard-00001.bin"
            with open(victim, "r+b") as f:
                f.truncate(victim.stat().st_size // 2)
        return victim

    victims = {}

    def runs(name, die_at=None):
        d = data_copy(name)
        out = tmp_path / f"out_{name}"

        def also(step):
            if step == 2:
                victims[name] = damage(d)

        if die_at:
            die_after_checkpoint(monkeypatch, die_at, also)
            with pytest.raises(KeyboardInterrupt):
                run(BASE + ["--data", str(d), "--out", str(out)])
            monkeypatch.undo()
            assert run(BASE + ["--data", str(d), "--out", str(out)]) == 0  # resumed with the data still bad
        else:
            monkeypatch.setattr(checkpoints, "write_checkpoint", _with_hook(checkpoints.write_checkpoint, also))
            assert run(BASE + ["--data", str(d), "--out", str(out)]) == 0
            monkeypatch.undo()
        return out

    straight = runs("a")
    err = capfd.readouterr().err
    assert sum(str(victims["a"]) in line for line in err.splitlines()) == 1, err  # named once
    resumed = runs("b", die_at=4)
    assert "they stay in the draw and are skipped when drawn" in capfd.readouterr().out
    assert_same_weights(resumed / "ckpt.pt", straight / "ckpt.pt")
    assert str(victims["b"]) in (resumed / "skipped_files.txt").read_text()


def _with_hook(real, also):
    def write(out, obj, keep):
        path = real(out, obj, keep)
        also(obj["step"])
        return path
    return write


# -- the real thing: torchrun, 2 gloo processes with loader workers, a worker killed, a SIGTERM


TORCHRUN_ARGS = BASE + ["--max_steps", "12", "--num_workers", "1", "--noise_prob", "0.5"]


def _torchrun(out, data, restarts=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", str(ROOT / "train.py")] + TORCHRUN_ARGS + ["--data", str(data),
                                                                                   "--out", str(out)]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, p: subprocess.Popen, timeout=240):
    t0 = time.time()
    while not path.exists():
        assert p.poll() is None, "the run ended before " + path.name
        assert time.time() - t0 < timeout
        time.sleep(0.005)


@pytest.fixture(scope="module")
def torchrun_reference(tracks, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun_ref") / "run"
    p = _torchrun(out, tracks)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log[-3000:]
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
def test_torchrun_restarts_after_a_worker_is_killed(tracks, torchrun_reference, tmp_path):
    """torchrun --max-restarts 1; SIGKILL one worker after the first checkpoint; torchrun reruns the same
    command, which resumes; the final weights equal the uninterrupted run's."""
    out = tmp_path / "run"
    p = _torchrun(out, tracks, restarts=1)
    _wait_for(out / "ckpt_2.pt", p)
    workers = [c for c in children(p.pid)]
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log[-3000:]
    events = [r for r in checkpoints.read_log(out / "log.jsonl") if "event" in r]
    assert [e["event"] for e in events] == ["start", "resume"], log[-3000:]  # restarted, and resumed
    assert 2 <= events[1]["step"] < 12
    assert train_steps(out) == list(range(12))
    assert_same_weights(out / "ckpt.pt", torchrun_reference / "ckpt.pt")


def test_torchrun_sigterm_stops_with_a_checkpoint_and_the_rerun_finishes(tracks, torchrun_reference, tmp_path):
    """SIGTERM to the launcher (what Kubernetes does; torchrun passes it to every worker's process group,
    loader workers included): every rank finishes its step, rank 0 writes a checkpoint at that step and
    they exit 75; the same command run again finishes with the uninterrupted run's weights."""
    out = tmp_path / "run"
    p = _torchrun(out, tracks)
    _wait_for(out / "ckpt_2.pt", p)
    p.send_signal(signal.SIGTERM)
    log, _ = p.communicate(timeout=300)
    assert p.returncode != 0
    assert "stopped by SIGTERM at step" in log, log[-3000:]
    assert "(exit 75)" in log
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert f"stopped by SIGTERM at step {step}; checkpoint" in log
    assert 2 < step < 12 and train_steps(out) == list(range(step))
    p = _torchrun(out, tracks)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and f"at step {step}" in log, log[-3000:]
    assert_same_weights(out / "ckpt.pt", torchrun_reference / "ckpt.pt")
