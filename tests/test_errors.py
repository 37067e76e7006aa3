"""Issue 27: every command, every mistake: one line on stderr, the right exit code, nothing lost or left behind;
Ctrl-C; probe.py's task decision; the Linear fast path under quantize_dynamic and bfloat16.

CLI cases run in-process through each command's main(argv) (capsys, exit codes, SystemExit) where one exists,
with a few real subprocesses for what only a process shows (signals, tracebacks). "Read-only" places are paths
under a regular file (`file.txt/sub`), which refuse writes for root too (the tests may run as root, which chmod
does not stop); a full disk is simulated by patching the writer in-process to raise ENOSPC."""
import errno
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
