"""Shared test helpers: reference packages are optional locally, never in CI; the micro checkpoint and a short
clip; the one-line check of a refusal's stderr; one torch thread per module."""
import importlib
import os
from pathlib import Path

import numpy as np
import pytest


def need(module: str):
    """Import a reference package, or skip with the reason (fail instead when CI=true)."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a package that breaks while importing
        msg = f"reference package {module!r} unavailable: {type(e).__name__}: {e}"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must install requirements-dev.txt)")
        pytest.skip(msg)


def one_line(err: str) -> str:
    """The stderr of a refusal: exactly one non-empty line, and no traceback."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def sine(seconds, sr=24000, f=220.0, seed=0):
    """A sine at `f` Hz with a little seeded noise, float32."""
    t = np.arange(int(seconds * sr)) / sr
    g = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * f * t) + 0.01 * g.standard_normal(len(t))).astype(np.float32)


def randomise_(m):
    """Make every parameter random, norm weights and biases included, so a dropped or swapped one shows."""
    import torch
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias") or name == "masked_spec_embed":
                p.normal_(0.0, 0.1)
    return m


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory):
    """A very small MERT saved as our .pt, so that a 10-minute song runs in seconds."""
    import torch
    from mert import MERT, MERTConfig
    torch.manual_seed(0)
    m = MERT(MERTConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, conv_dim=(32,) * 7, pos_conv_groups=4)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "micro.pt"
    m.save(path)
    return path


@pytest.fixture(scope="module")
def sine_clip(tmp_path_factory):
    """A 1.5-second sine as a 24 kHz WAV, in its own folder (outside the tmp_path whose leftovers tests list)."""
    import soundfile as sf
    path = tmp_path_factory.mktemp("clip") / "clip.wav"
    sf.write(path, sine(1.5), 24000)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): the micro model's
    ops are too small for two, one keeps runs quick on a busy machine, and in-process runs compare bit for bit.
    Named on one test instead, it holds from that test to the module's end (so such tests stand last)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid`, read from /proc (torchrun's workers)."""
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids
