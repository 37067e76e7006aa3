"""The masked-prediction loss in mert.py: fairseq's masking, the NCE equivalence, noise mixing (train.py's
mix_noise), learning."""
import numpy as np
import torch
import torch.nn.functional as F

from mert import MERT, MERTConfig, compute_mask_indices
from train import mix_noise


def fairseq_reference_masks(B, T, p, L, min_masks, lengths, rng):
    """fairseq's compute_mask_indices (static lengths, no_overlap=False, require_same_masks=True, ver 2),
    transcribed step by step from its published algorithm as an independent reference."""
    idcs = []
    for b in range(B):
        sz = lengths[b]
        num_mask = max(min_masks, int(p * sz / float(L) + rng.random()))
        lens = np.full(num_mask, L)
        min_len = min(lens)
        if sz - min_len <= num_mask:
            min_len = sz - num_mask - 1
        mask_idc = rng.choice(sz - min_len, num_mask, replace=False)
        mask_idc = np.asarray([mask_idc[j] + off for j in range(len(mask_idc)) for off in range(lens[j])])
        idcs.append(np.unique(mask_idc[mask_idc < sz]))
    target = min(len(m) for m in idcs)
    mask = np.zeros((B, T), bool)
    for b, m in enumerate(idcs):
        if len(m) > target:
            m = rng.choice(m, target, replace=False)
        mask[b, m] = True
    return mask


def test_mask_statistics_match_fairseq():
    B, T, runs = 8, 374, 300
    lengths = [374, 374, 300, 374, 200, 374, 374, 350]
    ours = np.stack([compute_mask_indices(B, T, 0.8, 5, 2, lengths=lengths, rng=np.random.default_rng(s))
                     for s in range(runs)])
    ref = np.stack([fairseq_reference_masks(B, T, 0.8, 5, 2, lengths, np.random.default_rng(10_000 + s))
                    for s in range(runs)])
    # identical algorithm -> identical draws for the same generator state
    assert np.array_equal(compute_mask_indices(B, T, 0.8, 5, 2, lengths=lengths, rng=np.random.default_rng(7)),
                          fairseq_reference_masks(B, T, 0.8, 5, 2, lengths, np.random.default_rng(7)))
    for m in (ours, ref):
        counts = m.sum(-1)
        assert (counts == counts[:, :1]).all()  # every row masks the same number of frames
        for b, n in enumerate(lengths):
            assert not m[:, b, n:].any()  # never a padded frame
    full = ours[:, [0, 1, 3, 5, 6]].mean()
    assert abs(ours.sum(-1).mean() - ref.sum(-1).mean()) < 1.0
    # a 5 s crop with 0.8 / 5: about 55-58% of frames masked (design.md)
    single = np.mean([compute_mask_indices(1, 374, 0.8, 5, 2, rng=np.random.default_rng(s)).mean() for s in range(300)])
    assert 0.53 < single < 0.60, single
    assert full < single  # batches shrink to the smallest row's count


def test_matmul_loss_equals_fairseq_nce():
    """CE over cosine logits (one matmul) equals HuBERT's positive/negative NCE with all codes as candidates."""
    torch.manual_seed(0)
    cfg = MERTConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, conv_dim=(16,) * 7, pos_conv_groups=4,
                     n_codebooks=3, codebook_size=50, final_dim=8, cqt_bins=0)
    m = MERT(cfg)
    x = torch.randn(40, 32)
    codes = torch.randint(0, 50, (40, 3))
    ours = m.code_loss(x, codes)
    proj = m.final_proj(x).view(40, 3, 8)
    for k in range(3):
        embs = m.label_embs[k]  # (V, F)
        pos = embs[codes[:, k]]  # (N, F)
        negs = embs[None].expand(40, -1, -1).transpose(0, 1)  # (V, N, F): every code is a negative
        neg_is_pos = (pos[None] == negs).all(-1)
        cands = torch.cat([pos[None], negs], 0)  # (V + 1, N, F)
        logits = torch.cosine_similarity(proj[:, k][None], cands, dim=-1) / 0.1
        logits[1:][neg_is_pos] = float("-inf")
        nce = F.cross_entropy(logits.t(), torch.zeros(40, dtype=torch.long))
        assert torch.allclose(ours[k], nce, atol=1e-5), (k, ours[k].item(), nce.item())


