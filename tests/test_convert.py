"""convert.py (and `train.py export`, `train.py --init`): models in and out, against transformers and fairseq.

Export: our checkpoints (a trained tiny run, MERT-v1-95M's and -330M's configs cut to 2 layers, the shipped
model) go through the command line into the Hugging Face MERT-v1 layout; transformers' HubertModel loads the
folder with no missing or unexpected keys and gives extract.py's hidden states (fp32, 1e-4).
--init: a fairseq-layout checkpoint built from known weights (label rows in a shuffled dictionary order, 4
distinguishable special rows) gives the same first-step loss as the same weights in our own checkpoint.
Refusals: an existing export without --overwrite, a missing checkpoint, an output under a file, a full disk,
Ctrl-C: one line each, the right exit code, no temp file left.
"""
import errno
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import audio
import convert
import extract
import mert
import train
from conftest import need, one_line, randomise_
from convert import load_checkpoint, ours_state_to_hf, save_pretrained, write_safetensors
from mert import MERT, MERTConfig, _read_safetensors
from test_mert import fake_fairseq_modules, hf_to_fairseq
from test_train import MICRO, music  # noqa: F401  (music: the module-scoped folder of synthetic tracks)

TOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]


def randomised(cfg: MERTConfig, seed: int) -> MERT:
    """A model with every parameter random, norm weights and biases included, so a dropped one shows."""
    torch.manual_seed(seed)
    return randomise_(MERT(cfg).eval())


def song(path, frames=75, seed=0, x=None):
    """A 24 kHz float WAV (audio.load returns its samples unchanged) of exactly `frames` frames' samples,
    (frames - 1) * 320 + 400: extract.py hands the model the samples up to the last whole frame only, which
    shifts the first conv's GroupNorm statistics on other lengths (issue 17's point 1, extract.py's own)."""
    n = (frames - 1) * 320 + 400
    if x is None:
        rng = np.random.default_rng(seed)
        t = np.arange(n) / 24000
        x = sum(0.3 / h * np.sin(2 * np.pi * 220 * h * t) for h in range(1, 6)) + 0.05 * rng.standard_normal(n)
    sf.write(path, x[:n].astype(np.float32), 24000, subtype="FLOAT")
    return path


def hf_states(folder, wav: np.ndarray):
    """transformers' HubertModel from the exported folder: (hidden_states [n+1, T, d], last_hidden_state [T, d])."""
    transformers = need("transformers")
    hf, info = transformers.HubertModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.dtype == torch.float32 and not hf.training
    with torch.no_grad():
        o = hf(torch.from_numpy(wav)[None], output_hidden_states=True)
    return torch.stack(o.hidden_states)[:, 0], o.last_hidden_state[0], hf.config


