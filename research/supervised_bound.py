"""Supervised upper bound: can this architecture learn a probe task at all, trained end to end?

    python research/supervised_bound.py probe_tasks --task chord --train tasks_s2,tasks_s3 --steps 1100

When a frozen pretrained model (and its random initialisation) probe at chance on a task, this tells
apart "the architecture cannot represent it" from "the pretraining has not learned it": it trains a
randomly initialised model of the same size (mean over time of the last layer, then a linear layer)
on the task's labels and reports test accuracy. Classification tasks from make_probe_tasks.py only.

Training clips: every clip of the task in the --train folders (separate synthesised sets, e.g. other
seeds of make_probe_tasks.py), or by default the train split of TASKS; random crops of --crop seconds.
Test: the test split of TASKS, whole clips.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # mert.py and friends live one folder up
import audio  # noqa: E402
import probe  # noqa: E402
from mert import MERT, MERTConfig  # noqa: E402


def load_task(root: str, task: str, splits, sr: int) -> tuple[list, list]:
    """(waveforms at sr, labels) of ROOT/TASK.csv's rows whose split is in `splits` (None: all).

    The CSV is read by probe.py's reader and the audio by audio.load, so their checks apply; an
    unreadable clip is named on stderr and left out."""
    try:
        items, row_splits, _ = probe.read_labels(Path(root) / f"{task}.csv", "classify")
    except probe.ProbeError as e:
        raise SystemExit(f"supervised_bound.py: {e}")
    waves, labels = [], []
    for (path, label), split in zip(items, row_splits):
        if splits is None or split in splits:
            try:
                waves.append(torch.from_numpy(audio.load(path, sr)))
            except audio.AudioError as e:
                print(f"supervised_bound.py: skipped {e}", file=sys.stderr)
                continue
            labels.append(label)
    if not waves:
        raise SystemExit(f"supervised_bound.py: {root}/{task}.csv has no readable clips for splits {splits}")
    return waves, labels


def main(argv=None):
    """Train the architecture on the labels; print test accuracy as it goes and at the end."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tasks", help="folder written by make_probe_tasks.py (its test split is scored)")
    ap.add_argument("--task", default="chord", help="classification task name (pitch, timbre, chord)")
    ap.add_argument("--train", default="", help="comma list of other task folders to train on (all their clips)")
    ap.add_argument("--size", default="tiny", help="MERTConfig preset of the model")
    ap.add_argument("--steps", type=int, default=1100, help="optimiser steps")
    ap.add_argument("--batch", type=int, default=16, help="clips per step")
    ap.add_argument("--crop", type=float, default=2.0, help="seconds per training crop")
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    ap.add_argument("--eval_every", type=int, default=150, help="steps between test evaluations")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0, help="initialisation and sampling seed")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = MERTConfig.from_preset(args.size, n_codebooks=0, cqt_bins=0)
    sr = cfg.sample_rate

    if args.train:
        waves, labels = [], []
        for root in args.train.split(","):
            w, y = load_task(root, args.task, None, sr)
            waves += w
            labels += y
    else:
        waves, labels = load_task(args.tasks, args.task, ("train",), sr)
    test_w, test_y = load_task(args.tasks, args.task, ("test",), sr)
    classes = sorted(set(labels))
    unknown = set(test_y) - set(classes)
    if unknown:
        raise SystemExit(f"supervised_bound.py: test labels {sorted(unknown)} never seen in training")
    y = torch.tensor([classes.index(c) for c in labels])
    y_test = torch.tensor([classes.index(c) for c in test_y])
    crop = int(args.crop * sr)
    shortest = min(len(w) for w in waves)
    if shortest < crop:
        raise SystemExit(f"supervised_bound.py: a training clip has {shortest} samples, fewer than --crop")

    model = MERT(cfg)
    head = torch.nn.Linear(model.config.dim, len(classes))
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    print(f"{len(waves)} training clips, {len(test_w)} test clips, {len(classes)} classes "
          f"(chance {1 / len(classes):.3f})", flush=True)

    def test_accuracy() -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(test_w), args.batch):
                batch = test_w[i:i + args.batch]
                lengths = [len(w) for w in batch]
                wav = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True)
                feats = model.extract(wav, lengths=lengths)[-1]  # [B, T, d], padded frames zero
                n = torch.tensor([model.num_frames(L) for L in lengths])
                pooled = feats.sum(1) / n[:, None]
                correct += (head(pooled).argmax(1) == y_test[i:i + args.batch]).sum().item()
        model.train()
        return correct / len(test_w)

    model.train()
    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(waves), (args.batch,))
        starts = [int(torch.randint(0, len(waves[i]) - crop + 1, ()).item()) for i in idx.tolist()]
        wav = torch.stack([waves[i][s:s + crop] for i, s in zip(idx.tolist(), starts)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(head(model(wav)[0].float().mean(1)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            print(f"step {step} | {time.time() - t0:.0f} s | loss {loss.item():.3f} | test accuracy "
                  f"{test_accuracy():.3f}", flush=True)


if __name__ == "__main__":
    main()
