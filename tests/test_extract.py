"""extract.py: chunk planning, layer selection, chunked alignment, and the CLI on good and bad files."""
import numpy as np
import pytest
import soundfile as sf
import torch

import extract
from mert import MERT, MERTConfig


def music(n, sr=24000, seed=0):
    g = np.random.default_rng(seed)
    t = np.arange(n) / sr
    x = sum(0.2 / h * np.sin(2 * np.pi * 196 * h * t) for h in range(1, 6))
    x = x * (0.6 + 0.4 * np.sign(np.sin(2 * np.pi * 1.5 * t))) + 0.02 * g.standard_normal(n)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory):
    """A very small model, so that a 10-minute song runs in seconds."""
    torch.manual_seed(0)
    m = MERT(MERTConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, conv_dim=(32,) * 7, pos_conv_groups=4)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "micro.pt"
    m.save(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny model whose hidden state 0 depends only on +-64 frames (LayerNorm extractor, no attention)."""
    torch.manual_seed(0)
    m = MERT(MERTConfig.from_preset("tiny", extractor_norm="layer", n_layers=2)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    m.save(path)
    return path


@pytest.mark.parametrize("n,chunk,overlap", [(10, 20, 5), (100, 20, 6), (101, 20, 0), (2249, 2250, 375),
                                             (45000, 2250, 375), (23, 10, 9)])
def test_plan_chunks_tiles_the_file(n, chunk, overlap):
    plan = extract.plan_chunks(n, chunk, overlap)
    assert plan[0][2] == 0 and plan[-1][3] == n
    for (s, length, lo, hi), nxt in zip(plan, plan[1:] + [None]):
        assert length == min(chunk, n) and s + length <= n and s <= lo < hi <= s + length
        if nxt is not None:
            assert nxt[2] == hi  # contiguous
            assert hi - nxt[0] >= overlap // 2 and s + length - hi >= overlap // 2  # margins from both edges


def test_parse_layers():
    assert extract.parse_layers("all", 13) == list(range(13))
    assert extract.parse_layers("6", 13) == [6]
    assert extract.parse_layers("4-8", 13) == [4, 5, 6, 7, 8]
    assert extract.parse_layers("0,12,-1", 13) == [0, 12]
    for bad in ("13", "x", "3-", ""):
        with pytest.raises(ValueError):
            extract.parse_layers(bad, 13)


def test_chunked_output_is_aligned(ckpt, tmp_path):
    """With margins wider than the receptive field, chunked hidden state 0 equals the whole-file one."""
    x = music(24000 * 10 + 777)
    sf.write(tmp_path / "a.wav", x, 24000, subtype="FLOAT")
    assert extract.main([str(tmp_path / "a.wav"), "-o", str(tmp_path / "whole"), "--ckpt", str(ckpt),
                         "--layers", "0", "--chunk", "0"]) == 0
    assert extract.main([str(tmp_path / "a.wav"), "-o", str(tmp_path / "chunked"), "--ckpt", str(ckpt),
                         "--layers", "0", "--chunk", "3", "--overlap", "2", "--batch", "3"]) == 0
    whole, chunked = np.load(tmp_path / "whole" / "a.npy"), np.load(tmp_path / "chunked" / "a.npy")
    assert whole.shape == chunked.shape == (1, (len(x) - 400) // 320 + 1, 256)
    assert np.abs(whole - chunked).max() < 1e-4


def test_batched_files_equal_one_by_one(ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    for i, n in enumerate([30000, 52000, 11000]):
        sf.write(tmp_path / "in" / f"{i}.wav", music(n, seed=i), 24000, subtype="FLOAT")
    assert extract.main([str(tmp_path / "in"), "-o", str(tmp_path / "b1"), "--ckpt", str(ckpt)]) == 0
    assert extract.main([str(tmp_path / "in"), "-o", str(tmp_path / "b3"), "--ckpt", str(ckpt), "--batch", "3"]) == 0
    for i in range(3):
        a, b = np.load(tmp_path / "b1" / f"{i}.npy"), np.load(tmp_path / "b3" / f"{i}.npy")
        assert a.shape == b.shape and a.dtype == np.float32 and np.abs(a - b).max() < 1e-4


def test_pooling(ckpt, tmp_path):
    sf.write(tmp_path / "p.wav", music(40000), 24000)
    args = [str(tmp_path / "p.wav"), "--ckpt", str(ckpt), "--layers", "1-2"]
    assert extract.main(args + ["-o", str(tmp_path / "full")]) == 0
    assert extract.main(args + ["-o", str(tmp_path / "mean"), "--pool", "mean"]) == 0
    assert extract.main(args + ["-o", str(tmp_path / "ms"), "--pool", "meanstd"]) == 0
    full = np.load(tmp_path / "full" / "p.npy")
    mean, ms = np.load(tmp_path / "mean" / "p.npy"), np.load(tmp_path / "ms" / "p.npy")
    assert mean.shape == (2, 256) and ms.shape == (2, 512)
    np.testing.assert_allclose(mean, full.mean(axis=1), atol=1e-5)
    np.testing.assert_allclose(ms[:, 256:], full.std(axis=1), atol=1e-4)


def test_folder_with_bad_files_and_a_long_song(micro_ckpt, tmp_path, capsys):
    """Every good file is written, each bad one named once, exit code 1; a rerun does no re-work."""
    src = tmp_path / "music"
    (src / "album").mkdir(parents=True)
    sf.write(src / "album" / "long.wav", np.tile(music(24000 * 20), 30), 24000, subtype="PCM_16")  # 10 minutes
    sf.write(src / "short44k.flac", music(44100 * 2, sr=44100), 44100)
    (src / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")
    sf.write(src / "empty.wav", np.zeros(0, np.float32), 24000)
    sf.write(src / "tiny.wav", np.zeros(300, np.float32), 24000)
    nan = music(24000)
    nan[100] = np.nan
    sf.write(src / "nan.wav", nan, 24000, subtype="FLOAT")
    out = tmp_path / "feats"
    args = [str(src), "-o", str(out), "--ckpt", str(micro_ckpt), "--layers", "2", "--chunk", "30"]
    assert extract.main(args) == 1
    err = capsys.readouterr().err
    for bad in ("corrupt.wav", "empty.wav", "tiny.wav", "nan.wav"):
        assert sum(bad in line for line in err.splitlines()) == 1, (bad, err)
    long = np.load(out / "album" / "long.npy", mmap_mode="r")
    assert long.shape == (1, (24000 * 600 - 400) // 320 + 1, 32) and np.isfinite(long).all()
    assert np.load(out / "short44k.npy").shape == (1, (48000 - 400) // 320 + 1, 32)
    assert sorted(p.name for p in out.rglob("*")) == ["album", "long.npy", "short44k.npy"]  # no temp files left
    mtime = (out / "short44k.npy").stat().st_mtime_ns
    assert extract.main(args) == 1  # the bad files fail again; the good ones are not recomputed
    assert "2 already there" in capsys.readouterr().err
    assert (out / "short44k.npy").stat().st_mtime_ns == mtime
    assert extract.main(args + ["--overwrite"]) == 1
    assert (out / "short44k.npy").stat().st_mtime_ns != mtime


def test_default_output_beside_input_and_no_default_model(ckpt, tmp_path, monkeypatch, capsys):
    sf.write(tmp_path / "song.wav", music(24000), 24000)
    assert extract.main([str(tmp_path / "song.wav"), "--ckpt", str(ckpt)]) == 0
    assert np.load(tmp_path / "song.npy").shape == (3, 74, 256)
    monkeypatch.setattr(extract, "DEFAULT_CKPT", tmp_path / "absent.pt")
    assert extract.main([str(tmp_path / "song.wav"), "--overwrite"]) == 2
    assert "shipped default model" in capsys.readouterr().err
    assert extract.main([str(tmp_path / "missing.wav"), "--ckpt", str(ckpt)]) == 2
    assert extract.main([str(tmp_path / "song.wav"), "--ckpt", str(ckpt), "--layers", "9"]) == 2


def test_bfloat16_output_is_close_and_float32(ckpt, tmp_path):
    sf.write(tmp_path / "b.wav", music(36000), 24000)
    base = [str(tmp_path / "b.wav"), "--ckpt", str(ckpt), "--layers", "2"]
    assert extract.main(base + ["-o", str(tmp_path / "f32")]) == 0
    assert extract.main(base + ["-o", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    a, b = np.load(tmp_path / "f32" / "b.npy"), np.load(tmp_path / "bf16" / "b.npy")
    assert b.dtype == np.float32 and a.shape == b.shape
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.05


def test_shipped_model_on_the_example_clip(tmp_path):
    """The README's second set-up command: the shipped model, no --ckpt, no network."""
    ckpt = torch.load(extract.DEFAULT_CKPT, weights_only=True)
    assert extract.DEFAULT_CKPT.stat().st_size <= 15_000_000
    assert ckpt["config"]["n_codebooks"] == 0 and ckpt["config"]["cqt_bins"] == 0  # encoder only
    assert ckpt["step"] > 0 and ckpt["train_config"]["teachers"] == "rvq+cqt"  # provenance travels with it
    clip = extract.DEFAULT_CKPT.parent.parent / "examples" / "clip.flac"
    assert extract.main([str(clip), "-o", str(tmp_path)]) == 0
    feats = np.load(tmp_path / "clip.npy")
    cfg = ckpt["config"]
    assert feats.shape == (cfg["n_layers"] + 1, 449, cfg["dim"]) and np.isfinite(feats).all()
    assert feats[1:].std() > 0.1  # a trained model, not zeros