def check_export(ckpt, tmp_path, clip):
    """Export ckpt through the CLI, run extract.py on it and transformers on the export; compare; return errors."""
    out = tmp_path / "hf"
    assert convert.main([str(ckpt), str(out), "--format", "hf"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert extract.main([str(clip), "-o", str(tmp_path / "feats"), "--ckpt", str(ckpt)]) == 0
    ours = torch.from_numpy(np.load(tmp_path / "feats" / (clip.stem + ".npy")))  # [n + 1, T, d]
    states, last, cfg = hf_states(out, audio.load(clip))
    n = cfg.num_hidden_layers
    assert ours.shape == states.shape == (n + 1, (len(audio.load(clip)) - 400) // 320 + 1, cfg.hidden_size)
    assert (len(audio.load(clip)) - 400) % 320 == 0
    # States 0..n-1 (the input of layer 1, the outputs of layers 1..n-1) are the same in both conventions. The
    # last: ours (and transformers 4.x) give the final LayerNorm's output for pre-LN models, which is
    # last_hidden_state; transformers 5.x puts layer n's raw output at hidden_states[n] instead. For post-LN
    # models hidden_states[n] is last_hidden_state.
    err = [(ours[i] - states[i]).abs().max().item() for i in range(n)] + [(ours[n] - last).abs().max().item()]
    if not cfg.do_stable_layer_norm:
        assert torch.equal(states[n], last)
    assert max(err) <= TOL, err
    back = MERT.from_pretrained(out)  # our reader takes the folder back, bit for bit
    assert torch.equal(back.extract(torch.from_numpy(audio.load(clip)))[:, 0], ours)
    return out, err


@pytest.mark.parametrize("size", ["95m", "330m"])
def test_export_official_configs_load_in_transformers(size, tmp_path):
    m = randomised(MERTConfig.from_preset(size, n_layers=2), seed=1)  # with pretraining heads: export drops them
    m.save(tmp_path / "ckpt.pt", step=5)
    out, err = check_export(tmp_path / "ckpt.pt", tmp_path, song(tmp_path / "a.wav"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "hubert" and cfg["do_stable_layer_norm"] == (size == "330m")
    assert cfg["sample_rate"] == 24000 and cfg["feature_extractor_cqt"] is False and cfg["deepnorm"] is False
    print(size, "max abs error per state:", err)


def test_export_trained_tiny_run_and_the_shipped_model(music, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    train.main(["--size", "tiny", "--crop_seconds", "1.0", "--teachers", "randproj+cqt", "--num_workers", "0",
                "--batch_size", "2", "--max_steps", "2", "--warmup_steps", "1", "--data", str(music), "--out", str(run)])
    clip = song(tmp_path / "b.wav", frames=100, seed=1)
    _, err = check_export(run / "ckpt.pt", tmp_path / "trained", clip)
    print("trained tiny run, max abs error per state:", err)
    clip = song(tmp_path / "clip.wav", frames=150, x=audio.load(ROOT / "examples" / "clip.flac"))  # its first 2 s
    out, err = check_export(ROOT / "models" / "mert_default.pt", tmp_path / "shipped", clip)
    print("shipped model, max abs error per state:", err)
    transformers = need("transformers")
    assert type(transformers.AutoModel.from_pretrained(out)).__name__ == "HubertModel"  # no remote code
    fe = transformers.Wav2Vec2FeatureExtractor.from_pretrained(out)
    assert fe.sampling_rate == 24000 and fe.do_normalize and fe.return_attention_mask  # as MERT-v1 ships it


def test_export_is_atomic_and_refuses_to_overwrite(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    randomised(MERTConfig.from_preset("tiny", n_layers=1), seed=2).save(ckpt)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert.main([str(ckpt), str(out), "--format", "hf"]) == 2  # one line, before any work
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert convert.main([str(ckpt), str(out), "--format", "hf", "--overwrite", "--dtype", "bfloat16"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left behind
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert convert.main([str(tmp_path / "absent.pt"), str(tmp_path / "x"), "--format", "hf"]) == 2  # a usage error
    assert "absent.pt: no such file" in capsys.readouterr().err


def test_safetensors_writer_reads_back_in_the_real_package(tmp_path):
    st = need("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
               "bf16": torch.randn(2, 3, generator=g).bfloat16(), "f64": torch.randn(2, dtype=torch.float64),
               "i64": torch.arange(5), "i16": torch.arange(3, dtype=torch.int16), "u8": torch.arange(9, dtype=torch.uint8),
               "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5), "empty": torch.empty(0, 4),
               "view": torch.randn(4, 6, generator=g)[:, 1:3]}  # non-contiguous
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors, {"format": "pt"})
    theirs, ours = st.load_file(path), _read_safetensors(path)
    for k, t in tensors.items():
        assert theirs[k].dtype == ours[k].dtype == t.dtype and theirs[k].shape == t.shape, k
        assert torch.equal(theirs[k], t) and torch.equal(ours[k], t), k
    with need("safetensors").safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0


# -- --init ---------------------------------------------------------------------------------------------------


def fairseq_checkpoint(m: MERT, path, monkeypatch, seed=0):
    """m's weights in fairseq MERT's layout: encoder keys as fairseq names them, label_embs_concat with 1,028 rows
    per codebook (4 special rows of their own, then the codes in a shuffled dictionary order), the untied
    final_proj and encoder_cqt_model.fc, the dictionaries pickled in task_state; fairseq itself is not needed."""
    cfg, g = m.config, torch.Generator().manual_seed(seed)
    sd = hf_to_fairseq(ours_state_to_hf(m.state_dict()))
    fake = fake_fairseq_modules(monkeypatch)
    tables, dicts = [], []
    for k in range(cfg.n_codebooks):
        order = torch.randperm(cfg.codebook_size, generator=g)  # dict.*.txt lists codes by count, not by value
        d = fake.Dictionary()
        d.symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [str(int(c)) for c in order]
        d.indices = {s: i for i, s in enumerate(d.symbols)}
        dicts.append(d)
        special = torch.randn(4, cfg.final_dim, generator=g)  # never a target: must not reach the model
        tables.append(torch.cat([special, m.label_embs[k, order].detach()]))
    sd["label_embs_concat"] = torch.cat(tables)
    sd["final_proj.weight"], sd["final_proj.bias"] = m.final_proj.weight.detach(), m.final_proj.bias.detach()
    sd["encoder_cqt_model.fc.weight"], sd["encoder_cqt_model.fc.bias"] = m.cqt_head.weight.detach(), m.cqt_head.bias.detach()
    sd["encoder_cqt_model.spec_layer.cqt_kernels_real"] = torch.randn(cfg.cqt_bins, 1, 16)  # nnAudio's fixed kernels
    model_cfg = fake.DictConfig({
        "_name": "mert", "encoder_embed_dim": cfg.dim, "encoder_layers": cfg.n_layers, "encoder_ffn_embed_dim": cfg.ffn_dim,
        "encoder_attention_heads": cfg.n_heads, "layer_norm_first": cfg.pre_ln, "extractor_mode": "default",
        "conv_feature_layers": f"[({cfg.conv_dim[0]},10,5)] + [({cfg.conv_dim[0]},3,2)] * 4 + [({cfg.conv_dim[0]},2,2)] * 2",
        "conv_pos": cfg.pos_conv_kernel, "conv_pos_groups": cfg.pos_conv_groups, "conv_bias": False,
        "final_dim": cfg.final_dim, "untie_final_proj": True, "audio_cqt_loss_m": True, "audio_cqt_bins": cfg.cqt_bins})
    torch.save({"args": None, "cfg": fake.DictConfig({"model": model_cfg}), "model": sd,
                "task_state": {"dictionaries": dicts}, "optimizer_history": [{"num_updates": 400000}]}, path)
    return path


def first_loss(out, part="loss"):
    steps = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]  # not events
    return steps[0][part]


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """Known weights with the heads the MICRO run's teachers need (randproj 8 x 1024 codes, 336 CQT bins)."""
    cfg = train.MERTConfig.from_preset("tiny", dim=32, n_layers=2, n_heads=2, ffn_dim=64, conv_dim=(16,) * 7,
                                       pos_conv_groups=4, final_dim=8, n_codebooks=8, codebook_size=1024, cqt_bins=336)
    m = randomised(cfg, seed=3)
    d = tmp_path_factory.mktemp("known")
    m.save(d / "ours.pt")
    return m, d


def test_init_from_fairseq_equals_the_same_weights_loaded_directly(known, music, tmp_path, monkeypatch, capsys):  # noqa: F811
    m, d = known
    fs = fairseq_checkpoint(m, tmp_path / "MERT-fairseq.pt", monkeypatch)
    cfg, state, _ = load_checkpoint(fs, for_training=True)
    assert (cfg.n_codebooks, cfg.codebook_size, cfg.final_dim, cfg.cqt_bins) == (8, 1024, 8, 336)
    assert torch.equal(state["label_embs"], m.label_embs.detach())  # rows gathered through the dictionaries
    base = MICRO + ["--data", str(music), "--max_steps", "1", "--batch_size", "2"]
    train.main(base + ["--init", str(d / "ours.pt"), "--out", str(tmp_path / "direct")])
    capsys.readouterr()
    train.main(base + ["--init", str(fs), "--out", str(tmp_path / "fairseq")])
    log = capsys.readouterr().out
    assert "loaded encoder, code heads (8 x 1024 codes, final_dim 8), CQT head (336 bins); fresh (not in the source): nothing" in log
    direct, fairseq = first_loss(tmp_path / "direct"), first_loss(tmp_path / "fairseq")
    assert abs(direct - fairseq) <= 1e-6 * abs(direct), (direct, fairseq)
    ck = torch.load(tmp_path / "fairseq" / "ckpt.pt", weights_only=True)
    assert ck["train_config"]["init"] == str(fs)  # the run records where it started


def test_init_from_hf_folder_is_encoder_only_and_resume_wins(known, music, tmp_path, capsys):  # noqa: F811
    m, d = known
    save_pretrained(m, tmp_path / "hf")
    m.save(tmp_path / "enc.pt", heads=False)  # the same encoder, no heads, in our format
    base = MICRO + ["--data", str(music), "--max_steps", "1", "--batch_size", "2"]
    train.main(base + ["--init", str(tmp_path / "hf"), "--out", str(tmp_path / "a")])
    log = capsys.readouterr().out
    assert "loaded encoder; fresh (not in the source): code heads (8 x 1024 codes, final_dim 8), CQT head (336 bins)" in log
    train.main(base + ["--init", str(tmp_path / "enc.pt"), "--out", str(tmp_path / "b")])
    train.main(base + ["--out", str(tmp_path / "c")])  # no --init
    # the same encoder and the same fresh heads (from the run's seed) as from our encoder-only checkpoint ...
    assert first_loss(tmp_path / "a") == pytest.approx(first_loss(tmp_path / "b"), rel=1e-6)
    # ... and the encoder is the known one, not a fresh one: the conv features' penalty differs from a fresh run's
    pen = [first_loss(tmp_path / r, "features_pen") for r in "abc"]
    assert pen[0] == pytest.approx(pen[1], rel=1e-6) and pen[0] != pytest.approx(pen[2], rel=1e-2), pen
    capsys.readouterr()
    before = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    train.main(base + ["--init", str(d / "ours.pt"), "--out", str(tmp_path / "a"), "--resume", "--max_steps", "2"])
    assert "--init" in capsys.readouterr().out  # said it ignores --init
    after = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert after["step"] == 2 and not torch.equal(after["model"]["label_embs"], m.label_embs.detach())
    assert after["model"]["label_embs"].shape == before["label_embs"].shape


def test_init_that_does_not_fit_the_teachers_stops_with_one_line(known, music, tmp_path, monkeypatch,  # noqa: F811
                                                                 capsys):
    m, d = known
    fs = fairseq_checkpoint(m, tmp_path / "MERT-fairseq.pt", monkeypatch)
    base = MICRO + ["--data", str(music), "--max_steps", "1", "--batch_size", "2", "--out", str(tmp_path / "x")]

    def refused(argv, pattern):  # a usage error: exit 2, the reason as the last line on stderr
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err and re.search(pattern, err[-1]), err

    refused(base + ["--init", str(fs), "--n_q", "4"], r"does not fit --teachers randproj\+cqt: it has code heads for "
                                                      r"8 codebooks x 1024 codes, the teachers give 4 x 1024$")
    refused(base + ["--init", str(d / "ours.pt"), "--teachers", "randproj"],
            r"a CQT head of 336 bins, the teachers give 0$")
    refused(base + ["--init", str(fs), "--n_layers", "3"], r"--n_layers 3 \(source: 2\) contradicts it")
    assert not (tmp_path / "x" / "ckpt.pt").exists()


def test_fairseq_code_missing_from_its_dictionary_takes_the_unk_row(known, tmp_path, monkeypatch):
    m, _ = known
    path = fairseq_checkpoint(m, tmp_path / "fs.pt", monkeypatch)
    ck = torch.load(path, weights_only=False)
    d = ck["task_state"]["dictionaries"][2]
    gone = d.symbols.index("7")
    rows = [i for i in range(len(d.symbols)) if i != gone]  # code 7 never made it into dict.*.txt
    start = 2 * 1028
    table = ck["model"]["label_embs_concat"]
    ck["model"]["label_embs_concat"] = torch.cat([table[:start], table[start:start + 1028][rows], table[start + 1028:]])
    d.symbols = [d.symbols[i] for i in rows]
    torch.save(ck, path)
    _, state, _ = load_checkpoint(path, for_training=True)
    want = m.label_embs.detach().clone()
    want[2, 7] = table[start + 3]  # fairseq encoded the label "7" as <unk>, row 3
    assert torch.equal(state["label_embs"], want)


# -- convert.py's command line; fairseq files through extract.py ----------------------------------------------


def test_convert_cli_writes_pt_and_hf_and_reads_fairseq(known, tmp_path, monkeypatch):
    """`python convert.py` as a user runs it: a fairseq .pt to ours, ours to a Hugging Face folder, a bad input."""
    m, d = known
    fs = fairseq_checkpoint(m, tmp_path / "MERT-fairseq.pt", monkeypatch)
    clip = song(tmp_path / "a.wav", frames=40)
    want = m.extract(torch.from_numpy(audio.load(clip)))[:, 0]

    def cli(*args):
        return subprocess.run([sys.executable, str(ROOT / "convert.py"), *map(str, args)], capture_output=True,
                              text=True, cwd=tmp_path)

    r = cli(fs, tmp_path / "enc.pt", "--dtype", "float32")  # fairseq needs no package: its classes stay inert
    assert r.returncode == 0 and r.stdout.startswith(f"convert.py: {tmp_path / 'enc.pt'} ("), r.stdout + r.stderr
    enc = MERT.from_pretrained(tmp_path / "enc.pt")
    assert enc.config.n_codebooks == 0 and torch.equal(enc.extract(torch.from_numpy(audio.load(clip)))[:, 0], want)
    r = cli(d / "ours.pt", tmp_path / "hf", "--format", "hf")
    assert r.returncode == 0 and "Hugging Face MERT-v1 layout" in r.stdout, r.stdout + r.stderr
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors",
                                                                    "preprocessor_config.json"]
    assert torch.equal(MERT.from_pretrained(tmp_path / "hf").extract(torch.from_numpy(audio.load(clip)))[:, 0], want)
    r = cli(tmp_path / "absent.pt", tmp_path / "x.pt")
    assert r.returncode == 2 and r.stderr == f"convert.py: {tmp_path / 'absent.pt'}: no such file or folder\n"
    assert not (tmp_path / "x.pt").exists()
    # extract.py reads the fairseq file itself (through convert.py) and gives the known weights' features
    assert extract.main([str(clip), "-o", str(tmp_path / "feats"), "--ckpt", str(fs)]) == 0
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "feats" / "a.npy")), want)


@pytest.mark.usefixtures("one_thread")  # last in the file: one_thread holds from here to the module's end
def test_export_refuses_to_replace_names_bad_places_and_leaves_no_temp_file(micro_ckpt, tmp_path, monkeypatch, capsys):
    """Why: `train.py export ckpt.pt mine.pt` silently replaced an existing export; an export under a file or onto
    a full disk gave a traceback and left mine.pt.tmp; a missing checkpoint exited 1. Now one line each: exit 2
    for the flags, 1 for the full disk, 130 for Ctrl-C, and no temp file."""
    ck, mine = str(micro_ckpt), tmp_path / "mine.pt"
    assert train.main(["export", ck, str(mine)]) == 0
    before = mine.read_bytes()
    (tmp_path / "file.txt").write_text("x")
    for argv, named in (([ck, str(mine)], "--overwrite"),
                        ([str(tmp_path / "nope.pt"), str(tmp_path / "b.pt")], "nope.pt"),
                        ([ck, str(tmp_path / "file.txt" / "m.pt")], "file.txt")):
        assert train.main(["export"] + argv) == 2, argv
        assert named in one_line(capsys.readouterr().err)
    assert mine.read_bytes() == before
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # writes part of the file, then the disk is full
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(mert.torch, "save", full_disk)
    assert convert.main([ck, str(mine), "--overwrite"]) == 1
    assert "No space left" in one_line(capsys.readouterr().err)

    def ctrl_c(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(mert.torch, "save", ctrl_c)
    assert convert.main([ck, str(tmp_path / "c.pt")]) == 130
    assert "interrupted" in one_line(capsys.readouterr().err)
    monkeypatch.setattr(mert.torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "mine.pt"] and mine.read_bytes() == before
    assert convert.main([ck, str(mine), "--overwrite"]) == 0
