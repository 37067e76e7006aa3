"""Each top-level file copies out: with only the project files the design's import table allows it (docs: "Files
and who may import whom"), in an empty folder, a fresh interpreter imports it and runs a small call.

What a module imports lazily for one case only (mert.py and train.py: `convert` for fairseq files; teachers.py and
rvq.py: `audio` for their commands) is left out of the copy, so the test also shows that import stays lazy.
All copies run at once, each in its own process, so the whole file costs about one interpreter start.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The project files each module may import (the design's table); copies take the closure of these.
DEPS = {
    "cqt": [], "rvq": [], "mert": [], "mert2": [], "checkpoints": [], "audio": [], "mirmetrics": [],
    "convert": ["mert"],
    "teachers": ["cqt", "rvq"],
    "train": ["mert", "teachers", "audio", "checkpoints"],
    "extract": ["mert", "mert2", "audio"],
    "probe": ["extract", "mirmetrics", "cqt", "teachers"],
    "bench": None,  # any: every top-level file
}


def cli_help(name: str) -> str:
    """Run NAME.py as a script with --help: argparse prints and exits 0."""
    return f"""
        import runpy
        sys.argv = ["{name}.py", "--help"]
        try:
            runpy.run_path("{name}.py", run_name="__main__")
        except SystemExit as e:
            assert e.code in (0, None), f"--help exited {{e.code}}"
        else:
            raise AssertionError("--help did not exit")
        """


SMOKE = {
    "cqt": """
        import math, torch
        x = torch.sin(2 * math.pi * 440 * torch.arange(24000) / 24000)[None]
        C = cqt.CQT(sr=24000, hop_length=320, fmin=32.7, n_bins=336, bins_per_octave=48)(x)
        assert C.shape == (1, 336, 76), C.shape
        assert abs(int(C[0, :, 20:-20].mean(1).argmax()) - 180) <= 1  # 440 Hz: 48 log2(440 / 32.7) = 180
        """,
    "rvq": """
        import dataclasses, torch
        torch.manual_seed(0)
        m = rvq.RVQVAE(dataclasses.replace(rvq.PRESETS["small"], n_filters=4, kmeans_iters=1)).eval()
        x = torch.randn(1, 3200)
        with torch.no_grad():
            m.quantizer.init_(m.encoder(x[:, None]))
            codes = m.encode(x, n_q=2)
        assert codes.shape == (1, 2, 10) and codes.dtype == torch.int64
        """,
    "mert": """
        import torch
        m = mert.MERT(mert.MERTConfig.from_preset("tiny", n_layers=1)).eval()
        with torch.no_grad():
            h = m.extract(torch.randn(1, 24000))
        assert h.shape[:3] == (2, 1, 74), h.shape
        """,
    "mert2": """
        import torch
        cfg = mert2.MERT2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_mel_bins=16, subsampling_channels=(16, 24, 32), subsampling_depths=(1, 1, 1))
        m = mert2.MERT2(cfg).eval()
        m.save_pretrained("m2")
        x = 0.1 * torch.randn(24000)
        h = mert2.MERT2.from_pretrained("m2").extract(x)
        assert h.shape == (2, 1, 25, 32) and torch.equal(h, m.extract(x)), h.shape
        """,
    "audio": """
        import numpy as np, soundfile as sf
        sf.write("a.wav", np.full(4800, 0.25, np.float32), 24000, subtype="FLOAT")
        x = audio.load("a.wav")
        assert x.dtype == np.float32 and len(x) == 4800 and abs(float(x[2400]) - 0.25) < 1e-6
        """,
    "mirmetrics": """
        s = mirmetrics.chord_scores([[0, 2], [2, 4]], ["C:maj", "A:min"], [[0, 3], [3, 4]], ["C:maj7", "A:min"])
        assert s["majmin"] == (3.0, 4.0) and s["root"] == (3.0, 4.0), s
        """,
    "teachers": """
        import torch
        t = teachers.build_teachers("randproj,cqt", seed=1)
        T = teachers.model_frames(24000)
        y = t(torch.randn(1, 24000), T)
        assert y["codes"].shape == (1, 8, T) and y["cqt"].shape == (1, T, 336)
        """ + cli_help("teachers"),
    "checkpoints": "",
    "convert": cli_help("convert"),
    "extract": cli_help("extract"),
    "probe": cli_help("probe"),
    "train": cli_help("train"),
    "bench": cli_help("bench"),
}


def copy_set(name: str) -> list[str]:
    """NAME and every project file it may import, directly or through those (existing files only)."""
    if DEPS[name] is None:
        return sorted(p.stem for p in ROOT.glob("*.py"))
    todo, seen = [name], set()
    while todo:
        m = todo.pop()
        if m not in seen and (ROOT / f"{m}.py").exists():
            seen.add(m)
            todo += DEPS[m] or []
    return sorted(seen)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every module's copy-out check at once; {name: (files copied, Popen)}."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = ""
    started = {}
    for name in SMOKE:
        if not (ROOT / f"{name}.py").exists():
            continue
        d = tmp_path_factory.mktemp(f"alone_{name}")
        files = copy_set(name)
        for m in files:
            shutil.copy(ROOT / f"{m}.py", d / f"{m}.py")
        code = textwrap.dedent(f"""
            import os, sys
            import {name}
            assert os.path.dirname(os.path.abspath({name}.__file__)) == os.getcwd(), {name}.__file__
            """) + textwrap.dedent(SMOKE[name])
        started[name] = files, subprocess.Popen([sys.executable, "-c", code], cwd=d, env=env, text=True,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield started
    for _, p in started.values():
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("name", list(SMOKE))
def test_module_copies_out_alone(runs, name):
    if not (ROOT / f"{name}.py").exists():
        pytest.skip(f"{name}.py does not exist in this tree yet")
    files, p = runs[name]
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, f"{name}.py copied with {files} only:\n{err[-3000:]}"
