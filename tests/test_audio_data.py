"""audio.py training data: crops that only read their region, CropDataset, RankBatches/make_loader, prepare
(and its refusals: nothing to prepare, an unwritable --out, Ctrl-C).

Every fixture file is a few seconds long so that the whole file runs in seconds on a CPU.
"""
import json
import multiprocessing
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

import audio
from audio import AudioError, CropDataset, RankBatches, load, load_crop, make_loader, prepare
from conftest import one_line

SR = 24000
CROP = 2 * SR  # 2 s crops: small, and some fixture files are shorter than that
LSB = 1 / 32768


def noise(sr, seconds, channels=1, seed=0, amp=0.2):
    """Gaussian noise [frames, channels] (full band: the hardest case for crop/whole-file equality)."""
    rng = np.random.default_rng(seed)
    return (amp * rng.standard_normal((int(round(seconds * sr)), channels))).astype(np.float32)


# (name, rate, channels, seconds, soundfile kwargs): mixed formats, rates and channel counts
MIXED = [
    ("a.wav", 44100, 2, 5.0, dict(subtype="FLOAT")),
    ("b.flac", 22050, 1, 4.0, {}),
    ("c.mp3", 48000, 2, 4.5, {}),
    ("d.ogg", 24000, 1, 3.5, {}),
    ("sub/e.wav", 16000, 1, 6.0, dict(subtype="PCM_16")),
    ("short.wav", 44100, 1, 2.5, {}),          # under 3 s: skipped
]


def make_collection(root, with_bad=True):
    for k, (name, sr, ch, sec, kw) in enumerate(MIXED):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(p, noise(sr, sec, ch, seed=k), sr, **kw)
    if with_bad:
        (root / "broken.wav").write_bytes(b"RIFF\x00\x00garbage" + bytes(range(256)) * 4)
    return root


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return make_collection(tmp_path_factory.mktemp("music"))


