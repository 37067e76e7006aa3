"""train.py end to end on CPU: loss falls, exact resume, DDP equals one process, multi-node, bad input;
usage errors in one line (exit 2, no run folder left); Ctrl-C (finish the step, checkpoint, exit 130; a second
stops at once)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import checkpoints
import train
from conftest import one_line, sine

ROOT = Path(__file__).resolve().parents[1]
MICRO = ["--size", "tiny", "--dim", "32", "--n_layers", "2", "--n_heads", "2", "--ffn_dim", "64",
         "--conv_dim", "16,16,16,16,16,16,16", "--pos_conv_groups", "4", "--final_dim", "8",
         "--crop_seconds", "1.0", "--teachers", "randproj+cqt", "--num_workers", "0", "--warmup_steps", "5",
         "--lr", "2e-3", "--eval_interval", "1000", "--ckpt_interval", "1000"]


@pytest.fixture(scope="module")
def music(tmp_path_factory):
    """Six synthetic 4-second tracks, a corrupt file and a 2-second file (skipped: under 3 s)."""
    d = tmp_path_factory.mktemp("music")
    rng = np.random.default_rng(0)
    t = np.arange(4 * 24000) / 24000
    for i in range(6):
        f0 = 110 * 2 ** (rng.integers(0, 24) / 12)
        x = sum(0.2 / h * np.sin(2 * np.pi * f0 * h * t * (1 + 0.1 * (t > 2))) for h in range(1, 6))
        x = x * (0.5 + 0.5 * np.sign(np.sin(2 * np.pi * (1 + i) * t))) + 0.01 * rng.standard_normal(len(t))
        sf.write(d / f"track{i}.flac", x.astype(np.float32), 24000)
    (d / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt junk")
    sf.write(d / "short.wav", np.zeros(48000, np.float32), 24000)
    return d


def run(args):
    return train.main(args)


def states(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_loss_falls_and_bad_files_are_skipped(music, tmp_path, capfd):
    out = tmp_path / "run"
    run(MICRO + ["--data", str(music), "--out", str(out), "--max_steps", "50", "--batch_size", "4"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 50 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses
    err = capfd.readouterr().err
    assert "broken.wav" in err
    ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 50 and ck["config"]["n_codebooks"] == 8 and ck["config"]["cqt_bins"] == 336


def test_resume_is_exact(music, tmp_path, monkeypatch):
    base = MICRO + ["--data", str(music), "--max_steps", "6", "--batch_size", "2", "--ckpt_interval", "3"]
    run(base + ["--out", str(tmp_path / "a")])
    real_save = checkpoints.save

    def save_then_die(path, obj):
        real_save(path, obj)
        if isinstance(obj, dict) and obj.get("step") == 3:
            raise KeyboardInterrupt  # the run is killed right after its step-3 checkpoint

    monkeypatch.setattr(checkpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(base + ["--out", str(tmp_path / "b")])
    monkeypatch.setattr(checkpoints, "save", real_save)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 3
    run(base + ["--out", str(tmp_path / "b"), "--resume"])
    a, b = states(tmp_path / "a" / "ckpt.pt"), states(tmp_path / "b" / "ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_freeze_keep_ckpts_and_resume_check(music, tmp_path, capsys):
    base = MICRO + ["--data", str(music), "--max_steps", "3", "--batch_size", "2", "--ckpt_interval", "2",
                    "--cqt_log", "true", "--out", str(tmp_path / "f")]
    run(base + ["--freeze", "encoder.pos_conv_embed, feature_extractor.conv_layers.0", "--keep_ckpts", "true"])
    ck = torch.load(tmp_path / "f" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ck["train_config"]["cqt_log"] is True
    kept = {int(p.stem.split("_")[1]): p for p in (tmp_path / "f").glob("ckpt_*.pt")}   # --keep_ckpts: steps 2 and 3
    assert sorted(kept) == [2, 3] and torch.load(kept[2], weights_only=True)["step"] == 2
    assert all(torch.equal(v, torch.load(kept[3], weights_only=True)["model"][k]) for k, v in ck["model"].items())
    torch.manual_seed(ck["train_config"]["seed"])
    init = train.MERT(train.MERTConfig.from_dict(ck["config"])).state_dict()
    frozen = [k for k in init if k.startswith(("encoder.pos_conv_embed.", "feature_extractor.conv_layers.0."))]
    assert len(frozen) >= 4 and all(torch.equal(ck["model"][k], init[k]) for k in frozen)
    assert not torch.equal(ck["model"]["feature_projection.projection.weight"],
                           init["feature_projection.projection.weight"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # resuming must not silently unfreeze (or freeze other parameters)
        run(base + ["--resume", "--max_steps", "4", "--freeze", "encoder.pos_conv_embed"])
    assert e.value.code == 2 and "cannot change --freeze" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="matches no parameter"):
        run(base[:-1] + [str(tmp_path / "g"), "--freeze", "encoder.pos_conv"])


def test_n_q_sets_the_code_streams_predicted(music, tmp_path):
    out = tmp_path / "q"
    run(MICRO + ["--data", str(music), "--out", str(out), "--max_steps", "2", "--batch_size", "2", "--n_q", "3"])
    ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ck["train_config"]["n_q"] == 3 and ck["config"]["n_codebooks"] == 3
    assert ck["model"]["label_embs"].shape[:2] == (3, 1024)  # one label table per predicted codebook
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)


def test_freeze_overlapping_prefixes_and_keep_copy(tmp_path, monkeypatch):
    m = train.MERT(train.MERTConfig.from_preset("tiny", n_codebooks=0, cqt_bins=0))
    frozen = train.freeze_parameters(m, "encoder.pos_conv_embed,encoder")
    assert len(frozen) == len(set(frozen)) == sum(n.startswith("encoder.") for n, _ in m.named_parameters())
    src = tmp_path / "ckpt.pt"
    src.write_bytes(b"one")
    checkpoints.keep_copy(src, tmp_path / "ckpt_1.pt")
    def no_links(*a):
        raise OSError("no hard links here")
    monkeypatch.setattr(checkpoints.os, "link", no_links)
    checkpoints.keep_copy(src, tmp_path / "ckpt_2.pt")  # falls back to a copy
    checkpoints.save(src, {"x": 1})  # replacing ckpt.pt must leave the kept files as they were
    assert (tmp_path / "ckpt_1.pt").read_bytes() == (tmp_path / "ckpt_2.pt").read_bytes() == b"one"
    assert not list(tmp_path.glob("*.tmp"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_ARGS = ["--max_steps", "3", "--noise_prob", "0", "--dropout", "0", "--attn_dropout", "0", "--seed", "5"]


def _launch(extra, out, nproc=None, node=None, port=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if nproc is None:
        cmd = [sys.executable, str(ROOT / "train.py")]
    elif node is None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=mert-test", str(ROOT / "train.py")]
    return subprocess.Popen(cmd + MICRO + DDP_ARGS + extra + ["--out", str(out)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(p):
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]


def test_ddp_two_processes_equal_one_and_two_nodes(music, tmp_path):
    """2 gloo processes with 2 clips each == 1 process accumulating 2 micro-batches of 2; two torchrun 'nodes' too.

    Masks are drawn per device's micro-batch (fairseq's require_same_masks acts on what one GPU's model
    sees), so 2 x 2 clips are not one batch of 4: one process equals N when it reads, masks and weights
    the same micro-batches, which gradient accumulation does."""
    one = _launch(["--data", str(music), "--batch_size", "2", "--total_batch_size", "4"], tmp_path / "one")
    _wait(one)
    two = _launch(["--data", str(music), "--batch_size", "2"], tmp_path / "two", nproc=2)
    _wait(two)
    port = _free_port()
    nodes = [_launch(["--data", str(music), "--batch_size", "2"], tmp_path / "nodes", nproc=1, node=n, port=port)
             for n in (0, 1)]
    for p in nodes:
        _wait(p)
    ref = states(tmp_path / "one" / "ckpt.pt")
    for other in ("two", "nodes"):
        got = states(tmp_path / other / "ckpt.pt")
        err = max((got[k] - ref[k]).abs().max().item() for k in ref)
        assert err <= 1e-5, (other, err)


def test_non_finite_losses_stop_the_run(music, tmp_path, monkeypatch, capsys):
    real = train.MERT.forward

    def nan_forward(self, *a, **k):
        x, loss, parts = real(self, *a, **k)
        return x, loss * float("nan"), parts

    monkeypatch.setattr(train.MERT, "forward", nan_forward)
    with pytest.raises(SystemExit) as e:
        run(MICRO + ["--data", str(music), "--out", str(tmp_path / "nan"), "--max_steps", "10",
                     "--batch_size", "2", "--max_bad_steps", "2"])
    assert e.value.code == 3
    out = capsys.readouterr().out
    assert "step skipped" in out and "2 non-finite steps in a row" in out


def test_help_shows_the_real_defaults_per_preset(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "(default: None)" not in text
    text = text.split("options:", 1)[1]
    for name in ("batch_size", "warmup_steps", "ckpt_interval", "lr"):
        values = {size: train.TRAIN_PRESETS[size].get(name, getattr(train.TrainConfig, name)) for size in train.PRESETS}
        shown = [f"{v}" for v in values.values()] if len(set(values.values())) == 1 else \
            [f"{size} {v}" for size, v in values.items()]
        flag_help = text.split(f"--{name} ", 1)[1].split(" --", 1)[0]
        assert all(s in flag_help for s in shown), (name, flag_help)
    assert "(default: rvq+cqt)" in text and "--resume [{auto,true,false}]" in text and "exit" in text


def test_flag_aliases_and_list_separators(music, tmp_path):
    given = train.parse_given(["--data", "a,b", "c", "--max-steps", "5", "--n-layers=3", "--val-data", "v"])
    assert given["data"] == "a,b,c" and given["max_steps"] == 5 and given["n_layers"] == 3 and given["val_data"] == "v"
    out = tmp_path / "hy"
    files = [str(music / f"track{i}.flac") for i in range(3)]
    hyphens = [a.replace("_", "-") if a.startswith("--") else a for a in MICRO]
    assert run(hyphens + ["--data", f"{files[0]},{files[1]}", files[2], "--out", str(out), "--max-steps", "1",
                          "--batch-size", "2"]) == 0
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 1 and ck["data"]["n_files"] == 3 and ck["train_config"]["batch_size"] == 2
    assert ck["config"]["n_layers"] == 2 and ck["train_config"]["data"] == ",".join(files)


def test_bad_data_and_export_inputs_are_one_line_errors(music, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for data, problem in ((tmp_path / "missing", "no such file or folder"), (empty, "no usable audio")):
        with pytest.raises(SystemExit) as e:
            run(MICRO + ["--data", str(data), "--out", str(tmp_path / "r")])
        assert str(e.value).startswith(f"train.py: {data}: {problem}") and "\n" not in str(e.value)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    for path, problem, code in ((tmp_path / "gone.pt", "no such file", 2), (text, "", 1), (tmp_path / "other.pt", "", 1)):
        capsys.readouterr()  # a checkpoint that is not there is a usage error (2), one that is not a checkpoint 1
        assert train.main(["export", str(path), str(tmp_path / "enc.pt")]) == code
        err = capsys.readouterr().err
        assert err.startswith(f"train.py export: {path}: {problem}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "enc.pt").exists()


def test_logged_throughput_counts_the_audio_of_cut_batches(music, tmp_path):
    """Epoch batches are cut to their shortest clip: 5 s crops of 4 s files train on 4 s each, and the logged
    audio-s/s must say so (it once counted batch x crop seconds whatever the batch held)."""
    out = tmp_path / "run"
    run(MICRO + ["--data", str(music), "--out", str(out), "--max_steps", "2", "--batch_size", "2",
                 "--crop_seconds", "5"])
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for r in (r for r in recs if "audio_s_per_s" in r):
        assert r["audio_s_per_s"] * r["ms"] / 1000 == pytest.approx(2 * 4.0, rel=1e-6)


# ----------------------------------------------------------------------------- usage errors and Ctrl-C

# MICRO's model with the random-projection teacher only, 2-clip batches and 4 steps (the last two entries).
MICRO_RANDPROJ = ["--size", "tiny", "--dim", "32", "--n_layers", "2", "--n_heads", "2", "--ffn_dim", "64",
                  "--conv_dim", "16,16,16,16,16,16,16", "--pos_conv_groups", "4", "--final_dim", "8",
                  "--crop_seconds", "1.0", "--teachers", "randproj", "--num_workers", "0", "--warmup_steps", "5",
                  "--eval_interval", "1000", "--ckpt_interval", "1000", "--batch_size", "2", "--max_steps", "4"]


@pytest.fixture(scope="module")
def tracks(tmp_path_factory):
    """Three 3.5-second sines of different pitch."""
    d = tmp_path_factory.mktemp("tracks")
    for i in range(3):
        sf.write(d / f"t{i}.wav", sine(3.5, f=150 + 60 * i, seed=i), 24000)
    return d


@pytest.mark.usefixtures("one_thread")  # these stand last: one_thread holds from here to the module's end
def test_train_usage_errors_exit_2_in_one_line_and_leave_no_run_folder(tracks, tmp_path, capsys):
    """Why: --size 95M, a missing --data, --init nope.pt exited 1; --device cuda on CPU torch and an --out that
    cannot be written gave tracebacks. Now: one line, exit 2, and no run folder left by a failed start."""
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
            train.main(MICRO_RANDPROJ[:-2] + argv)
        assert e.value.code == 2, (argv, e.value.code)
        assert named in one_line(capsys.readouterr().err), argv
        assert not (tmp_path / "run").exists(), argv  # --init nope.pt got as far as making the folder before


@pytest.mark.usefixtures("one_thread")
def test_train_ctrl_c_finishes_the_step_checkpoints_and_exits_130(tracks, tmp_path, monkeypatch, capsys):
    """Why: Ctrl-C printed a KeyboardInterrupt traceback from inside Adam and wrote no checkpoint.
    Now it is SIGTERM's stop (the step finishes, a checkpoint, one line) with exit 130; the run continues."""
    out = tmp_path / "run"
    args = MICRO_RANDPROJ + ["--data", str(tracks), "--out", str(out)]
    real_forward, calls = train.MERT.forward, []
    # a terminal's Ctrl-C handler, however pytest was started (a background job inherits SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)

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
    signal.signal(signal.SIGINT, inherited)


@pytest.mark.usefixtures("one_thread")
def test_train_second_ctrl_c_stops_at_once_in_one_line(tracks, tmp_path):
    """Why: Ctrl-C in train.py gave a traceback. A second Ctrl-C (a real process, real signals) stops at once:
    one line naming what is kept, exit 130, no traceback."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py")] + MICRO_RANDPROJ[:-1] + ["1000", "--data", str(tracks), "--out", str(out)]
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
