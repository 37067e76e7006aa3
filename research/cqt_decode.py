"""How much of the musical teacher's target does each layer hold? Ridge-decode the log-CQT frame by frame.

    python research/cqt_decode.py music/val_shards --ckpt runs/default/ckpt_800.pt [--ckpt ...] [--random]

For 5-second crops of held-out audio, fits a ridge regression (on standardised features) from each
hidden state of each checkpoint, and from its conv features, to the log-CQT the pretraining
reconstructs (log10(|CQT| + 1e-3) + 1.5, 336 bins, 75 frames/s), on the first two thirds of the
crops, and reports the R² on the last third, overall and per octave (C1-C2 ... C7-C8). Two fixed
references show what a frame-local front end could give: the log |STFT| with a window as long as the
model's receptive field (400 samples), and with a 2048-sample window. --random adds each
checkpoint's architecture at random initialisation. A model that has learned the musical teacher
decodes it from its layers; one whose conv front end has not learned a spectral analysis does not,
whatever its masked-prediction loss says about the rest.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # mert.py and friends live one folder up
import audio  # noqa: E402
from mert import MERT  # noqa: E402
from teachers import HOP, SAMPLE_RATE, MusicalTeacher  # noqa: E402


def ridge_errors(x: torch.Tensor, y: torch.Tensor, n_train: int,
                 lam: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared error, squared deviation from the fit's mean) per column of y [N, T, D], summed over the scored clips.

    The ridge maps x [N, T, F] to y on the first n_train clips; the others are scored. Summing both over
    a group of columns before dividing gives that group's R²."""
    xtr, xte = x[:n_train].reshape(-1, x.shape[-1]).double(), x[n_train:].reshape(-1, x.shape[-1]).double()
    ytr, yte = y[:n_train].reshape(-1, y.shape[-1]).double(), y[n_train:].reshape(-1, y.shape[-1]).double()
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    ym = ytr.mean(0)
    w = torch.linalg.solve(xtr.T @ xtr + lam * torch.eye(xtr.shape[1], dtype=xtr.dtype), xtr.T @ (ytr - ym))
    err = (xte @ w + ym - yte).pow(2).sum(0)
    return err, (yte - ym).pow(2).sum(0)  # the caller sums these over the bins it groups


def r2_row(name: str, x: torch.Tensor, y: torch.Tensor, n_train: int) -> str:
    """One table row: R² over all 336 bins, then per octave (48 bins each)."""
    err, var = ridge_errors(x, y, n_train)
    octaves = 1 - err.view(7, -1).sum(1) / var.view(7, -1).sum(1)
    return f"| {name} | {1 - err.sum() / var.sum():.3f} | " + " | ".join(f"{v:.2f}" for v in octaves.tolist()) + " |"


def log_stft(wav: torch.Tensor, window: int, hop: int, frames: int) -> torch.Tensor:
    """log10 |STFT| [N, frames, window // 2 + 1] with a Hann window, centred frames."""
    spec = torch.stft(wav, n_fft=window, hop_length=hop, window=torch.hann_window(window), center=True,
                      return_complex=True).abs()
    return torch.log10(spec + 1e-3).transpose(1, 2)[:, :frames]


def main(argv=None):
    """Print the R² table (markdown) for every checkpoint and reference."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("audio", help="held-out audio: folders, files, manifests or `audio.py prepare` shards (comma list)")
    ap.add_argument("--ckpt", action="append", default=[], help="a checkpoint or exported model (repeatable)")
    ap.add_argument("--random", action="store_true", help="also each checkpoint's architecture at random initialisation")
    ap.add_argument("--clips", type=int, default=48, help="5-second crops; two thirds fit the ridge, one third scores it")
    ap.add_argument("--seed", type=int, default=0, help="seed of the crops and of the random initialisations")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.clips < 6:
        raise SystemExit("cqt_decode.py: --clips must be at least 6")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ds = audio.CropDataset(args.audio.split(","), crop_samples=5 * SAMPLE_RATE, seed=args.seed)
        wav = torch.stack([ds[i] for i in range(args.clips)]).float()
    except (audio.AudioError, ValueError, OSError) as e:
        raise SystemExit(f"cqt_decode.py: {args.audio}: {e}")
    n_train = 2 * args.clips // 3
    frames = wav.shape[1] // HOP + 1
    target = MusicalTeacher(log=True)(wav, frames)["cqt"].float()

    def rows(name, model):
        model = model.float().eval()
        with torch.no_grad():
            states = model.extract(wav)
            conv = model.feature_extractor(wav, None).transpose(1, 2)
        T = states.shape[2]
        y = target[:, :T]
        out = [r2_row(f"{name}, conv features", conv, y, n_train)]
        out += [r2_row(f"{name}, layer {i}", h, y, n_train) for i, h in enumerate(states)]
        return out

    print(f"R² of a ridge decoding of the log-CQT, {args.clips} crops of {args.audio} ({n_train} fit, "
          f"{args.clips - n_train} scored); octaves from C1 (32.7 Hz)\n")
    print("| features | all | C1 | C2 | C3 | C4 | C5 | C6 | C7 |\n|---|---|---|---|---|---|---|---|---|")
    for window in (400, 2048):
        print(r2_row(f"log STFT, {window}-sample window", log_stft(wav, window, HOP, frames), target, n_train))
    for path in args.ckpt:
        try:
            model = MERT.from_pretrained(path)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise SystemExit(f"cqt_decode.py: {path}: {e}")
        for row in rows(Path(path).name, model):
            print(row, flush=True)
        if args.random:
            torch.manual_seed(args.seed)
            for row in rows(f"{Path(path).name} at random init", MERT(model.config)):
                print(row, flush=True)


if __name__ == "__main__":
    main()
