"""teachers.py: label shapes, dtypes and frame cuts; CQT pitch; RVQ codes through a checkpoint; MFCC
k-means fit command; random-projection determinism and code usage; no gradients; the combiner; bad checkpoint
and output flags of `labels` and `fit-mfcc` refused in one line before any work."""
import dataclasses
import math
from dataclasses import asdict

import pytest
import soundfile as sf
import torch

import rvq
import teachers
from conftest import one_line
from teachers import (AcousticTeacher, MFCC, MFCCKMeansTeacher, MusicalTeacher, RandomProjectionTeacher,
                      Teachers, build_teachers, kmeans_pp)

SR = 24_000
L5 = 5 * SR
T5 = 374                            # the model's frame count for a 5 s crop (mert.py's conv stack)


def rich(batch: int, samples: int, seed: int) -> torch.Tensor:
    """Random harmonic notes (12 per second, random pitch, loudness and brightness) over random-level noise, (batch, samples)."""
    g = torch.Generator().manual_seed(seed)
    note = torch.arange(samples) * 12 // SR                          # note index of each sample
    n = int(note[-1]) + 1
    f0 = 55 * 2 ** (torch.randint(0, 60, (batch, n), generator=g) / 12)
    amp, noise = torch.rand(batch, n, generator=g), torch.rand(batch, n, generator=g) ** 2
    tilt = 0.3 + 1.5 * torch.rand(batch, n, generator=g)            # harmonic roll-off exponent
    phase = 2 * torch.pi * torch.cumsum(f0[:, note], 1) / SR
    tone = sum(torch.sin(h * phase) / h ** tilt[:, note] for h in (1, 2, 3, 4, 5, 7))
    return (0.3 * amp[:, note] * tone + 0.1 * noise[:, note] * torch.randn(batch, samples, generator=g)).float()


@pytest.fixture(scope="module")
def cqt_teacher():
    return MusicalTeacher()


def test_model_frames_is_the_models_real_frame_count():
    """teachers.model_frames (what labels are cut to) against the frames a MERT conv stack really gives."""
    from mert import MERT, MERTConfig
    torch.manual_seed(0)
    model = MERT(MERTConfig.from_preset("tiny", n_layers=1)).eval()
    for n in (400, 719, 720, 1039, SR + 123, L5):
        with torch.no_grad():
            got = model.extract(torch.randn(1, n), layers=[0]).shape[2]
        assert got == teachers.model_frames(n), n
    assert teachers.model_frames(L5) == T5 == 374


# ----------------------------------------------------------------------------- acoustic

def test_acoustic_teacher_loads_rvq_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = dataclasses.replace(rvq.PRESETS["small"], kmeans_iters=2)   # codebook quality is beside the point
    model = rvq.RVQVAE(cfg)
    with torch.no_grad():  # real codebooks (k-means on latents), so the codes vary
        model.quantizer.init_(model.encoder(rich(1, SR, 1)[:, None]))
    rvq.save_atomic({"config": asdict(cfg), "model": model.state_dict()}, tmp_path / "rvq.pt")

    teacher = AcousticTeacher(tmp_path / "rvq.pt", n_q=8)
    wav = rich(1, L5, 2)
    out = teacher(wav, T5)
    assert set(out) == {"codes"}
    codes = out["codes"]
    assert codes.shape == (1, 8, T5) and codes.dtype == torch.int64
    assert torch.equal(codes, model.eval().encode(wav, n_q=8)[..., :T5])    # 375 codes cut to 374
    assert (teacher.n_codebooks, teacher.codebook_size) == (8, 1024)
    assert len(torch.unique(codes[:, 0])) > 1
    with pytest.raises(ValueError, match="n_q"):
        AcousticTeacher(model, n_q=9)


# ----------------------------------------------------------------------------- musical

def test_musical_teacher_shape_and_pitch(cqt_teacher):
    t = torch.arange(L5) / SR
    freqs = (440.0, 1000.0)
    wav = torch.stack([0.5 * torch.sin(2 * math.pi * f * t) for f in freqs])
    out = cqt_teacher(wav, T5)
    assert set(out) == {"cqt"}
    c = out["cqt"]
    assert c.shape == (2, T5, 336) and c.dtype == torch.float32
    for b, f in enumerate(freqs):
        expected = round(48 * math.log2(f / 32.7))          # bin k is at 32.7 · 2^(k/48) Hz
        peaks = c[b, 50:-50].argmax(-1)                      # frames away from the edges
        assert (peaks == expected).all(), (f, expected, peaks.unique())


