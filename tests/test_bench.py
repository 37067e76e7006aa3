"""bench.py gpu, the prepared device check: at tiny size on a CPU it runs the same code paths as on a GPU and prints
one JSON with every part (CI keeps it working for the day a GPU runs it)."""
import json
import subprocess
import sys
from pathlib import Path

import mert
import train

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_tiny_on_a_cpu_and_prints_one_json(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench.py"), "gpu", "--tiny", "--device", "cpu", "--budget", "600",
                        "--threads", "1", "--json", str(tmp_path / "gpu.json")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout)
    assert report == json.loads((tmp_path / "gpu.json").read_text())
    assert report["errors"] == [] and report["skipped"] == [] and report["tiny"] and report["device"] == "cpu"
    for route, context in (("fly", True), ("codes", False)):
        r = report["train"]["tiny"][route]
        assert r["ms_per_step"] > 0 and r["audio_s_per_s"] > 0 and r["batch"] == 2
        assert 0 < r["data_ms"] + r["teachers_ms"] + r["model_ms"] <= 1.5 * r["ms_per_step"]
        assert 0 < r["teachers_share"] < 1 and (r["context_seconds"] > 0) == context
        assert r["sdpa_backend_used"]                                      # read from the profiler
    assert report["train"]["tiny"]["codes"]["route"] == "codes from shards"
    sdpa = report["sdpa"]["tiny"]
    assert sdpa["default"] and isinstance(sdpa["math_ms"], float) and sdpa["fastest"] in ("flash", "efficient",
                                                                                          "cudnn", "math")
    for dtype in ("bfloat16", "float32"):
        assert report["extract"]["tiny"][dtype]["audio_s_per_s"] > 0


def test_mfu_peaks_by_device_name():
    assert mert.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12   # SXM
    assert mert.gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert mert.gpu_peak_flops("NVIDIA H200") == 989e12
    assert mert.gpu_peak_flops("NVIDIA H100 NVL") == 835e12
    assert mert.gpu_peak_flops("Tesla T4") is None
