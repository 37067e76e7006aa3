"""train.py against MERT's official pretraining recipe, point by point: layer drop, padding, noise segments,
length-grouped epoch batches with their context, the global batch, Adam's weight decay, validation batches,
duration sampling, the labels command, the masked fraction. Each test names the official source it holds us to.

Sources: yizhilll/MERT mert_fairseq/models/mert/mert_model.py, mert_fairseq/data/mert_dataset.py,
mert_fairseq/config/pretrain/MERT_RVQ-VAE_CQT_{95M,330M}.yaml, scripts/run_training.sh; fairseq
fairseq/data/data_utils.py (compute_mask_indices), data_utils_fast.pyx (batch_by_size),
fairseq/optim/adam.py, fairseq/criterions/hubert_criterion.py, fairseq/models/wav2vec/wav2vec2.py.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import audio
import rvq
import teachers
import train
from mert import MERT, MERTConfig, compute_mask_indices
from train import mix_noise
from test_train import MICRO

SMALL = dict(dim=32, n_layers=2, n_heads=2, ffn_dim=64, conv_dim=(16,) * 7, pos_conv_groups=4,
             n_codebooks=2, codebook_size=16, final_dim=8, cqt_bins=12)


# -- 8. layerdrop never skips the final LayerNorm of a pre-LN model (wav2vec2.py TransformerEncoder.forward)

def test_layerdrop_keeps_the_final_layer_norm():
    torch.manual_seed(0)
    cfg = MERTConfig(**{**SMALL, "n_codebooks": 0, "cqt_bins": 0}, pre_ln=True, dropout=0.0, attn_dropout=0.0,
                     layerdrop=1.0)  # every layer dropped
    m = MERT(cfg).train()
    with torch.no_grad():
        m.encoder.layer_norm.weight.fill_(2.0)
        m.encoder.layer_norm.bias.fill_(0.5)
        wav = torch.randn(2, 8000)
        x, _, _ = m(wav)
        feats, _ = m._embed(wav, None)
        h = m.feature_projection(feats)
        ref = m.encoder.layer_norm(h + m.encoder.pos_conv_embed(h))  # nothing but the final LayerNorm is left
    assert torch.allclose(x, ref, atol=1e-5)
    m.config.layerdrop = 0.5  # some forwards drop the last layer: all must end in the final LayerNorm
    for s in range(8):
        torch.manual_seed(s)
        with torch.no_grad():
            x, _, _ = m(wav)
        assert torch.allclose(x.mean(-1), torch.full_like(x[..., 0], 0.5), atol=1e-4)
        assert torch.allclose(x.std(-1, unbiased=False), torch.full_like(x[..., 0], 2.0), atol=1e-2)


# -- 4. padding is never masked, labelled, scored, a noise source or part of a statistic

def test_adding_padding_leaves_the_loss_unchanged():
    torch.manual_seed(0)
    m = MERT(MERTConfig(**SMALL, dropout=0.0, attn_dropout=0.0, layerdrop=0.0)).train()
    lens = [24000, 15000]
    g = torch.Generator().manual_seed(1)
    wav = torch.randn(2, 24000, generator=g) * 0.3
    wav[1, lens[1]:] = 0
    T = m.num_frames(24000)
    targets = {"codes": torch.randint(0, 16, (2, 2, T), generator=g), "cqt": torch.rand(2, T, 12, generator=g)}
    mask = compute_mask_indices(2, T, 0.8, 5, 2, lengths=m.num_frames(torch.tensor(lens)).tolist(),
                                rng=np.random.default_rng(0))
    _, loss, parts = m(wav, lengths=lens, targets=targets, mask=mask)
    # the same clips in a longer batch: 1 s more zeros after each, labels of the padding are garbage
    wav2 = torch.cat([wav, torch.zeros(2, 24000)], 1)
    T2 = m.num_frames(48000)
    targets2 = {"codes": torch.cat([targets["codes"], torch.randint(0, 16, (2, 2, T2 - T), generator=g)], 2),
                "cqt": torch.cat([targets["cqt"], 100 * torch.rand(2, T2 - T, 12, generator=g)], 1)}
    mask2 = np.concatenate([mask, np.ones((2, T2 - T), bool)], 1)  # even a mask over the padding is ignored
    _, loss2, parts2 = m(wav2, lengths=lens, targets=targets2, mask=mask2)
    for k in ("features_pen", "ce", "cqt", "mask_frac", "n_masked"):
        assert torch.allclose(parts[k].float(), parts2[k].float(), rtol=1e-5, atol=1e-6), k
    assert torch.allclose(loss, loss2, rtol=1e-5)


# -- 7. in-batch noise (mert_model.py MERTModel.forward and inbatch_noise_augment)

def test_noise_segments_come_from_the_pooled_batch():
    """Segments are cut from the other clips laid end to end (so one may straddle two), never from padding."""
    B, L, sr = 4, 1000, 1000
    wav = torch.stack([torch.full((L,), float(10 ** j)) for j in range(B)])  # clip j is the constant 10^j
    lengths = [L, L, L, 700]
    wav[3, 700:] = 1e9  # padding: must never show up anywhere
    straddles, n_noised, draws = 0, 0, 400
    for s in range(draws):
        out = mix_noise(wav, np.random.default_rng(s), prob=0.5, n_segments=(1, 1), seconds=(0.5, 0.9), sr=sr,
                        lengths=lengths)
        assert torch.equal(out[3, 700:], wav[3, 700:])  # nothing is added to padding either
        for i in range(B):
            added = (out[i, :lengths[i]] - wav[i, :lengths[i]])
            if not added.any():
                continue
            n_noised += 1
            vals = set(added[added != 0].tolist())
            assert float(10 ** i) not in vals and max(vals) < 1e4  # never itself, never padding
            assert 500 <= int((added != 0).sum()) <= 900  # one segment of 0.5-0.9 s, both ends reachable
            straddles += len(vals) > 1  # one segment holding two clips' samples
    assert abs(n_noised / (B * draws) - 0.5) < 0.05  # noise iff rand > mixture_prob = 1 - prob
    assert straddles > 0.2 * n_noised


def test_noise_segment_counts_include_both_ends():
    wav = torch.randn(3, 24000)
    runs = set()
    for s in range(200):
        added = (mix_noise(wav, np.random.default_rng(s), prob=1.0, seconds=(0.0005, 0.001)) - wav) != 0  # 12-24 samples
        for row in added:
            runs.add(int((row[1:] & ~row[:-1]).sum() + row[0]))  # separate segments (overlaps are rare here)
    assert {1, 2, 3} <= runs and max(runs) == 3
    assert torch.equal(mix_noise(wav[:1], np.random.default_rng(0), prob=1.0), wav[:1])  # a lone clip has no pool


# -- 5. sampling: one crop per file per epoch, length-grouped batches cut to their shortest clip


SR = 24000


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Nine files: six of 4 s and three shorter than the 2 s crop (1.9, 1.5 and 1.2 s)."""
    d = tmp_path_factory.mktemp("epoch")
    rng = np.random.default_rng(0)
    for i, sec in enumerate([4, 4, 4, 4, 4, 4, 1.9, 1.5, 1.2]):
        sf.write(d / f"f{i}.wav", (0.1 * rng.standard_normal(int(sec * SR))).astype(np.float32), SR, subtype="FLOAT")
    return d