@pytest.fixture(scope="module")
def shards(collection, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "s"
    summary = prepare([collection], out, on_bad=lambda msg: None, progress=False)
    assert summary["files"] == 5 and summary["short"] == 1 and len(summary["bad"]) == 1
    return out


def quiet(msgs=None):
    return (lambda m: None) if msgs is None else msgs.append


# ---------------------------------------------------------------------------------------------
# load_crop: the region read equals the same slice of the whole-file resample
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sr,channels", [(44100, 2), (22050, 1), (48000, 2), (16000, 1), (24000, 2), (44101, 1)])
def test_load_crop_equals_slice_of_load(tmp_path, sr, channels):
    path = tmp_path / "x.wav"
    sf.write(path, noise(sr, 1.5, channels), sr, subtype="FLOAT")
    full = load(path)
    n = len(full)
    for start, length in [(0, 5000), (1, 5000), (79, 3000), (80, 3000), (12345, 9000), (n - 4000, 4000),
                          (n - 100, 5000), (n - 1, 1), (0, n), (n, 10)]:
        got = load_crop(path, start, length)
        ref = full[start:start + length]
        assert got.dtype == np.float32 and got.shape == ref.shape, (start, length)
        np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


def test_load_crop_of_compressed_formats(collection):
    for name in ["b.flac", "c.mp3", "d.ogg"]:
        full = load(collection / name)
        np.testing.assert_allclose(load_crop(collection / name, 20000, 30000), full[20000:50000], atol=1e-6)


def test_load_crop_errors(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        load_crop(tmp_path / "nope.wav", 0, 10)
    (tmp_path / "junk.wav").write_bytes(b"junk" * 100)
    with pytest.raises(AudioError, match="unreadable"):
        load_crop(tmp_path / "junk.wav", 0, 10)
    with pytest.raises(ValueError):
        load_crop(tmp_path / "nope.wav", -1, 10)


# ---------------------------------------------------------------------------------------------
# CropDataset
# ---------------------------------------------------------------------------------------------
def test_crops_are_deterministic_finite_and_of_the_right_length(collection):
    msgs = []
    a = CropDataset([collection], CROP, seed=5, on_bad=msgs.append)
    b = CropDataset([collection], CROP, seed=5, on_bad=quiet())
    c = CropDataset([collection], CROP, seed=6, on_bad=quiet())
    assert a.n_files == 5 and a.skipped_short == 1
    xs = [a[i] for i in range(12)]
    for i, x in enumerate(xs):
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (CROP,)
        assert torch.isfinite(x).all() and x.abs().max() > 0
        assert torch.equal(x, b[i])                   # same (seed, index): same crop, other instance
    assert torch.equal(a[7], xs[7])                   # and again, out of order
    assert not all(torch.equal(x, c[i]) for i, x in enumerate(xs))
    # the corrupt file is named exactly once, whatever is read
    assert len(msgs) == 1 and msgs[0].startswith(str(collection / "broken.wav") + ": ")
    assert a.bad_files == {str(collection / "broken.wav")}


def test_crops_match_the_whole_file_and_never_come_from_short_files(collection):
    ds = CropDataset([collection], CROP, seed=1, on_bad=quiet())
    files = [str(collection / n) for n, *_ in MIXED]
    used = set()
    for i in range(40):
        x, item, start = ds.crop(i)
        path = ds.paths[ds.ref[item]]
        used.add(path)
        full = load(path)
        ref = np.zeros(CROP, np.float32)
        ref[:len(full[start:start + CROP])] = full[start:start + CROP]   # short files: zeros at the end
        np.testing.assert_allclose(x, ref, atol=1e-6)
        assert 0 <= start <= max(0, len(full) - CROP)
    assert files[-1] not in used                      # the 2.5 s file
    assert used == set(files[:-1])                    # 40 draws reach every usable file


def test_files_shorter_than_the_crop_are_zero_padded(collection):
    ds = CropDataset([collection / "d.ogg"], 5 * SR)   # 3.5 s file, 5 s crop
    x, _, start = ds.crop(0)
    full = load(collection / "d.ogg")
    assert start == 0 and x.shape == (5 * SR,)
    np.testing.assert_allclose(x[:len(full)], full, atol=1e-6)
    assert not x[len(full):].any()


def test_default_bad_file_report_goes_to_stderr_once(collection, capsys):
    ds = CropDataset([collection], CROP, seed=0)
    for i in range(5):
        ds[i]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(collection / "broken.wav") in err[0] and "unreadable" in err[0]


def test_failed_crop_reads_redraw_and_do_not_depend_on_history(tmp_path):
    # Files that pass the header scan but fail when read later: a crop that hits one redraws from
    # the same generator, so ds[i] is the same whether or not this instance saw the failure before.
    root = tmp_path / "m"
    root.mkdir()
    for k in range(4):
        sf.write(root / f"{k}.wav", noise(SR, 3 + k, seed=k), SR)
    fwd = CropDataset([root], CROP, seed=2, on_bad=quiet())
    msgs = []
    rev = CropDataset([root], CROP, seed=2, on_bad=msgs.append)
    (root / "2.wav").write_bytes(b"gone")            # corrupt after the scan
    idx = list(range(30))
    a = {i: fwd[i] for i in idx}
    b = {i: rev[i] for i in reversed(idx)}
    assert all(torch.equal(a[i], b[i]) for i in idx)
    assert len(msgs) == 1 and str(root / "2.wav") in msgs[0]
    assert all(fwd.paths[fwd.ref[fwd.crop(i)[1]]] != str(root / "2.wav") for i in idx)


def test_uniform_file_weighting(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    sf.write(root / "long.wav", noise(SR, 60), SR)
    sf.write(root / "short.wav", noise(SR, 3), SR)
    count = lambda w: sum(CropDataset([root], SR, weight=w).crop(i)[1] == 1 for i in range(400))
    assert count("duration") < 60 < 140 < count("file")   # 3/63 of 400 ~ 19; 1/2 of 400 = 200


def test_manifest(collection, tmp_path):
    lst = tmp_path / "lists" / "train.tsv"
    lst.parent.mkdir()
    # a path relative to the manifest's folder (with a sample-count column), an absolute one,
    # a missing one, a comment and a blank line
    rel = os.path.relpath(collection / "a.wav", lst.parent)
    lst.write_text(f"# train split\n{rel}\t220500\n\n{collection / 'b.flac'}\n{collection / 'missing.wav'}\n")
    assert audio.read_manifest(lst) == [lst.parent / rel, collection / "b.flac", collection / "missing.wav"]
    msgs = []
    ds = CropDataset([lst], CROP, on_bad=msgs.append)
    assert ds.n_files == 2 and len(msgs) == 1 and "missing.wav: no such file" in msgs[0]
    # fairseq/wav2vec style: the first line is the root folder
    fs = tmp_path / "fairseq.tsv"
    fs.write_text(f"{collection}\na.wav\t220500\nsub/e.wav\t96000\n")
    assert audio.read_manifest(fs) == [collection / "a.wav", collection / "sub/e.wav"]
    assert CropDataset([fs], CROP).n_files == 2


def test_bad_arguments_and_empty_collections(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        CropDataset([tmp_path / "nowhere"], CROP)
    sf.write(tmp_path / "tiny.wav", noise(SR, 1.0), SR)
    with pytest.raises(AudioError, match="no usable audio"):
        CropDataset([tmp_path], CROP)
    for bad in [dict(crop_samples=0), dict(crop_samples=CROP, seed=-1), dict(crop_samples=CROP, weight="x")]:
        with pytest.raises(ValueError):
            CropDataset([tmp_path], **bad)
    ds = CropDataset([tmp_path], CROP, min_seconds=0.5)
    with pytest.raises(IndexError):
        ds[-1]


# ---------------------------------------------------------------------------------------------
# prepare and the shard source
# ---------------------------------------------------------------------------------------------
def test_shards_hold_the_int16_of_load(collection, shards):
    index = json.loads((shards / "index.json").read_text())
    assert index["format"] == audio.SHARD_FORMAT and index["sample_rate"] == SR and index["scale"] == 32768
    assert [e[0] for e in index["files"]] == [str(collection / n) for n, *_ in MIXED[:-1]]  # find_audio order
    # the reference load() runs where prepare converts: a worker with one BLAS thread (the resampler's float32
    # matmuls round differently under other thread counts on some CPUs, e.g. AVX2 OpenBLAS)
    with multiprocessing.get_context().Pool(1, initializer=audio._prepare_worker_init) as pool:
        refs = pool.map(load, [e[0] for e in index["files"]])
    for (source, shard, offset, length, clipped), ref in zip(index["files"], refs):
        data = np.memmap(shards / index["shards"][shard], dtype="<i2", mode="r")[offset:offset + length]
        assert length == len(ref) and clipped == 0
        assert np.abs(data / 32768 - ref).max() <= 0.5 * LSB + 1e-7


def test_raw_and_shard_crops_agree(collection, shards):
    raw = CropDataset([collection], CROP, seed=9, on_bad=quiet())
    sh = CropDataset([shards], CROP, seed=9)
    assert sh.n_files == raw.n_files and np.array_equal(sh.length, raw.length)
    for i in range(25):
        (x, item_x, start_x), (y, item_y, start_y) = raw.crop(i), sh.crop(i)
        assert (item_x, start_x) == (item_y, start_y)
        assert np.abs(x - y).max() <= 0.5 * LSB + 1e-6          # int16 quantisation only


def test_prepare_cli_end_to_end(collection, tmp_path, capsys):
    out = tmp_path / "s"
    # tiny shards (0.2 MB = 4.2 s): several shards, a file is never split
    assert audio.main(["prepare", str(collection), "--out", str(out), "--shard-gb", "0.0002", "--workers", "2"]) == 1
    captured = capsys.readouterr()
    assert "5 files" in captured.out and "1 unreadable" in captured.out and "1 under 3 s" in captured.out
    bad_lines = [ln for ln in captured.err.splitlines() if "broken.wav" in ln]
    assert len(bad_lines) == 1
    index = json.loads((out / "index.json").read_text())
    assert len(index["shards"]) == 5 and sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json"] + [f"shard-{k:05d}.{ext}" for k in range(5) for ext in ("bin", "json")])
    for name in index["shards"]:
        ends = [e[2] + e[3] for e in index["files"] if index["shards"][e[1]] == name]
        assert (out / name).stat().st_size == 2 * max(ends)

    # the same shards whatever the number of workers
    one = tmp_path / "one"
    prepare([collection], one, shard_bytes=200_000, on_bad=quiet(), progress=False)
    assert json.loads((one / "index.json").read_text())["files"] == index["files"]
    assert all((one / n).read_bytes() == (out / n).read_bytes() for n in index["shards"])

    # a re-run after a crash: leftovers removed, finished shards kept, new files appended
    (out / "shard-00005.bin.tmp").write_bytes(b"partial")
    (out / "index.json").unlink()
    sf.write(tmp_path / "extra.wav", noise(SR, 3.2, seed=42), SR)
    s = prepare([collection, tmp_path / "extra.wav"], out, shard_bytes=200_000, on_bad=quiet(),
                progress=False)
    assert s["new"] == 1 and s["files"] == 6 and s["shards"] == 6
    again = json.loads((out / "index.json").read_text())
    assert again["files"][:5] == index["files"] and again["files"][5][0].endswith("extra.wav")
    assert not list(out.glob("*.tmp"))
    assert CropDataset([out], CROP).n_files == 6
    # usage errors exit 2
    with pytest.raises(SystemExit) as e:
        audio.main(["prepare", str(collection)])
    assert e.value.code == 2


def test_prepare_clips_to_int16(tmp_path):
    src = tmp_path / "hot.wav"
    x = noise(SR, 3.5, amp=0.2)
    x[1000:1010] = 1.5
    x[2000] = -1.2
    sf.write(src, x, SR, subtype="FLOAT")
    s = prepare([src], tmp_path / "s", progress=False)
    entry = json.loads((tmp_path / "s" / "index.json").read_text())["files"][0]
    assert s["clipped_files"] == 1 and entry[4] == 11
    data = np.fromfile(tmp_path / "s" / "shard-00000.bin", dtype="<i2")
    assert data[1000:1010].tolist() == [32767] * 10 and data[2000] == -32768
    np.testing.assert_array_equal(data[:1000], np.clip(np.rint(x[:1000, 0] * 32768), -32768, 32767))


def test_missing_shard_file_is_bad_not_fatal(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    with open(copy / "shard-00000.bin", "r+b") as f:
        f.truncate(100)
    sf.write(tmp_path / "ok.wav", noise(SR, 4), SR)
    msgs = []
    ds = CropDataset([copy, tmp_path / "ok.wav"], CROP, on_bad=msgs.append)   # shards and files mixed
    assert ds.n_files == 1 and len(msgs) == 1 and "truncated shard" in msgs[0]
    assert ds[0].shape == (CROP,)


# ---------------------------------------------------------------------------------------------
# RankBatches / make_loader: which rank reads what, and resuming
# ---------------------------------------------------------------------------------------------
def test_rank_batches_tile_the_global_sequence():
    b, W, K = 3, 4, 5
    per_rank = [list(RankBatches(b, r, W, num_batches=K)) for r in range(W)]
    for k in range(K):
        block = [i for r in range(W) for i in per_rank[r][k]]
        assert block == list(range(k * W * b, (k + 1) * W * b))   # contiguous, each index once
    # resume at a step boundary: the same remaining stream on every rank
    for r in range(W):
        resumed = list(RankBatches(b, r, W, start=2 * W * b, num_batches=K - 2))
        assert resumed == per_rank[r][2:]
    assert len(RankBatches(b, 0, 1, num_batches=7)) == 7
    endless = iter(RankBatches(2, 1, 2))
    assert [next(endless) for _ in range(2)] == [[2, 3], [6, 7]]
    with pytest.raises(ValueError):
        RankBatches(2, 2, 2)


def test_loader_with_workers_and_resume(collection, shards):
    ds = CropDataset([shards], CROP, seed=4)
    full = list(make_loader(ds, batch_size=3, num_batches=4, num_workers=2))
    assert all(x.shape == (3, CROP) and x.dtype == torch.float32 for x in full)
    assert torch.equal(full[1], torch.stack([ds[i] for i in range(3, 6)]))
    resumed = list(make_loader(ds, batch_size=3, start=6, num_batches=2))   # in-process, no workers
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[2:]))
    # rank 1 of 2 reads the second half of each block of 6
    r1 = list(make_loader(ds, batch_size=3, rank=1, world_size=2, num_batches=2))
    assert torch.equal(r1[0], full[1]) and torch.equal(r1[1], full[3])


def _threads_after_worker_init(_):
    audio.worker_init(0)
    from threadpoolctl import threadpool_info
    return torch.get_num_threads(), [p["num_threads"] for p in threadpool_info()]


def test_worker_init_limits_threads():
    pytest.importorskip("threadpoolctl", reason="only used here to read the BLAS thread count")
    with multiprocessing.get_context("fork").Pool(1) as pool:   # a child, as a DataLoader worker is
        torch_threads, blas_threads = pool.apply(_threads_after_worker_init, (0,))
    assert torch_threads == 1 and all(n == 1 for n in blas_threads)


@pytest.mark.usefixtures("one_thread")  # last in the file: one_thread holds from here to the module's end
def test_prepare_refuses_in_one_line_before_any_work(sine_clip, tmp_path, monkeypatch, capsys):
    """Why: `audio.py prepare emptydir` exited 0 having made nothing. Now each refusal is one line naming the flag
    or folder, before any work."""
    bad, clip = tmp_path / "notes.txt", str(sine_clip)
    bad.write_text("not a checkpoint\n")
    (tmp_path / "empty").mkdir()
    cases = [(["prepare", str(tmp_path / "empty"), "--out", str(tmp_path / "shards")], 1, "no audio files"),
             (["prepare", clip, "--out", str(bad / "shards")], 2, "--out")]
    for argv, code, named in cases:
        assert audio.main(argv) == code, argv
        assert named in one_line(capsys.readouterr().err), argv
    assert not (tmp_path / "shards").exists()

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(audio, "_expand_sources", ctrl_c)
    assert audio.main(["prepare", clip, "--out", str(tmp_path / "s2")]) == 130
    for line in capsys.readouterr().err.splitlines():
        assert "Traceback" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes.txt"]
