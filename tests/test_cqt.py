"""cqt.py: parity with nnAudio's CQT (CQT1992v2), the documented relation to librosa.cqt, the exact
definition, and the module's contracts (shapes, dtypes, silence, short inputs, errors)."""
import math

import numpy as np
import pytest
import torch

import cqt as cqt_module
from conftest import need
from cqt import CQT, cqt

MERT = dict(sr=24000, hop_length=320, fmin=32.7, n_bins=336, bins_per_octave=48)  # MERT's teacher


def rel(a, b) -> float:
    """Relative L2 error of a against the reference b."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


def music(seconds: float, sr: int = 24000, seed: int = 0) -> np.ndarray:
    """Synthetic music: chords of harmonic tones with vibrato and note onsets, a bass line, kick,
    snare and hi-hat, plus noise bursts. Deterministic; peak 0.9."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    y = np.zeros(n)

    def add(start, dur, attack, decay, make):  # one event: make(t) shaped by an attack/decay envelope
        i0, i1 = int(start * sr), min(n, int((start + dur) * sr))
        if i1 <= i0:
            return
        u = np.arange(i1 - i0) / sr
        y[i0:i1] += np.minimum(u / attack, 1.0) * np.exp(-u / decay) * make(u, i0 / sr + u)

    for c0 in np.arange(0, seconds, 1.0):                        # one chord per second
        root = rng.integers(40, 60)
        for i, interval in enumerate([0, 4 if rng.random() < 0.5 else 3, 7, 12, -12]):
            f0 = 440 * 2 ** ((root + interval - 69) / 12)
            onset = c0 + 0.05 * i * rng.random()                     # slightly strummed
            vib_phase, phases = rng.random() * 6, rng.random(12) * 6

            def note(u, t, f0=f0, vib_phase=vib_phase, phases=phases):
                vib = 0.004 * f0 / 5.5 * np.sin(2 * np.pi * 5.5 * t + vib_phase)  # 0.4 % vibrato
                return sum(0.3 / h ** 1.3 * np.sin(2 * np.pi * h * (f0 * t + vib) + phases[h])
                           for h in range(1, 12) if h * f0 < sr / 2 - 500)
            add(onset, c0 + 1.0 - onset, 0.01, 0.6, note)
    for beat in np.arange(0, seconds, 0.5):                      # drums at 120 bpm
        add(beat, 0.6, 0.002, 0.15,                              # kick: 120 -> 45 Hz sweep
            lambda u, t: 0.8 * np.sin(2 * np.pi * (45 * u + 75 * 0.04 * (1 - np.exp(-u / 0.04)))))
        add(beat + 0.25, 0.4, 0.001, 0.08,                       # snare: noise and a 190 Hz body
            lambda u, t: 0.4 * (rng.standard_normal(len(u)) + np.sin(2 * np.pi * 190 * t)))
    for h in np.arange(0.125, seconds, 0.25):                    # hi-hat: crude high-passed noise
        add(h, 0.15, 0.001, 0.03, lambda u, t: 0.15 * np.diff(rng.standard_normal(len(u) + 1)))
    for b in rng.uniform(0, seconds, 3):                          # broadband noise bursts
        add(b, 0.3, 0.005, 0.05, lambda u, t: 0.2 * rng.standard_normal(len(u)))
    return (0.9 * y / np.abs(y).max()).astype(np.float32)


def tones(seconds: float, sr: int = 24000) -> np.ndarray:
    """Unit sines at bin centres and between bins, plus a logarithmic chirp 40 Hz -> 4 kHz."""
    t = np.arange(int(seconds * sr)) / sr
    y = sum(np.sin(2 * np.pi * 32.7 * 2 ** (k / 48) * t) for k in (0, 100.5, 200, 250.25, 335))
    f0, f1 = 40.0, 4000.0
    y = y + np.sin(2 * np.pi * f0 * seconds / math.log(f1 / f0) * ((f1 / f0) ** (t / seconds) - 1))
    return y.astype(np.float32)