def test_musical_teacher_log_target(cqt_teacher):
    wav = rich(2, L5, 4)
    lin = cqt_teacher(wav, T5)["cqt"]
    log = build_teachers("cqt", cqt_log=True)(wav, T5)["cqt"]
    assert torch.allclose(log, torch.log10(lin + 1e-3) + 1.5, atol=1e-5)
    assert log.min() >= 1.5 - 3 - 1e-6                        # silence floors at -1.5, not -inf
    assert torch.equal(build_teachers("cqt")(wav, T5)["cqt"], lin)   # the default stays MERT's linear magnitude


# ----------------------------------------------------------------------------- MFCC k-means

def test_mfcc_features_shape_and_chunking():
    wav = rich(1, 13 * SR, 3)
    mfcc = MFCC()
    f = mfcc(wav)
    assert f.shape == (1, 13 * SR // 320 + 1, 39)
    # the fit command's minute-at-a-time path gives the same frames as the batch path
    assert torch.allclose(mfcc.long(wav[0], chunk_frames=97), f[0], atol=1e-5)
    # the delta of a linear ramp is its slope, away from the repeated edges
    ramp = torch.arange(20.0)[None, :, None] * 3
    assert torch.allclose(teachers._deltas(ramp)[0, 2:-2], torch.full((16, 1), 3.0))


def test_kmeans_pp_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 4, generator=g) * 20
    x = (centres[:, None] + torch.randn(6, 200, 4, generator=g)).reshape(-1, 4)
    c1, inertia = kmeans_pp(x, 6, seed=3)
    c2, _ = kmeans_pp(x, 6, seed=3)
    assert torch.equal(c1, c2)                                # deterministic for a seed
    assert inertia < 5                                        # ~4 = the within-cluster variance · dims
    assert torch.cdist(centres, c1).min(1).values.max() < 1


def _write_folder(folder):
    """Three short synthesised clips at different rates, and one corrupt file."""
    folder.mkdir()
    for i, sr in enumerate((24000, 44100, 16000)):
        w = rich(1, int(2.5 * sr), 10 + i)[0].numpy()
        sf.write(folder / f"clip{i}.wav", w, sr)
    (folder / "bad.wav").write_bytes(b"RIFF not really a wave file" * 10)


def test_fit_mfcc_command(tmp_path, capsys):
    data = tmp_path / "music"
    _write_folder(data)
    out = tmp_path / "km" / "mfcc_km.pt"
    rc = teachers.main(["fit-mfcc", "--data", str(data), "--out", str(out), "--k", "12", "--seed", "1"])
    err = capsys.readouterr().err
    assert rc == 1                                            # a file failed: exit 1, the fit still written
    assert sum("bad.wav" in line for line in err.splitlines()) == 1, err   # named once
    assert out.exists() and not out.with_name(out.name + ".tmp").exists()

    state = torch.load(out, weights_only=True)
    assert state["centroids"].shape == (12, 39) and state["fit"]["files"] == 3
    teacher = MFCCKMeansTeacher(out)
    wav = rich(2, L5, 20)
    codes = teacher(wav, T5)["codes"]
    assert codes.shape == (2, 1, T5) and codes.dtype == torch.int64
    assert len(torch.unique(codes)) >= 6
    assert (teacher.n_codebooks, teacher.codebook_size) == (1, 12)

    # same seed, same data: the same clusters
    out2 = tmp_path / "again.pt"
    assert teachers.main(["fit-mfcc", "--data", str(data), "--out", str(out2), "--k", "12", "--seed", "1"]) == 1
    assert torch.equal(torch.load(out2, weights_only=True)["centroids"], state["centroids"])


def test_fit_mfcc_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        teachers.main(["fit-mfcc", "--data", str(tmp_path), "--out", str(tmp_path / "x.pt"), "--k", "1"])
    assert e.value.code == 2
    assert teachers.main(["fit-mfcc", "--data", str(tmp_path), "--out", str(tmp_path / "x.pt")]) == 1
    assert "k=500" in capsys.readouterr().err               # nothing to cluster: said, exit 1
    with pytest.raises(ValueError, match="fit-mfcc"):
        MFCCKMeansTeacher({"kind": "something else"})