def test_noise_mixture():
    wav = torch.randn(4, 24000)
    mixed = mix_noise(wav, np.random.default_rng(0), prob=1.0, seconds=(0.1, 0.2))
    assert not torch.equal(mixed, wav) and torch.equal(wav, wav.clone())
    diff = (mixed - wav).abs().sum(1) > 0
    assert diff.all()  # prob 1: every clip got noise
    again = mix_noise(wav, np.random.default_rng(0), prob=1.0, seconds=(0.1, 0.2))
    assert torch.equal(mixed, again)
    assert torch.equal(mix_noise(wav, np.random.default_rng(0), prob=0.0), wav)
    changed = ((mixed - wav).abs() > 0).float().sum(1) / 24000
    assert (changed <= 3 * 0.2 + 1e-6).all()  # at most 3 segments of at most 0.2 s


def test_loss_parts_and_padding():
    torch.manual_seed(0)
    cfg = MERTConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, conv_dim=(16,) * 7, pos_conv_groups=4,
                     n_codebooks=2, codebook_size=16, final_dim=8, cqt_bins=12)
    m = MERT(cfg)
    wav = torch.randn(2, 24000)
    T = m.num_frames(24000)
    targets = {"codes": torch.randint(0, 16, (2, 2, T + 1)), "cqt": torch.rand(2, T + 1, 12)}  # one extra frame: cut
    x, loss, parts = m(wav, lengths=[24000, 16000], targets=targets)
    assert x.shape == (2, T, 32) and loss.ndim == 0 and torch.isfinite(loss)
    assert set(parts) >= {"ce", "ce_0", "ce_1", "cqt", "features_pen", "mask_frac"}
    expected = parts["ce"] + parts["cqt"] + 10 * parts["features_pen"]
    assert torch.allclose(loss, expected)
    loss.backward()
    assert m.label_embs.grad is not None and m.cqt_head.weight.grad is not None


def test_unmasked_weight_adds_the_losses_of_unmasked_valid_frames():
    torch.manual_seed(0)
    cfg = MERTConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, conv_dim=(16,) * 7, pos_conv_groups=4,
                     n_codebooks=2, codebook_size=16, final_dim=8, cqt_bins=12)
    m = MERT(cfg).eval()  # no dropout: both passes see the same network
    wav = torch.randn(2, 24000)
    T = m.num_frames(24000)
    targets = {"codes": torch.randint(0, 16, (2, 2, T)), "cqt": torch.rand(2, T, 12)}
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[:, 10:30] = True
    x, loss0, parts0 = m(wav, lengths=[24000, 16000], targets=targets, mask=mask)
    assert "cqt_u" not in parts0
    m.config.unmasked_weight = 0.5
    _, loss1, parts1 = m(wav, lengths=[24000, 16000], targets=targets, mask=mask)
    keep = ~mask
    keep[1, m.num_frames(16000):] = False  # clip 2's padding is no target
    ce_u = m.code_loss(x[keep], targets["codes"].transpose(1, 2)[keep]).sum()
    cqt_u = F.mse_loss(m.cqt_head(x[keep]), targets["cqt"][keep])
    assert torch.allclose(parts1["cqt_u"], cqt_u) and torch.allclose(parts1["ce_u"], ce_u)
    assert torch.allclose(loss1, loss0 + 0.5 * (ce_u + cqt_u))
    assert torch.allclose(parts1["ce"], parts0["ce"]) and torch.allclose(parts1["cqt"], parts0["cqt"])


def test_tiny_model_learns():
    """A small model's masked-prediction loss falls clearly within 50 steps on synthetic audio."""
    torch.manual_seed(0)
    cfg = MERTConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128, conv_dim=(32,) * 7, pos_conv_groups=4,
                     n_codebooks=2, codebook_size=8, final_dim=16, cqt_bins=0, dropout=0.0, attn_dropout=0.0,
                     layerdrop=0.0)
    m = MERT(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    n = 24000
    t = torch.arange(n) / 24000
    # each clip: a tone whose pitch steps every 0.25 s; the labels are the pitch class and the loudness class
    g = torch.Generator().manual_seed(0)
    steps = torch.randint(0, 8, (4, 4), generator=g)
    loud = torch.randint(0, 8, (4, 4), generator=g)
    seg = (t * 4).long().clamp(max=3)
    wav = torch.stack([(0.1 + loud[b][seg] / 8) * torch.sin(2 * torch.pi * (200 * 2 ** (steps[b][seg] / 8)) * t)
                       for b in range(4)])
    T = m.num_frames(n)
    frame_seg = ((torch.arange(T) * 320 + 200) / 6000).long().clamp(max=3)
    codes = torch.stack([torch.stack([steps[b][frame_seg], loud[b][frame_seg]]) for b in range(4)])  # (4, 2, T)
    losses = []
    for i in range(50):
        mask = compute_mask_indices(4, T, 0.5, 5, 2, rng=np.random.default_rng(i))
        _, loss, _ = m(wav, targets={"codes": codes}, mask=mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
