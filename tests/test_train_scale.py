"""train.py at scale, on CPU: the teacher flags (95m/330m refuse to train without EnCodec's codes, teacher mistakes
are one-line usage errors), the 95M yaml's global batch, --dtype really sets autocast (float16 with a loss
scaler through gradient accumulation), float32 loss heads, the DDP settings."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mert
import rvq
import train
from test_train import MICRO, music  # noqa: F401  (music: the module's fixture of synthetic tracks)

ROOT = Path(__file__).resolve().parents[1]
REFUSAL = "trains on EnCodec 24 kHz's codes: pass --acoustic_ckpt encodec_24khz-d7cc33bc.th"


@pytest.fixture(scope="module")
def rvq_ckpt(tmp_path_factory):
    """A small rvq.py checkpoint of EnCodec 24 kHz's architecture (random weights)."""
    path = tmp_path_factory.mktemp("rvq") / "rvq.pt"
    cfg = dataclasses.replace(rvq.PRESETS["encodec24k"], n_filters=4, n_q=8, bins=64, kmeans_iters=1)
    rvq.save_atomic({"config": dataclasses.asdict(cfg), "model": rvq.RVQVAE(cfg).state_dict()}, path)
    return path


def _refused(argv, capsys) -> str:
    """train.main(argv) must exit 2 with exactly one line on stderr; returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, (argv, e.value.code, err)
    return err.strip()


def test_95m_and_330m_refuse_to_train_without_the_acoustic_teacher(tmp_path, rvq_ckpt, capsys, monkeypatch):
    # the command as a user types it: one line, exit 2, and no run folder left behind
    out = tmp_path / "run330"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--size", "330m", "--data", str(tmp_path), "--out",
                        str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"train.py: --size 330m {REFUSAL}") and "--teachers randproj+cqt" in r.stderr
    assert not out.exists()
    # --print_config refuses with the same line; otherwise it names the teachers and their checkpoints
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _refused(["--size", "95m", "--print_config"], capsys).startswith(f"train.py: --size 95m {REFUSAL}")
    assert train.main(["--size", "95m", "--print_config", "--teachers", "randproj+cqt"]) == 0
    assert json.loads(capsys.readouterr().out)["teachers"] == {"randproj": None, "cqt": None}
    assert train.main(["--size", "330m", "--print_config", "--acoustic_ckpt", str(rvq_ckpt)]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["teachers"] == {"rvq": str(rvq_ckpt), "cqt": None} and c["teacher_context_seconds"][0] >= 10
    assert c["model"]["codebook_size"] == 64  # the checkpoint's codebooks size the heads


def test_teacher_flag_mistakes_are_one_line_usage_errors(tmp_path, rvq_ckpt, capsys):
    """Each was a traceback (issue 27); each is refused under --print_config and in a run alike."""
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    cases = [(["--teachers", "foo"], "--teachers foo: unknown teacher 'foo'; choose from rvq, randproj, mfcc, cqt"),
             (["--teachers", "mfcc+cqt"], "--teachers mfcc needs --mfcc_ckpt"),
             (["--acoustic_ckpt", str(tmp_path / "gone.th")], f"--acoustic_ckpt {tmp_path / 'gone.th'}: no such file"),
             (["--acoustic_ckpt", str(text)], f"--acoustic_ckpt {text}: not a PyTorch checkpoint (a text file"),
             (["--acoustic_ckpt", str(other)], f"--acoustic_ckpt {other}: not a usable checkpoint"),
             (["--teachers", "mfcc+cqt", "--mfcc_ckpt", str(rvq_ckpt)], f"--mfcc_ckpt {rvq_ckpt}: not a usable"),
             (["--acoustic_ckpt", str(rvq_ckpt), "--n_q", "9"], "(--n_q 9): n_q must be in 1..8")]
    for i, (args, expected) in enumerate(cases):
        assert expected in _refused(["--print_config"] + args, capsys), args
        out = tmp_path / f"run{i}"
        run = MICRO + ["--data", str(tmp_path), "--out", str(out), "--teachers", "rvq+cqt"] + args
        assert expected in _refused(run, capsys), args
        if i < 4:  # refused before the run plan; the last three when the teachers are built after it
            assert not out.exists()


def test_95m_preset_is_the_yamls_global_batch(capsys, monkeypatch):
    """MERT_RVQ-VAE_CQT_95M.yaml: max_tokens 2,000,000 of 5 s clips = 16 per GPU, 64 GPUs: 1,024 clips an update;
    run_training.sh's 8-GPU demo (64 clips) is --total_batch_size 64 --batch_size 8."""
    flags = ["--size", "95m", "--print_config", "--teachers", "randproj+cqt"]
    for world, accum in (("64", 1), ("8", 8), ("1", 64)):
        monkeypatch.setenv("WORLD_SIZE", world)
        assert train.main(flags) == 0
        c = json.loads(capsys.readouterr().out)
        assert (c["micro_batch"], c["accumulation"], c["global_batch"]["clips"]) == (16, accum, 1024)
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert train.main(flags + ["--total_batch_size", "64", "--batch_size", "8"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert (c["micro_batch"], c["accumulation"], c["global_batch"]["clips"]) == (8, 1, 64)


def _run(music, tmp_path, dtype, steps, monkeypatch, inf_at_backward=None):  # noqa: F811
    """A MICRO run of `steps` steps, 2 micro-batches of 2 clips a step; returns (log records, Attention output
    dtypes seen, checkpoint). inf_at_backward k: the k-th backward (1-based) gives a parameter an inf gradient."""
    seen, calls, real = set(), [0], train.build_model

    def build_model(*a, **k):
        model, opt, frozen = real(*a, **k)
        for m in model.modules():
            if isinstance(m, mert.Attention):
                m.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))

        def poison(g):
            calls[0] += 1
            return g * float("inf") if calls[0] == inf_at_backward else g
        next(model.parameters()).register_hook(poison)
        return model, opt, frozen

    monkeypatch.setattr(train, "build_model", build_model)
    out = tmp_path / dtype
    assert train.main(MICRO + ["--data", str(music), "--out", str(out), "--max_steps", str(steps), "--batch_size", "2",
                               "--total_batch_size", "4", "--dtype", dtype]) == 0
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r], seen, torch.load(out / "ckpt.pt", weights_only=True)


