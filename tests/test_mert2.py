"""mert2.py against golden outputs of MERT-v2's reference remote code (research/mert2_reference.py).

Golden data (tests/data/mert2): a small config's weights in the official layout with every state of every
case, and, at the released widths with 2 blocks, summaries of the states for weights that
research/mert2_reference.py's seeded_state makes on both sides.
"""
import hashlib
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mert2

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "mert2"
SMALL = DATA / "small"
TOL = 2e-5

_spec = importlib.util.spec_from_file_location("mert2_reference", ROOT / "research" / "mert2_reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)  # its helpers only; the reference itself is imported inside its main()


@pytest.fixture(scope="module")
def golden():
    with np.load(DATA / "golden.npz") as g:
        return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def small():
    return mert2.MERT2.from_pretrained(SMALL)


def _against(ours: torch.Tensor, want: np.ndarray) -> float:
    """Max abs error of ours [S, B, T, D] against the reference's [S, B, T', D] (T' <= T, zeros past it)."""
    T = want.shape[2]
    assert ours.shape[:2] == want.shape[:2] and ours.shape[3] == want.shape[3]
    assert not ours[:, :, T:].any(), "frames past the longest clip must be zeros"
    return float(np.abs(ours[:, :, :T].numpy() - want).max())


def test_key_names_and_shapes_are_the_reference_ones():
    with torch.device("meta"):
        model = mert2.MERT2(mert2.MERT2Config())
    theirs = json.loads((DATA / "reference_keys.json").read_text())["keys"]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == theirs
    assert len(theirs) == 876 and sum(p.numel() for p in model.parameters()) == 632_295_808
    assert "embed_positions.inv_freq" not in theirs  # non-persistent in the reference


@pytest.mark.parametrize("case", ref.CASES["small"])
def test_small_config_equals_reference(small, golden, case):
    wav, lengths = ref.case_input("small", case)
    out = small.extract(wav, lengths=lengths)
    assert out.shape == (3, len(lengths), wav.shape[1] // 960, 64)  # frames = samples // 960
    err = _against(out, golden[f"small/{case}/states"])
    assert err <= TOL, f"{case}: max abs error {err:.3g}"


def test_real_widths_equal_reference(golden):
    """Released widths, 2 blocks: one run of the padded batch (the 1 s and 7.31 s clips) against all three cases."""
    cfg = mert2.MERT2Config.from_dict(ref.REAL2)
    model = mert2.MERT2(cfg).eval()
    model.load_state_dict(ref.seeded_state({k: v.shape for k, v in model.state_dict().items()}), strict=True)
    wav, lengths = ref.case_input("real2", "padded")
    out = model.extract(wav, lengths=lengths)
    assert out.shape == (3, 2, wav.shape[1] // 960, 1024)
    checks = [("padded", out, lengths), ("7.31s", out[:, :1, :lengths[0] // 960], lengths[:1]),
              ("1s", out[:, 1:, :lengths[1] // 960], lengths[1:])]
    for case, states, n in checks:
        for k, v in ref.summarise(states, n).items():
            want = golden[f"real2/{case}/{k}"]
            err = float(np.abs(v[:, :, :want.shape[2]].numpy() - want).max()) if k == "proj" else \
                float(np.abs(v.numpy() - want).max())
            assert err <= TOL, f"real2 {case} {k}: max abs error {err:.3g}"


def test_padded_batch_equals_each_clip_alone(small):
    """Rows 0 and 2 share a length and run together, as in the reference (equal to float rounding: the
    matmuls block differently for 2 rows than for 1); row 1 runs alone and is bit-identical."""
    wav, lengths = ref.case_input("small", "padded")
    batch = small.extract(wav, lengths=lengths)
    for i, n in enumerate(lengths):
        alone = small.extract(wav[i, :n])
        err = float((batch[:, i, :n // 960] - alone[:, 0]).abs().max())
        assert err == 0 if lengths.count(n) == 1 else 0 < err <= 1e-5, (i, err)
        assert not batch[:, i, n // 960:].any()
    assert torch.equal(small.extract(wav[[0, 2], :lengths[0]]), batch[:, [0, 2], :lengths[0] // 960])
    assert torch.equal(small.extract(wav, lengths=lengths, layers=[2, 0]), batch[[2, 0]])
    assert torch.equal(small(wav, lengths=lengths), batch[2])


_PROCESS = """
import hashlib, importlib.util, sys
sys.path[:0] = [{root!r}]
import mert2
spec = importlib.util.spec_from_file_location("mert2_reference", {script!r})
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)
wav = ref.wave(72000, seed=9)
out = mert2.MERT2.from_pretrained({small!r}).extract(wav)
print(hashlib.sha256(out.numpy().tobytes()).hexdigest())
"""


def test_bit_identical_in_two_processes(small):
    here = hashlib.sha256(small.extract(ref.wave(72000, seed=9)).numpy().tobytes()).hexdigest()
    code = _PROCESS.format(root=str(ROOT), small=str(SMALL), script=str(ROOT / "research" / "mert2_reference.py"))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert [o.strip() for o, _ in outs] == [here, here]


def test_inv_freq_is_never_read_from_a_checkpoint(small, tmp_path):
    hd = 64 // 4
    want = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    assert torch.equal(small.embed_positions.inv_freq, want)
    assert "embed_positions.inv_freq" not in small.state_dict()
    folder = tmp_path / "garbage"
    shutil.copytree(SMALL, folder)
    state = mert2.read_safetensors(folder / "model.safetensors")
    state["embed_positions.inv_freq"] = torch.full((hd // 2,), float("nan"))
    mert2.write_safetensors(folder / "model.safetensors", state)
    other = mert2.MERT2.from_pretrained(folder)
    assert torch.equal(other.embed_positions.inv_freq, want)
    wav = ref.wave(30000, seed=3)
    assert torch.equal(other.extract(wav), small.extract(wav))
    # a cast model keeps the rotary table and the front end's buffers in float32, as the reference does
    half = mert2.MERT2.from_pretrained(SMALL).to(torch.bfloat16)
    assert half.embed_positions.inv_freq.dtype == torch.float32 and torch.equal(half.embed_positions.inv_freq, want)
    assert half.feature_extractor.mel_scale.fb.dtype == torch.float32
    assert torch.equal(half.feature_extractor.mel_scale.fb, small.feature_extractor.mel_scale.fb)
    assert half.extract(wav).dtype == torch.bfloat16


def test_fresh_front_end_is_torchaudios(small):
    """A model built from a config (not loaded) has the Hann window and HTK filterbank torchaudio gave the reference."""
    fresh = mert2.MERT2(small.config)
    assert torch.equal(fresh.feature_extractor.spectrogram.window, small.feature_extractor.spectrogram.window)
    assert torch.allclose(fresh.feature_extractor.mel_scale.fb, small.feature_extractor.mel_scale.fb, atol=1e-6, rtol=0)


def _one_line_error(fn, *words):
    with pytest.raises(mert2.MERT2Error) as e:
        fn()
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_bad_inputs_give_one_line_errors(small, tmp_path):
    assert small.extract(torch.zeros(1025)).shape == (3, 1, 1, 64)  # the shortest input: one frame
    _one_line_error(lambda: small.extract(torch.zeros(1024)), "1024 samples", "1025")
    _one_line_error(lambda: small.extract(torch.zeros(2, 5000), lengths=[5000, 1000]), "1000 samples", "1025")
    nan = ref.wave(5000, seed=1)
    nan[77] = float("nan")
    _one_line_error(lambda: small.extract(nan), "non-finite")
    inf = torch.zeros(2, 5000)
    inf[1, 4000] = float("inf")
    _one_line_error(lambda: small.extract(inf, lengths=[5000, 4500]), "non-finite", "[1]")
    assert small.extract(inf, lengths=[5000, 3000]).shape[1] == 2  # past a length is never read
    _one_line_error(lambda: small.extract(torch.zeros(5000, dtype=torch.int16)), "float waveform")
    _one_line_error(lambda: small.extract(torch.zeros(5000), layers=[3]), "out of range 0..2")
    # a config of another model type, named with the file
    hubert = tmp_path / "hubert"
    shutil.copytree(SMALL, hubert)
    (hubert / "config.json").write_text(json.dumps({"model_type": "hubert", "hidden_size": 768}))
    _one_line_error(lambda: mert2.MERT2.from_pretrained(hubert), "config.json", "'hubert'", "not MERT-v2")
    assert not mert2.is_mert2(hubert) and mert2.is_mert2(SMALL)
    _one_line_error(lambda: mert2.MERT2.from_pretrained(tmp_path / "nowhere"), "no such file")
    # weights of another shape
    wrong = tmp_path / "wrong"
    shutil.copytree(SMALL, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=256)))
    _one_line_error(lambda: mert2.MERT2.from_pretrained(wrong), "shape mismatch", "ffn1.w_1.weight")
    bad = tmp_path / "bad"
    shutil.copytree(SMALL, bad)
    (bad / "config.json").write_text(json.dumps(dict(cfg, num_attention_heads=3)))
    _one_line_error(lambda: mert2.MERT2.from_pretrained(bad), "config.json", "heads")


def test_loads_from_folder_file_hub_cache_and_bin(small, tmp_path, monkeypatch):
    wav = ref.wave(5000, seed=5)
    want = small.extract(wav)
    # our writer, read back by the safetensors package and by us
    ours = small.save_pretrained(tmp_path / "saved")
    from safetensors.torch import load_file
    assert set(load_file(ours / "model.safetensors")) == set(small.state_dict())
    assert torch.equal(mert2.MERT2.from_pretrained(ours).extract(wav), want)
    assert torch.equal(mert2.MERT2.from_pretrained(SMALL / "model.safetensors").extract(wav), want)
    # a hub id in the local cache
    snap = tmp_path / "hub" / "models--m-a-p--MERT-v2-30s" / "snapshots" / "0123abc"
    shutil.copytree(SMALL, snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert torch.equal(mert2.MERT2.from_pretrained("m-a-p/MERT-v2-30s").extract(wav), want)
    assert mert2.is_mert2("m-a-p/MERT-v2-30s")
    _one_line_error(lambda: mert2.MERT2.from_pretrained("m-a-p/MERT-v2-FullSong"),
                    "not in the local Hugging Face cache")
    # pytorch_model.bin
    binf = tmp_path / "bin"
    binf.mkdir()
    shutil.copy(SMALL / "config.json", binf)
    torch.save(small.state_dict(), binf / "pytorch_model.bin")
    assert torch.equal(mert2.MERT2.from_pretrained(binf).extract(wav), want)


def test_frame_grid():
    hop, first, sr = mert2.FRAME_GRID
    assert (hop, sr) == (960, 24000) and math.isclose(first / sr, 0.015)  # mel frames 4j..4j+3 at 240 m
    m = mert2.MERT2(mert2.MERT2Config.from_dict(json.loads((SMALL / "config.json").read_text())))
    assert [m.num_frames(n) for n in (1024, 1025, 1919, 1920, 24000, 24959)] == [0, 1, 1, 2, 25, 25]
