"""Shared test helpers: reference packages are optional locally, never in CI."""
import importlib
import os
from pathlib import Path

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
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): the micro model's
    ops are too small for two, one keeps runs quick on a busy machine, and in-process runs compare bit for bit."""
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
