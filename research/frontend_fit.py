"""How fast can a conv front end learn a spectral analysis? Train it alone on the log-CQT, report held-out R².

    python research/frontend_fit.py music/train_shards --val music/val_shards --steps 300
    python research/frontend_fit.py music/train_shards --val music/val_shards --kernels 1024,3,3,3,3,2,2 --gabor --freeze_first

Direct supervision, the easiest case the pretraining can hope for: the conv feature extractor of a
MERT config (the tiny preset, with --kernels and --norm overriding its conv kernels and extractor
norm), then a LayerNorm and a linear map, is trained by Adam on 2-second crops to regress the log-CQT
that `--cqt_log true` pretraining reconstructs (log10(|CQT| + 1e-3) + 1.5, 336 bins at 75 frames/s).
Every --every steps it prints the R² on fixed held-out crops, over all bins and over the octaves
C4-C6 (262-2093 Hz, where the probe tasks' chord notes and first harmonics lie).

--gabor initialises the first conv as a constant-Q bank of Hann-windowed cosines, one per channel,
24 per octave from 110 Hz (windows capped at the kernel length), a learnable front end that starts as
a spectral analysis; --freeze_first keeps that conv fixed. Frame t of the model covers samples
[320 t, 320 t + receptive field); it is scored against the CQT frame nearest its centre.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # mert.py and friends live one folder up
import audio  # noqa: E402
from mert import FeatureExtractor, MERTConfig  # noqa: E402
from teachers import HOP, SAMPLE_RATE, MusicalTeacher  # noqa: E402

C4_C6 = slice(3 * 48, 6 * 48)  # CQT bins of the octaves C4, C5, C6 (48 bins per octave from C1 = 32.7 Hz)


def gabor_bank(channels: int, kernel: int, fmin: float = 110.0, per_octave: int = 24,
               sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Conv weights [channels, 1, kernel]: Hann-windowed cosines at fmin * 2^(c / per_octave), constant-Q
    windows (Q = 1 / (2^(1/per_octave) - 1)) capped at the kernel, each with unit L1 norm."""
    t = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2
    f = fmin * 2.0 ** (torch.arange(channels, dtype=torch.float64) / per_octave)
    if f[-1] >= sr / 2:
        raise ValueError(f"{channels} channels at {per_octave} per octave from {fmin} Hz pass the Nyquist frequency")
    width = torch.clamp(sr / f / (2 ** (1 / per_octave) - 1), max=kernel)[:, None]
    window = torch.where(t.abs() < width / 2, 0.5 + 0.5 * torch.cos(2 * math.pi * t / width), 0.0)
    w = window * torch.cos(2 * math.pi * f[:, None] * t / sr)
    return (w / w.abs().sum(1, keepdim=True))[:, None, :].float()


def r2(pred: torch.Tensor, y: torch.Tensor) -> float:
    """1 - squared error / squared deviation from each column's mean, over [frames, bins]."""
    return float(1 - (pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def main(argv=None):
    """Train the front end and print one R² line every --every steps."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("audio", help="training audio: folders, files, manifests or `audio.py prepare` shards (comma list)")
    ap.add_argument("--val", required=True, help="held-out audio, as for the training audio")
    ap.add_argument("--kernels", default=None, help="conv kernels, e.g. 1024,3,3,3,3,2,2 (default: the tiny preset's)")
    ap.add_argument("--norm", default=None, choices=("group", "layer"), help="extractor norm (default: the preset's)")
    ap.add_argument("--gabor", action="store_true", help="initialise the first conv as a constant-Q cosine bank")
    ap.add_argument("--freeze_first", "--freeze-first", action="store_true", help="keep the first conv at its initialisation")
    ap.add_argument("--steps", type=int, default=300, help="Adam steps of --batch crops")
    ap.add_argument("--batch", type=int, default=8, help="2-second crops per step")
    ap.add_argument("--val_clips", "--val-clips", type=int, default=32, help="held-out 2-second crops scored")
    ap.add_argument("--every", type=int, default=100, help="score every this many steps")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the crops")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.steps < 0 or args.every < 1 or args.batch < 1 or args.val_clips < 1:
        raise SystemExit("frontend_fit.py: --steps must be >= 0 and --every, --batch, --val_clips >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    over = {}
    if args.kernels:
        over["conv_kernel"] = tuple(int(k) for k in args.kernels.split(","))
    if args.norm:
        over["extractor_norm"] = args.norm
    try:
        cfg = MERTConfig.from_preset("tiny", **over)
    except ValueError as e:
        raise SystemExit(f"frontend_fit.py: {e}")
    crop = 2 * SAMPLE_RATE
    try:
        train = audio.CropDataset(args.audio.split(","), crop_samples=crop, seed=args.seed)
        val = audio.CropDataset(args.val.split(","), crop_samples=crop, seed=args.seed + 1)
        val_wav = torch.stack([val[i] for i in range(args.val_clips)]).float()
    except (audio.AudioError, ValueError, OSError) as e:
        raise SystemExit(f"frontend_fit.py: {e}")
    torch.manual_seed(args.seed)
    fe, norm, head = FeatureExtractor(cfg), nn.LayerNorm(cfg.conv_dim[-1]), nn.Linear(cfg.conv_dim[-1], 336)
    first = fe.conv_layers[0].conv
    if args.gabor:
        with torch.no_grad():
            first.weight.copy_(gabor_bank(cfg.conv_dim[0], cfg.conv_kernel[0]))
    if args.freeze_first:
        first.weight.requires_grad_(False)
    params = [p for m in (fe, norm, head) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    teacher = MusicalTeacher(log=True)
    shift = round(cfg.receptive_field / 2 / HOP)  # CQT frames are centred on 320 t, model frames on 320 t + rf / 2

    def loss_and_pred(wav):
        pred = head(norm(fe(wav, None).transpose(1, 2)))  # (B, T, 336)
        with torch.no_grad():
            y = teacher(wav, shift + pred.shape[1])["cqt"][:, shift:]
        return (pred - y).pow(2).mean(), pred, y

    print(f"kernels {','.join(map(str, cfg.conv_kernel))}, norm {cfg.extractor_norm}, receptive field "
          f"{cfg.receptive_field} samples, gabor {args.gabor}, first conv frozen {args.freeze_first}")
    t0 = time.time()
    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            with torch.no_grad():
                _, pred, y = loss_and_pred(val_wav)
            pred, y = pred.reshape(-1, 336), y.reshape(-1, 336)
            print(f"step {step:5d} | held-out R² {r2(pred, y):.3f} | C4-C6 {r2(pred[:, C4_C6], y[:, C4_C6]):.3f} "
                  f"| {time.time() - t0:.0f} s", flush=True)
        if step == args.steps:
            break
        wav = torch.stack([train[step * args.batch + i] for i in range(args.batch)]).float()
        loss, _, _ = loss_and_pred(wav)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


if __name__ == "__main__":
    main()