@pytest.fixture(scope="module")
def ours():
    return CQT(**MERT)


@pytest.fixture(scope="module")
def reference():
    nnaudio_cqt = need("nnAudio.features.cqt")
    return nnaudio_cqt.CQT(**MERT, pad_mode="constant", verbose=False)


# ---------------------------------------------------------------- parity with nnAudio


def test_nnaudio_parity_music(ours, reference):
    x = torch.from_numpy(np.stack([music(4.0, seed=0), music(4.0, seed=1)]))
    with torch.no_grad():
        want = reference(x)
    got = ours(x)
    assert got.shape == want.shape == (2, 336, 4 * 24000 // 320 + 1)
    for i in range(2):
        assert rel(got[i], want[i]) < 1e-3  # measured ~1e-4
    # Every octave on its own, so quiet high octaves are not hidden by loud bass.
    for o in range(7):
        assert rel(got[:, 48 * o:48 * (o + 1)], want[:, 48 * o:48 * (o + 1)]) < 1e-3


def test_nnaudio_parity_tones(ours, reference):
    x = torch.from_numpy(tones(3.0))[None]
    with torch.no_grad():
        want = reference(x)
    got = ours(x)
    assert got.shape == want.shape
    assert rel(got, want) < 1e-3


def test_nnaudio_parity_complex_and_phase(ours, reference):
    x = torch.from_numpy(music(2.0, seed=2))[None]
    with torch.no_grad():
        want_c = reference(x, output_format="Complex")      # [..., 2] = (real, imag)
        want_p = reference(x, output_format="Phase")        # [..., 2] = (cos, sin)
    got = ours(x, output="complex")
    assert got.dtype == torch.complex64
    assert rel(torch.view_as_real(got), want_c) < 1e-3
    got_c = ours(x, output_format="Complex")
    assert got_c.shape == want_c.shape and rel(got_c, want_c) < 1e-3
    got_p = ours(x, output_format="Phase")
    assert got_p.shape == want_p.shape
    strong = got.abs() > 1e-2 * got.abs().max()                # phase is meaningless in the noise floor
    assert (got_p - want_p)[strong].abs().max() < 1e-2


@pytest.mark.filterwarnings("ignore:If fmax is given")  # nnAudio's notice that fmax overrides n_bins
@pytest.mark.parametrize("kw", [
    dict(sr=22050, hop_length=512, fmin=32.7, n_bins=84, bins_per_octave=12),          # nnAudio defaults
    dict(sr=16000, hop_length=160, fmin=50.0, n_bins=96, bins_per_octave=24, filter_scale=0.5, norm=2),
    # bands crossing 0 Hz and Nyquist (conjugate mirrors), blackman window, nnAudio's fmax
    dict(sr=8000, hop_length=64, fmin=20.0, fmax=3900.0, bins_per_octave=12, window="blackman"),
    dict(sr=8000, hop_length=100, fmin=20.0, n_bins=60, bins_per_octave=12, filter_scale=0.5, norm=None),
    dict(MERT, pad_mode="reflect"),
    dict(MERT, center=False),
], ids=["nnaudio-defaults", "fs0.5-norm2", "blackman-fmax", "norm-none", "reflect", "no-center"])
def test_nnaudio_parity_other_arguments(kw):
    nnaudio_cqt = need("nnAudio.features.cqt")
    nn_kw = dict(kw, norm=kw.get("norm", 1) or 0)             # nnAudio spells "no norm" as 0
    nn_kw.setdefault("pad_mode", "constant")
    x = torch.from_numpy(music(3.0, sr=kw["sr"], seed=3))[None]
    with torch.no_grad():
        want = nnaudio_cqt.CQT(**nn_kw, verbose=False)(x)
    got = CQT(**kw)(x)
    assert got.shape == want.shape
    assert rel(got, want) < 1e-3


def test_nnaudio_parity_short_input(ours, reference):
    # Shorter than the longest kernel (50,460 taps) and than one hop.
    for n in (1000, 100):
        x = torch.from_numpy(music(1.0, seed=4)[:n])[None]
        with torch.no_grad():
            want = reference(x)
        got = ours(x)
        assert got.shape == want.shape == (1, 336, n // 320 + 1)
        assert rel(got, want) < 1e-3


def test_nnaudio_parity_across_block_layouts():
    """Lengths around the switch from one zero-extended block to overlap-save blocks, and a multiple
    of the hop (one more frame)."""
    nnaudio_cqt = need("nnAudio.features.cqt")
    kw = dict(sr=8000, hop_length=80, fmin=55.0, n_bins=48, bins_per_octave=12)
    ours = CQT(**kw)
    ref = nnaudio_cqt.CQT(**kw, pad_mode="constant", verbose=False)
    edge = ours.block - ours.reach_before            # longest single-block input
    x = torch.from_numpy(music(3.0, sr=8000, seed=11))
    for n in (edge - 1, edge, edge + 1, 80 * 150, 2 * ours.block + 7):
        assert n <= len(x)
        with torch.no_grad():
            want = ref(x[None, :n])
        got = ours(x[None, :n])
        assert got.shape == want.shape and rel(got, want) < 1e-3, n


# ---------------------------------------------------------------- definition and librosa


def test_matches_direct_definition():
    """The formula in the module docstring, evaluated directly in float64 (no reference package)."""
    kw = dict(sr=8000, hop_length=50, fmin=110.0, n_bins=30, bins_per_octave=12)
    x = music(0.5, sr=8000, seed=5).astype(np.float64)
    q = 1 / (2 ** (1 / 12) - 1)
    frames = len(x) // 50 + 1
    want = np.zeros((30, frames), dtype=np.complex128)
    for k in range(30):
        f = 110.0 * 2 ** (k / 12)
        l = int(math.ceil(q * 8000 / f))
        a = math.ceil(l / 2)
        m = np.arange(l)
        w = 0.5 - 0.5 * np.cos(2 * np.pi * m / l)
        kern = math.sqrt(l) / w.sum() * w * np.exp(-2j * np.pi * f * (m - a) / 8000)
        xp = np.pad(x, (a, l))
        for t in range(frames):                     # samples t*hop + m - a of x
            want[k, t] = (xp[t * 50 + m] * kern).sum()
    got = CQT(**kw, output="complex")(torch.from_numpy(x))
    assert rel(torch.view_as_real(got), torch.view_as_real(torch.from_numpy(want))) < 1e-3


def test_librosa_relation(ours):
    """librosa.cqt (scale=True) computes the same quantity with its own Q and approximations.

    With librosa's Q matched to ours (filter_scale = Q_ours * alpha_librosa) and no spectral
    sparsification, frames whose longest kernel lies inside the signal agree to ~0.25 % here
    (residual: librosa's per-octave resampling); with librosa's defaults (Q 0.75 % larger at 48
    bins/octave, sparsity 0.01) to ~0.7 %. Edge frames can differ by a few per cent because librosa
    pads the downsampled signals of the low octaves, not the original one (0.7 % overall here, 1.5 %
    on pure tones). Bounds: about 2x those.
    """
    librosa = need("librosa")
    x = music(4.0, seed=6)
    got = ours(torch.from_numpy(x)).numpy()
    b = MERT["bins_per_octave"]
    q = 1 / (2 ** (1 / b) - 1)
    alpha = (2 ** (2 / b) - 1) / (2 ** (2 / b) + 1)
    edge = math.ceil(math.ceil(q * MERT["sr"] / MERT["fmin"]) / 2 / MERT["hop_length"])
    inner = slice(edge, -edge)
    matched = np.abs(librosa.cqt(x, **MERT, filter_scale=q * alpha, sparsity=0.0))
    assert matched.shape == got.shape
    assert rel(matched[:, inner], got[:, inner]) < 5e-3
    default = np.abs(librosa.cqt(x, **MERT))
    assert rel(default[:, inner], got[:, inner]) < 1.5e-2
    assert rel(default, got) < 3e-2


def test_tone_peaks_in_its_bin(ours):
    sr = MERT["sr"]
    t = torch.arange(3 * sr) / sr
    for k in (0, 47, 123, 200, 290, 335):
        f = MERT["fmin"] * 2 ** (k / 48)
        # Frames 105-119 (1.4-1.6 s): even bin 0's 2.1 s kernel lies inside the 3 s signal.
        spec = ours(torch.cos(2 * math.pi * f * t))[:, 105:120]
        assert spec.mean(1).argmax().item() == k
        # Scaling: a unit cosine gives sqrt(l_k) / 2 (L1-normalised kernel sees amplitude 1/2).
        assert spec[k].mean().item() == pytest.approx(math.sqrt(ours.lengths[k]) / 2, rel=1e-3)


# ---------------------------------------------------------------- contracts


def test_silence_gives_zeros(ours):
    x = torch.zeros(2, 24000)
    assert torch.equal(ours(x), torch.zeros(2, 336, 76))
    for out in ("log", "db", "complex"):
        y = ours(x, output=out)
        assert torch.isfinite(torch.view_as_real(y) if y.is_complex() else y).all()
    assert torch.isfinite(ours(x, output_format="Phase")).all()


def test_batch_equals_one_by_one_and_shapes(ours):
    x = torch.from_numpy(np.stack([music(1.5, seed=s) for s in range(3)]))
    batch = ours(x)
    for i in range(3):
        assert torch.allclose(batch[i], ours(x[i:i + 1])[0], rtol=1e-5, atol=1e-5 * batch.max().item())
    one = ours(x[0])                                   # [samples] -> [n_bins, frames]
    assert one.shape == (336, 1.5 * 24000 // 320 + 1)
    assert torch.allclose(one, batch[0], rtol=1e-5, atol=1e-5 * batch.max().item())
    assert torch.equal(ours(x[:, None]), batch)        # nnAudio's [B, 1, samples]
    assert ours.n_frames(x.shape[-1]) == batch.shape[-1]


def test_outputs_and_dtypes(ours):
    x = torch.from_numpy(music(1.0, seed=7))
    mag = ours(x)
    c = ours(x, output="complex")
    assert torch.allclose(c.abs(), mag)
    assert torch.allclose(ours(x, output="log"), torch.log1p(mag))
    assert torch.allclose(ours(x, output="db"), 20 * torch.log10(mag.clamp_min(1e-5)))
    assert CQT(sr=8000, hop_length=64, fmin=100.0, n_bins=24, output="log")(x).min() >= 0
    # Computed in float32 whatever comes in; output float32.
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        xi = x.to(dtype)
        y = ours(xi)
        assert y.dtype == torch.float32
        assert torch.equal(y, ours(xi.float()))
    assert rel(ours(x.double()), mag) < 1e-6
    # Module dtype casts must not lower the internal precision; kernels stay out of state dicts.
    small = dict(sr=8000, hop_length=64, fmin=100.0, n_bins=24)
    assert torch.equal(CQT(**small).double()(x), CQT(**small)(x))
    assert torch.equal(CQT(**small).half()(x), CQT(**small)(x))
    assert ours.state_dict() == {}


def test_functional_form_and_cache(ours):
    x = torch.from_numpy(music(1.0, seed=8))[None]
    assert torch.equal(cqt(x, **MERT), ours(x))
    hits = cqt_module._cached.cache_info().hits
    assert torch.equal(cqt(x, **MERT, output="log"), ours(x, output="log"))   # same kernels, reused
    assert cqt_module._cached.cache_info().hits == hits + 1


def test_window_dtft_closed_form():
    """The closed-form window spectrum equals the direct sum, including its 0/0 points."""
    for coefs in cqt_module._WINDOWS.values():
        for l in (7.0, 64.0, 101.0):
            phi = np.concatenate([np.linspace(-0.5, 0.5, 201), [0.0, 2 * np.pi / l, -4 * np.pi / l]])
            phase = np.linspace(-3, 3, len(phi))
            m = np.arange(int(l))
            w = sum(c * np.cos(2 * np.pi * j * m / l) for j, c in enumerate(coefs))
            want = np.exp(1j * phase) * (w * np.exp(1j * phi[:, None] * m)).sum(1)
            got = cqt_module._window_dtft(coefs, l, phi, phase)
            assert np.abs(got - want).max() < 1e-9 * l


def test_chunked_and_gather_paths_agree(monkeypatch):
    """Long inputs go through several block chunks; GPUs (and autograd) take the gather/scatter
    product instead of the sparse matmul. Same numbers."""
    kw = dict(sr=8000, hop_length=80, fmin=55.0, n_bins=48, bins_per_octave=12)
    m = CQT(**kw)
    x = torch.from_numpy(np.stack([music(12.0, sr=8000, seed=9), music(12.0, sr=8000, seed=10)]))
    want = m(x)
    assert m.n_frames(x.shape[-1]) > 2 * m.frames_per_block          # several blocks per item
    with monkeypatch.context() as mp:
        mp.setitem(cqt_module._BLOCK_BYTES, "cpu", m.block * 24 * 2)  # two blocks per chunk
        assert torch.allclose(m(x), want, rtol=1e-4, atol=1e-5 * want.max().item())
    assert torch.allclose(m(x[1]), want[1], rtol=1e-5, atol=1e-5 * want.max().item())  # batch == one
    monkeypatch.setattr(cqt_module, "_SPARSE_MM", set())
    assert torch.allclose(m(x), want, rtol=1e-4, atol=1e-5 * want.max().item())
    assert cqt_module._smooth_at_least(533) == 540 and cqt_module._smooth_at_least(1024) == 1024


def test_gradient_flows():
    m = CQT(sr=8000, hop_length=64, fmin=100.0, n_bins=24, bins_per_octave=12)
    x = torch.randn(1, 4000, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_nnaudio_constructor_names():
    m = CQT(sr=22050, hop_length=512, fmin=32.7, fmax=4000.0, bins_per_octave=12, trainable=False,
            output_format="Magnitude", verbose=True)
    assert m.n_bins == math.ceil(12 * math.log2(4000.0 / 32.7))
    assert m.kernel_width == 2 ** math.ceil(math.log2(m.lengths.max()))


@pytest.mark.parametrize("make, x, match", [
    (lambda: CQT(**MERT), torch.zeros(2, 3, 100), "expects"),
    (lambda: CQT(**MERT), torch.zeros(2, 0), "empty"),
    (lambda: CQT(**MERT), torch.zeros(100, dtype=torch.complex64), "real"),
    (lambda: CQT(**MERT, center=False), torch.zeros(1, 1000), "kernel_width"),
    (lambda: CQT(**MERT, pad_mode="reflect"), torch.zeros(1, 1000), "reflect"),
])
def test_bad_input_raises(make, x, match):
    with pytest.raises(ValueError, match=match):
        make()(x)


@pytest.mark.parametrize("kw, match", [
    (dict(window="hamming"), "window"),
    (dict(trainable=True), "trainable"),
    (dict(n_bins=600), "Nyquist"),
    (dict(output="power"), "output"),
    (dict(output_format="Spectrum"), "output_format"),
    (dict(output="log", output_format="Complex"), "conflicts"),
    (dict(pad_mode="circular"), "pad_mode"),
    (dict(norm=3), "norm"),
    (dict(hop_length=0), "hop_length"),
])
def test_bad_arguments_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        CQT(**dict(MERT, **kw))