def test_epoch_batches_read_every_file_once_grouped_by_length(files):
    ds = audio.CropDataset([files], 2 * SR, seed=3, min_seconds=1.0, hop=320)
    eb = audio.EpochBatches(ds, batch_size=4)
    assert eb.per_epoch == 3
    for epoch in range(3):
        keys = [eb.keys(epoch * 3 + j) for j in range(3)]
        items = sorted(it for batch in keys for _, it, _ in batch)
        assert items == list(range(9))  # every file exactly once an epoch
        for batch in keys:
            L = batch[0][2]
            assert all(k[0] == epoch and k[2] == L for k in batch)
            assert L == min(min(ds.length[it], 2 * SR) for _, it, _ in batch)  # cut to the shortest clip
        # longest first: [4 s x 4], [4 s, 4 s, 1.9 s, 1.5 s], [1.2 s]: short files are batched together
        groups = sorted(sorted(it for _, it, _ in batch) for batch in keys)
        assert [8] in groups and any(g[-2:] == [6, 7] for g in groups)
    e0, e1 = ([eb.keys(g) for g in range(e * 3, e * 3 + 3)] for e in range(2))
    assert sorted(sorted(k[1] for k in b) for b in e0) == sorted(sorted(k[1] for k in b) for b in e1)  # fairseq:
    assert [[k[1] for k in b] for b in e0] != [[k[1] for k in b] for b in e1]  # same groups, new order
    assert [ds.example(k)["start"] for b in e0 for k in b] != [ds.example(k)["start"] for b in e1 for k in b]
    # ranks tile the stream; a resumed sampler continues it
    two = [list(audio.EpochBatches(ds, 2, r, 2, num_batches=3)) for r in range(2)]
    one = list(audio.EpochBatches(ds, 2, num_batches=6))
    assert [two[k % 2][k // 2] for k in range(6)] == one
    assert list(audio.EpochBatches(ds, 2, start=4 * 2, num_batches=2)) == one[4:]


def test_epoch_batches_group_files_by_their_whole_length(tmp_path):
    """MERT's ordered_indices sorts by the files' whole lengths, not the crop they give: neighbours share a batch."""
    secs = [3.4, 4.0, 3.1, 3.8, 3.2, 3.6]
    for i, sec in enumerate(secs):
        sf.write(tmp_path / f"g{i}.wav", np.full(int(sec * SR), 0.1, np.float32), SR)
    ds = audio.CropDataset([tmp_path], 2 * SR)  # every file is longer than the crop
    groups = sorted(sorted(secs[k[1]] for k in audio.EpochBatches(ds, 2).keys(g)) for g in range(3))
    assert groups == [[3.1, 3.2], [3.4, 3.6], [3.8, 4.0]]


def test_epoch_examples_have_no_padding_and_start_on_the_frame_grid(files):
    ds = audio.CropDataset([files], 2 * SR, seed=3, min_seconds=1.0, hop=320)
    for batch in audio.make_loader(ds, 4, num_batches=3, sampling="epoch"):
        B, L = batch["audio"].shape
        assert (batch["length"] == L).all() and (batch["left"] == 0).all()  # cut, never padded
        for row in batch["audio"]:
            assert row[-320:].abs().sum() > 0
    ex = [ds.example((0, it, 38400)) for it in range(6)]
    starts = []
    for it, e in enumerate(ex):
        full = audio.load(ds.paths[it])
        hits = [s for s in range(0, len(full) - 38400 + 1, 320) if np.allclose(full[s:s + 38400], e["audio"].numpy())]
        assert len(hits) == 1  # the crop is the file's samples from a multiple of 320 on
        starts.append(hits[0])
    assert len(set(starts)) > 1


def test_examples_carry_their_context(files):
    ds = audio.CropDataset([files], 2 * SR, seed=3, min_seconds=1.0, hop=320, context=(SR, 640))
    seen_short_left = False
    for i in range(40):
        e = ds.example(i)
        _, item, start = ds.crop(i)
        full = audio.load(ds.paths[item])
        left, L = e["left"], e["length"]
        assert left == min(SR, start) and L == min(2 * SR, len(full) - start)
        assert e["right"] == min(640, len(full) - start - L)
        np.testing.assert_allclose(e["audio"][SR - left: SR + L + e["right"]].numpy(),
                                   full[start - left: start + L + e["right"]], atol=1e-6)
        assert not e["audio"][:SR - left].any() and not e["audio"][SR + L + e["right"]:].any()
        seen_short_left |= left < SR
    assert seen_short_left  # crops near a file's start get what context exists
    e = ds.example((1, 2, 30000))
    assert e["audio"].shape == (SR + 30000 + 640,) and e["length"] == 30000


# -- 1. the official global batch, with the accumulation that reaches it on any number of devices


ROOT = Path(__file__).resolve().parents[1]


def test_print_config_shows_the_official_global_batch(capsys, monkeypatch):
    code = ["--teachers", "randproj+cqt"]  # 95m and 330m refuse to run without a named code teacher
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--size", "330m", "--print_config"] + code, cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)
    # MERT_RVQ-VAE_CQT_330M.yaml + run_training.sh: 7 clips of 5.12 s per GPU x 64 GPUs x update_freq 8
    assert c["global_batch"]["clips"] == 3584 and c["micro_batch"] == 7 and c["world_size"] == 1
    assert c["accumulation"] == 512  # one device reaches the same global batch
    assert (c["train"]["lr"], c["train"]["grad_clip"], c["train"]["crop_seconds"]) == (1.5e-3, 1.0, 5.12)
    assert (c["model"]["dim"], c["model"]["n_layers"], c["model"]["final_dim"]) == (1024, 24, 128)
    for world, accum in ((8, 64), (64, 8)):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        assert train.main(["--size", "330m", "--print_config"] + code) == 0
        c = json.loads(capsys.readouterr().out)
        assert (c["accumulation"], c["global_batch"]["clips"]) == (accum, 3584)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert train.main(["--size", "95m", "--print-config"] + code) == 0  # 16 clips of 5 s x 64 GPUs (95M.yaml)
    c = json.loads(capsys.readouterr().out)
    assert (c["global_batch"]["clips"], c["accumulation"], c["train"]["crop_seconds"]) == (1024, 64, 5.0)
    assert train.main(["--size", "95m", "--print_config", "--total_batch_size", "16", "--batch_size", "4"] + code) == 0
    assert json.loads(capsys.readouterr().out)["accumulation"] == 4  # --total_batch_size still overrides
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as e:  # a usage error: one line, exit 2
        train.main(["--size", "330m", "--print_config"] + code)
    assert e.value.code == 2 and "not a multiple" in capsys.readouterr().err


# -- 6. weight decay: fairseq's Adam (decoupled, AdamW-like) on every parameter

def fairseq_adam_step(p, grad, state, lr, betas, eps, wd):
    """One step of fairseq/optim/adam.py Adam.step, transcribed for a single fp32 tensor."""
    state["step"] = state.get("step", 0) + 1
    m = state.setdefault("exp_avg", torch.zeros_like(p)).mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    v = state.setdefault("exp_avg_sq", torch.zeros_like(p)).mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    denom = v.sqrt().add_(eps)
    step_size = lr * (1 - betas[1] ** state["step"]) ** 0.5 / (1 - betas[0] ** state["step"])
    p.add_(p, alpha=-wd * lr)
    p.addcdiv_(m, denom, value=-step_size)


def test_weight_decay_reaches_every_parameter_as_fairseq_adam():
    torch.manual_seed(0)
    m = MERT(MERTConfig(**SMALL))
    tc = train.TrainConfig(lr=1e-2, weight_decay=0.01)
    opt = train.configure_optimizer(m, tc, fused=False)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.01 for p in g["params"]}
    assert decayed == {id(p) for p in m.parameters()}  # biases, norms, label and mask embeddings too
    ref = {n: p.detach().clone() for n, p in m.named_parameters()}
    states = {n: {} for n in ref}
    for _ in range(3):
        for p in m.parameters():
            p.grad = torch.randn_like(p) * 10.0 ** torch.randint(-8, 0, p.shape)  # down to eps
        for n, p in m.named_parameters():
            fairseq_adam_step(ref[n], p.grad, states[n], 1e-2, (tc.beta1, tc.beta2), tc.eps, 0.01)
        train.set_fairseq_eps(opt, tc)
        opt.step()
    for n, p in m.named_parameters():
        assert torch.allclose(p, ref[n], atol=1e-6), n
    ours = train.configure_optimizer(m, train.TrainConfig(decay_matrices_only=True), fused=False)
    no_decay = {id(p) for g in ours.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(m.label_embs) in no_decay and id(m.encoder.layer_norm.weight) in no_decay


# -- 7. validation batches are mixed too; 4. per-clip lengths reach the model, the masks and the noise


def test_validation_batches_are_mixed(files, tmp_path, monkeypatch):
    calls = []
    real = train.mix_noise

    def spy(wav, rng, prob, *a, **k):
        out = real(wav, rng, prob, *a, **k)
        calls.append((torch.is_grad_enabled(), prob, not torch.equal(out, wav)))
        return out

    monkeypatch.setattr(train, "mix_noise", spy)
    train.main(MICRO + ["--data", str(files), "--val_data", str(files), "--out", str(tmp_path / "v"), "--max_steps", "2",
                        "--batch_size", "4", "--eval_interval", "2", "--eval_clips", "8", "--noise_prob", "0.5"])
    val = [c for c in calls if not c[0]]  # evaluate() runs under no_grad
    assert len(val) == 2 and all(p == 0.5 for _, p, _ in val) and any(changed for *_, changed in calls)


def test_duration_sampling_pads_and_passes_lengths(files, tmp_path, monkeypatch):
    seen = []
    real_forward, real_mix = train.MERT.forward, train.mix_noise

    def forward(self, wav, lengths=None, targets=None, mask=None):
        seen.append(("model", wav.shape[1], None if lengths is None else list(lengths), np.asarray(mask)))
        return real_forward(self, wav, lengths=lengths, targets=targets, mask=mask)

    def mix(wav, rng, prob, *a, lengths=None, **k):
        seen.append(("noise", list(lengths)))
        return real_mix(wav, rng, prob, *a, lengths=lengths, **k)

    monkeypatch.setattr(train.MERT, "forward", forward)
    monkeypatch.setattr(train, "mix_noise", mix)
    args = MICRO + ["--data", str(files), "--max_steps", "2", "--batch_size", "4", "--crop_seconds", "4.5"]
    train.main(args + ["--out", str(tmp_path / "d"), "--sampling", "duration"])
    padded = [s for s in seen if s[0] == "model" and s[2] is not None]
    assert padded  # the files (4 s) are shorter than the crop; those under 3 s are not used at all
    for _, L, lengths, mask in padded:
        for b, n in enumerate(lengths):
            assert not mask[b, (n - 400) // 320 + 1:].any()  # padding is never masked
    assert [s[1] for s in seen if s[0] == "noise"] == [s[2] or [s[1]] * 4 for s in seen if s[0] == "model"]
    seen.clear()
    train.main(args + ["--out", str(tmp_path / "e")])  # epoch sampling: batches cut to their shortest clip, no padding
    model_calls = [s for s in seen if s[0] == "model"]
    assert all(s[2] is None and s[1] == 4 * SR for s in model_calls)
    ck = torch.load(tmp_path / "e" / "ckpt.pt", weights_only=True)  # 6 usable files in batches of 4: 2 an epoch
    assert ck["position"] == {"sampling": "epoch", "global_batch": 2, "batch_size": 4, "epoch": 1, "batch_in_epoch": 0}


# -- 3. the codes a crop trains on are the whole file's; `teachers.py labels` prints exactly them


def test_labels_command_prints_what_training_trains_on(files, tmp_path, monkeypatch):
    torch.manual_seed(0)  # an EnCodec-shaped teacher (causal SEANet + LSTM), narrow and random, seeded codebooks
    cfg = dataclasses.replace(rvq.PRESETS["encodec24k"], n_filters=4, n_q=8, bins=64, kmeans_iters=3)
    m = rvq.RVQVAE(cfg).eval()
    with torch.no_grad():
        m.quantizer.init_(m.encoder(torch.from_numpy(audio.load(files / "f0.wav"))[None, None]))
    rvq.save_atomic({"config": dataclasses.asdict(cfg), "model": m.state_dict()}, tmp_path / "rvq.pt")
    seen = {}
    real_prepare, real_teach = train.prepare_batch, teachers.Teachers.forward

    def prepare(batch, context, device):
        seen.setdefault("batches", []).append({k: batch[k].tolist() for k in ("item", "start", "left")})
        seen["context"] = context
        return real_prepare(batch, context, device)

    def teach(self, wav, n_frames, context=None):
        out = real_teach(self, wav, n_frames, context)
        seen.setdefault("codes", []).append(out["codes"])
        return out

    monkeypatch.setattr(train, "prepare_batch", prepare)
    monkeypatch.setattr(teachers.Teachers, "forward", teach)
    # one clip per micro-batch: a batched encode rounds differently and may flip a near-tie (docs/recipe.md)
    train.main(MICRO + ["--data", str(files), "--out", str(tmp_path / "r"), "--max_steps", "2", "--batch_size", "1",
                        "--teachers", "rvq+cqt", "--acoustic_ckpt", str(tmp_path / "rvq.pt"), "--acoustic_context", "1.5"])
    assert seen["context"] == (36160, 0)  # 1.5 s before each crop in whole frames (113), none after (causal)
    ds = audio.CropDataset([files], SR, min_seconds=1.0)
    assert len(seen["batches"]) == 2
    for b, (batch, codes) in enumerate(zip(seen["batches"], seen["codes"])):
        item, start = batch["item"][0], batch["start"][0]
        assert start % 320 == 0 and batch["left"][0] == min(36160, start)
        out = tmp_path / f"labels{b}.npz"
        rc = teachers.main(["labels", ds.paths[item], "--start", str(start / SR), "--seconds", "1.0",
                            "--teachers", "rvq+cqt", "--acoustic_ckpt", str(tmp_path / "rvq.pt"), "--context", "1.5",
                            "--out", str(out)])
        assert rc == 0
        assert np.array_equal(np.load(out)["codes"], codes[0].numpy())


def test_default_run_folder_follows_the_size():
    """Without --out a 330m run must not land in (and, with --resume auto, refuse or continue) runs/tiny."""
    for size in ("tiny", "95m", "330m"):
        tc, _ = train.resolve_configs(["--size", size, "--teachers", "randproj+cqt"], require_data=False)
        assert tc.out == f"runs/{size}"


def test_recipe_measure_masks_reports_the_per_device_masked_fraction():
    """research/recipe_measure.py masks (docs/recipe.md's table): about 0.547 of frames at 8 rows, less at 512."""
    script = Path(__file__).resolve().parents[1] / "research" / "recipe_measure.py"
    out = subprocess.run([sys.executable, str(script), "masks"], check=True, capture_output=True, text=True).stdout
    frac = {int(ln.split(":")[0].split()[1]): float(ln.split("fraction")[1].split()[0])
            for ln in out.splitlines() if ln.startswith("rows")}
    assert abs(frac[8] - 0.547) < 0.004 and frac[512] < frac[64] < frac[8]