def test_dtype_sets_autocast_and_float16_scales_the_loss(music, tmp_path, monkeypatch, capsys):  # noqa: F811
    """--dtype float16 and bf16 once ran float32 in silence. Now each value sets autocast's dtype; float16 runs with
    a loss scaler through gradient accumulation (unscaled before clipping, an overflow skips the step and halves
    the scale), and its gradient equals bfloat16's to half precision. (float32, auto's choice on CPU, is what
    every other train.py test runs.)"""
    bf, seen_bf, _ = _run(music, tmp_path, "bfloat16", 1, monkeypatch)
    assert seen_bf == {torch.bfloat16}
    fp, seen_fp, ck = _run(music, tmp_path, "float16", 2, monkeypatch, inf_at_backward=3)  # step 1's first micro
    assert seen_fp == {torch.float16}
    out = capsys.readouterr().out
    assert "precision float16 autocast with loss scaling (initial scale 128" in out
    assert "step 1: float16 gradient overflow; step skipped, loss scale 128 -> 64" in out
    # the same first step as bfloat16's (no scaler): the scale of 128 was taken out before the norm was taken
    assert fp[0]["grad_norm"] == pytest.approx(bf[0]["grad_norm"], rel=0.02)
    assert fp[0]["loss"] == pytest.approx(bf[0]["loss"], rel=0.01)
    assert not torch.isfinite(torch.tensor(fp[1]["grad_norm"]))
    assert ck["scaler"]["scale"] == 64.0 and ck["step"] == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(["--dtype", "bf16", "--print_config"])
    assert e.value.code == 2 and "invalid choice: 'bf16'" in capsys.readouterr().err


def test_loss_heads_run_in_float32_under_autocast():
    """The code loss's cosine logits / 0.1 and cross-entropy, and the CQT head's MSE, in float32 under bf16
    autocast: equal to the float32 computation (bf16 logits erred by up to ~0.03)."""
    torch.manual_seed(0)
    cfg = mert.MERTConfig.from_preset("tiny", dim=64, n_layers=1, n_heads=2, ffn_dim=64, n_codebooks=8,
                                      codebook_size=1024, final_dim=16, cqt_bins=84)
    m = mert.MERT(cfg)
    x = torch.randn(1, 300, 64)
    sel = torch.ones(1, 300, dtype=torch.bool)
    targets = {"codes": torch.randint(0, 1024, (1, 8, 300)), "cqt": torch.rand(1, 300, 84)}
    ref_parts, parts = {}, {}
    ref = m._frame_losses(x, sel, targets, ref_parts, "")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m._frame_losses(x.bfloat16(), sel, targets, parts, "")
        ce = m.code_loss(x.bfloat16()[0], targets["codes"][0].t())
    assert got.dtype == torch.float32 and ce.dtype == torch.float32
    # the only bf16 rounding left is the input's own (x.bfloat16()), not the heads' or the logits'
    ref_b = m._frame_losses(x.bfloat16().float(), sel, targets, {}, "")
    assert got.item() == pytest.approx(ref_b.item(), rel=1e-6)
    assert parts["cqt"].item() == pytest.approx(ref_parts["cqt"].item(), rel=1e-2)


def test_ddp_settings(music, tmp_path, monkeypatch):  # noqa: F811
    """Under torchrun (here a world of one, gloo): --dist_timeout reaches init_process_group; DDP gets
    gradient_as_bucket_view, and static_graph only where layerdrop is 0 and nothing accumulates (torch's static
    graph breaks on a backward without sync: pytorch/pytorch#143580)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    seen = []
    real_init, real_ddp = train.dist.init_process_group, train.DDP
    monkeypatch.setattr(train.dist, "init_process_group", lambda *a, **k: seen.append(k["timeout"]) or
                        real_init(*a, **k))
    monkeypatch.setattr(train, "DDP", lambda *a, **k: seen.append(k) or real_ddp(*a, **k))
    for total, static in ((2, True), (4, False)):
        assert train.main(MICRO + ["--data", str(music), "--out", str(tmp_path / str(total)), "--max_steps", "1",
                                   "--batch_size", "2", "--total_batch_size", str(total), "--dist_timeout", "45"]) == 0
        timeout, kw = seen[-2:]
        assert timeout.total_seconds() == 45 * 60
        assert kw["gradient_as_bucket_view"] and kw["static_graph"] == static and not kw["find_unused_parameters"]
    assert train.TrainConfig.dist_timeout >= 30  # the default: a 330m checkpoint on a slow shared file system
    with pytest.raises(SystemExit) as e:
        train.configs_from({"dist_timeout": 0.0}, require_data=False)
    assert e.value.code == 2