# ----------------------------------------------------------------------------- random projection

def test_random_projection_determinism_and_usage():
    wav = rich(2, 3 * SR, 5)
    T = (wav.shape[1] - 400) // 320 + 1
    a, b, c = RandomProjectionTeacher(seed=7), RandomProjectionTeacher(seed=7), RandomProjectionTeacher(seed=8)
    ca = a(wav, T)["codes"]
    assert ca.shape == (2, 8, T) and ca.dtype == torch.int64
    assert (a.n_codebooks, a.codebook_size) == (8, 1024)
    assert torch.equal(ca, b(wav, T)["codes"])
    assert (ca == c(wav, T)["codes"]).float().mean() < 0.05
    for k in range(8):                                       # many codes in use on varied audio
        assert len(torch.unique(ca[:, k])) > 100, k
    # the random draws live in the state dict: a reload reproduces the labels
    c.load_state_dict(a.state_dict())
    assert torch.equal(c(wav, T)["codes"], ca)
    # labels do not depend on the autocast context of the training step
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(a(wav, T)["codes"], ca)
    with pytest.raises(ValueError, match="odd"):
        RandomProjectionTeacher(stack=2)


# ----------------------------------------------------------------------------- common behaviour

def test_no_gradients_and_frame_cut(cqt_teacher):
    wav = rich(1, L5, 6).requires_grad_(True)
    for t in (cqt_teacher, RandomProjectionTeacher(n_codebooks=2)):
        t.train()
        assert not t.training                                # teachers never leave eval mode
        assert not any(p.requires_grad for p in t.parameters())
        out = t(wav, T5)
        for v in out.values():
            assert not v.requires_grad and v.shape[t.frame_dim] == T5
        with pytest.raises(ValueError, match="fewer"):
            t(wav, T5 + 10)
        with pytest.raises(ValueError, match="samples"):
            t(wav[0], T5)


def test_combiner(cqt_teacher, capsys):
    wav = rich(2, L5, 7)
    ts = Teachers({"cqt": cqt_teacher, "randproj": RandomProjectionTeacher(seed=3)})
    out = ts(wav, T5)
    assert set(out) == {"codes", "cqt"}
    assert out["codes"].shape == (2, 8, T5) and out["cqt"].shape == (2, T5, 336)
    assert (ts.n_codebooks, ts.codebook_size, ts.cqt_bins) == (8, 1024, 336)

    # no acoustic checkpoint: one line, and the random-projection teacher takes its place
    lines = []
    built = build_teachers("acoustic, cqt", seed=3, log=lines.append)
    assert len(lines) == 1 and "random-projection" in lines[0]
    assert built.names == ["randproj", "cqt"]
    assert torch.equal(built(wav, T5)["codes"], out["codes"])

    assert Teachers({"cqt": cqt_teacher}).n_codebooks == 0
    with pytest.raises(ValueError, match="both produce 'codes'"):
        Teachers({"a": RandomProjectionTeacher(seed=0), "b": RandomProjectionTeacher(seed=1)})
    with pytest.raises(ValueError, match="mfcc_ckpt"):
        build_teachers(["mfcc"])
    with pytest.raises(ValueError, match="unknown teacher"):
        build_teachers("cqt,wav2vec")


# ----------------------------------------------------------------------------- crops labelled in context

def _encodec_like(seed: int = 0) -> rvq.RVQVAE:
    """EnCodec 24 kHz's architecture (causal SEANet + 2-layer LSTM) at a quarter of its width, random
    weights, 64-code codebooks seeded on audio (enough frames per code for real residual codebooks)."""
    torch.manual_seed(seed)
    m = rvq.RVQVAE(dataclasses.replace(rvq.PRESETS["encodec24k"], n_filters=8, n_q=8, bins=64, kmeans_iters=5)).eval()
    with torch.no_grad():
        m.quantizer.init_(m.encoder(rich(1, 4 * SR, 7)[:, None]))
    return m


def _crop_with_context(song, start, crop, context):
    """What CropDataset.example gives a crop at `start`: (audio, offset, left [1], right [1])."""
    left, right = min(context[0], start), min(context[1], len(song) - start - crop)
    buf = torch.zeros(context[0] + crop + context[1])
    buf[context[0] - left: context[0] + crop + right] = song[start - left: start + crop + right]
    return buf[None], context[0], torch.tensor([left]), torch.tensor([right])


def test_crop_codes_equal_whole_file_codes_at_every_frame():
    """MERT encodes each file once and slices the codes at the crop; a crop encoded alone starts cold.

    In float64, so that the rounding of two encodes of different lengths cannot flip a near-tie (in
    float32 a few entries do; docs/recipe.md counts them on real music): every code must be equal."""
    model = _encodec_like().double()
    teacher = AcousticTeacher(model, n_q=8)
    crop, T = 2 * SR, (2 * SR - 400) // 320 + 1
    song = rich(1, 8 * SR, 3)[0]
    whole = model.encode(song[None].double(), n_q=8)[0]                 # (8, 8 * 75)
    ctx = teacher.context(3.0)
    assert ctx == (3 * SR, 0)                                          # causal: nothing after the crop matters
    assert teacher.context(0.0)[0] == -(-model.encoder.reach()[0] // 320) * 320 > 0
    starts = (5 * SR + 320 * 3, 0, 1 * SR + 320 * 7, 4 * SR)  # full, no, partial and full context, in one batch
    cs = [_crop_with_context(song, start, crop, ctx) for start in starts]
    audio = torch.cat([c[0] for c in cs])
    got = teacher(audio[:, ctx[0]:ctx[0] + crop], T, context=(audio, ctx[0], torch.cat([c[2] for c in cs]),
                                                               torch.cat([c[3] for c in cs])))["codes"]
    for b, start in enumerate(starts):
        assert torch.equal(got[b], whole[:, start // 320: start // 320 + T]), start
    alone = teacher(song[None, 5 * SR + 960: 5 * SR + 960 + crop], T)["codes"][0]
    assert (alone[:, :25] != whole[:, 5 * 75 + 3: 5 * 75 + 28]).float().mean() > 0.05  # why: cold start


def test_non_causal_teacher_without_lstm_is_exact_by_construction():
    torch.manual_seed(1)
    m = rvq.RVQVAE(dataclasses.replace(rvq.PRESETS["small"], kmeans_iters=2)).eval()
    with torch.no_grad():
        m.quantizer.init_(m.encoder(rich(1, 3 * SR, 1)[:, None]))
    teacher = AcousticTeacher(m, n_q=8)
    left, right = teacher.context(123.0)       # no LSTM: the seconds are not needed, the conv reach is exact
    assert 0 < left < 0.1 * SR and 0 < right < 0.1 * SR and left % 320 == 0 == right % 320
    song = rich(1, 4 * SR, 4)[0].double()
    m.double()  # float64: rounding cannot flip a near-tie between the two encodes
    whole = m.encode(song[None], n_q=8)[0]
    crop, T = SR, (SR - 400) // 320 + 1
    for start in (320 * 3, 2 * SR, 3 * SR - 320):  # the last crop ends at the file's end: no right context
        c = _crop_with_context(song, start, crop, (left, right))
        got = teacher(c[0][:, left:left + crop], T, context=c)["codes"][0]
        assert torch.equal(got, whole[:, start // 320: start // 320 + T])


@pytest.mark.usefixtures("one_thread")  # last in the file: one_thread holds from here to the module's end
def test_teachers_refuse_in_one_line_before_any_work(sine_clip, tmp_path, capsys):
    """Why: `teachers.py labels --acoustic_ckpt <text file>` (like `rvq.py --eval --ckpt nope.pt`) gave a traceback
    or a bare 'error: 101'. Now each is one line naming the flag, before any work."""
    bad, clip = tmp_path / "notes.txt", str(sine_clip)
    bad.write_text("not a checkpoint\n")
    cases = [(["labels", clip, "--start", "0", "--acoustic_ckpt", str(bad)], 2, "--acoustic_ckpt"),
             (["labels", clip, "--start", "0", "--acoustic_ckpt", "nope.th"], 2, "--acoustic_ckpt"),
             (["labels", clip, "--start", "0", "--teachers", "mfcc", "--mfcc_ckpt", str(bad)], 2, "--mfcc_ckpt"),
             (["fit-mfcc", "--data", clip, "--out", str(bad / "km.pt")], 2, "--out")]
    for argv, code, named in cases:
        assert teachers.main(argv) == code, argv
        assert named in one_line(capsys.readouterr().err), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
