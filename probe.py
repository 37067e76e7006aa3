"""Probe frozen MERT features on a labelled set of clips, MARBLE-style: per layer, mean over time, standardise,
then a linear and an MLP probe with early stopping on the validation split; the test metric per layer, the best
layer (chosen on validation) and a learned softmax-weighted combination of all layers.

    python probe.py labels.csv                        # the shipped model; task guessed from the labels
    python probe.py labels.csv --ckpt m-a-p/MERT-v1-95M --task tag --json results.json
    python probe.py labels.csv --features cqt         # hand-made baseline: mean and std of the log CQT
    python probe.py labels.csv --features random      # the same architecture at random initialisation

labels.csv has the columns path,label[,split] (a header row is optional). Paths are relative to the CSV's folder.
  classify: one label per clip              -> accuracy
  tag:      labels separated by ';'         -> ROC-AUC and average precision (macro over tags)
  regress:  a number per clip               -> R^2
split is train, valid (or val) or test; without it the clips are split 60/20/20 at random (--seed).

Features are mean-pooled hidden states [layers, dim] per clip written by extract.py and cached under
--cache (default: <csv folder>/.probe_cache/<model>/, mirroring the CSV's paths as extract.py mirrors a folder),
so a second run, or a run on another task over the same clips, reads them back instead of recomputing.
--feats DIR reads features you made yourself with `python extract.py <folder> -o DIR` (any --pool).
Files that cannot be read are named once on stderr and left out; the rest go on.
"""

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import audio
import cqt
import extract
import teachers
from mert import MERT, CheckpointError

TASKS = ("classify", "tag", "regress")
SPLITS = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid", "dev": "valid", "test": "test"}
METRICS = {"classify": ("accuracy",), "tag": ("roc_auc", "average_precision"), "regress": ("r2",)}


class ProbeError(Exception):
    """A problem with the labels file or the features, as one line that names the file."""


# ----------------------------------------------------------------------------- labels


def read_labels(path: Path, task: str = "auto", seed: int = 0):
    """CSV -> (rows [(audio path, raw label)], split per row, task); splits 60/20/20 at random when absent."""
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ProbeError(f"{path}: cannot read ({e})")
    if rows and rows[0][0].strip().lower() == "path":
        rows = rows[1:]
    if not rows:
        raise ProbeError(f"{path}: no labelled rows")
    items, splits = [], []
    for n, r in enumerate(rows, 1):
        if len(r) < 2 or not r[0].strip():
            raise ProbeError(f"{path}: row {n} needs path,label[,split], got {','.join(r)!r}")
        p = Path(r[0].strip())
        items.append((p if p.is_absolute() else path.parent / p, r[1].strip()))
        if len(r) > 2 and r[2].strip():
            s = SPLITS.get(r[2].strip().lower())
            if s is None:
                raise ProbeError(f"{path}: row {n}: split {r[2]!r} is not train, valid or test")
            splits.append(s)
        else:
            splits.append(None)
    if any(s is None for s in splits):
        if any(s is not None for s in splits):
            raise ProbeError(f"{path}: some rows have a split and some do not")
        order = np.random.default_rng(seed).permutation(len(items))
        n_tr, n_va = int(round(0.6 * len(items))), int(round(0.2 * len(items)))
        splits = [None] * len(items)
        for rank, i in enumerate(order):
            splits[i] = "train" if rank < n_tr else "valid" if rank < n_tr + n_va else "test"
    if task == "auto":
        labels = [lab for _, lab in items]
        if all(_is_float(lab) for lab in labels) and len(set(labels)) > 0.2 * len(labels):
            task = "regress"
        else:
            task = "tag" if any(";" in lab for lab in labels) else "classify"
    if task == "regress":
        bad = next((n for n, (_, lab) in enumerate(items, 1) if not _is_float(lab)), None)
        if bad:
            raise ProbeError(f"{path}: row {bad}: label {items[bad - 1][1]!r} is not a number (task regress)")
    for s in ("train", "valid", "test"):
        if s not in splits:
            raise ProbeError(f"{path}: the {s} split is empty")
    return items, splits, task


def _is_float(s: str) -> bool:
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False


def encode_targets(labels: list[str], task: str):
    """Raw labels -> (target array, class names): class index, multi-hot matrix or float."""
    if task == "regress":
        return np.array([float(x) for x in labels], dtype=np.float32), []
    if task == "tag":
        tags = [[t.strip() for t in lab.split(";") if t.strip()] for lab in labels]
        names = sorted({t for ts in tags for t in ts})
        y = np.zeros((len(labels), len(names)), dtype=np.float32)
        index = {n: i for i, n in enumerate(names)}
        for r, ts in enumerate(tags):
            y[r, [index[t] for t in ts]] = 1
        return y, names
    names = sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[x] for x in labels], dtype=np.int64), names


# ----------------------------------------------------------------------------- features


def _cache_path(root: Path, csv_dir: Path, src: Path) -> Path:
    """Mirror the clip's path below the CSV's folder (as extract.py mirrors a folder); others by hash."""
    try:
        rel = src.resolve().relative_to(csv_dir.resolve())
    except ValueError:
        rel = Path("_outside") / (hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:16] + "_" + src.name)
    return root / rel.with_suffix(".npy")


def _stamp(path) -> str:
    """Identity of a checkpoint for the cache key: its path, size and modification time."""
    p = Path(path)
    if p.exists():
        st = p.stat()
        return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return str(path)


def handmade_features(kind: str):
    """'cqt': mean and std over time of log1p |CQT| (MERT's 336-bin CQT); 'mfcc': of 39-d MFCC+deltas."""
    if kind == "cqt":
        op = cqt.CQT(sr=24000, hop_length=320, fmin=32.7, n_bins=336, bins_per_octave=48, output="magnitude")
        fn = lambda w: torch.log1p(op(w)[0].T)  # noqa: E731  (frames, 336)
    else:
        op = teachers.MFCC()
        fn = lambda w: op(w)[0]  # noqa: E731  (frames, 39)

    @torch.inference_mode()
    def features(wav: np.ndarray) -> np.ndarray:
        f = fn(torch.from_numpy(wav)[None])
        return torch.cat([f.mean(0), f.std(0)])[None].numpy()  # one "layer": [1, 2 * dim]
    return features


def _load_model(ckpt) -> MERT:
    """MERT.from_pretrained, with a bad checkpoint as a ProbeError."""
    try:
        return MERT.from_pretrained(ckpt)
    except (CheckpointError, ValueError, RuntimeError, OSError) as e:
        raise ProbeError(str(e))


def compute_features(items, args, csv_dir: Path) -> tuple[list, str]:
    """Mean-pooled features [layers, dim] per clip (None where the clip failed) and a name for the source."""
    if args.feats:
        root, name = Path(args.feats), f"features in {args.feats}"
    else:
        if args.features in ("cqt", "mfcc"):
            key, name = args.features, f"{args.features} statistics baseline"
        else:
            ckpt = args.ckpt or extract.DEFAULT_CKPT
            if args.features == "random":  # keyed by architecture and seed: any checkpoint of it gives the same
                cfg = _load_model(ckpt).config
                key = f"random|{args.seed}|{json.dumps(asdict(cfg), sort_keys=True)}"
                name = f"{ckpt}'s architecture at random initialisation (seed {args.seed})"
            else:
                key, name = _stamp(ckpt), str(ckpt)
        tag = (Path(str(args.ckpt or "default")).stem if args.features in ("model", "random") else args.features)
        root = Path(args.cache or csv_dir / ".probe_cache") / f"{args.features}-{tag}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
        jobs = [(src, _cache_path(root, csv_dir, src)) for src, _ in items]
        todo = [j for j in jobs if not j[1].exists()]
        if todo and args.features in ("cqt", "mfcc"):
            fn = handmade_features(args.features)
            for src, dst in todo:
                try:
                    feats = fn(audio.load(src, sr=24000))
                except audio.AudioError as e:
                    print(f"error: {e}", file=sys.stderr)
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(dst.name + ".tmp.npy")
                np.save(tmp, feats.astype(np.float32))
                os.replace(tmp, dst)
        elif todo:  # the checkpoint is loaded only when some clip still needs its features
            if args.features == "random":
                torch.manual_seed(args.seed)
                model = MERT(cfg).eval()
            else:
                model = _load_model(ckpt)
            model = model.to(extract.pick_device(args.device))
            extract.extract_files(model, todo, list(range(model.num_states)), pool="mean", batch=args.batch)
    out = []
    for src, _ in items:
        p = _cache_path(root, csv_dir, src)
        if not p.exists():
            out.append(None)
            continue
        try:
            f = np.load(p, mmap_mode="r")
        except (OSError, ValueError) as e:
            print(f"error: {p}: unreadable features ({e})", file=sys.stderr)
            out.append(None)
            continue
        f = np.asarray(f.mean(1) if f.ndim == 3 else f, dtype=np.float32)  # [layers, frames, dim] -> mean over time
        if f.ndim != 2 or not np.isfinite(f).all():
            print(f"error: {p}: features are not a finite [layers, dim] array", file=sys.stderr)
            out.append(None)
            continue
        out.append(f)
    return out, name


# ----------------------------------------------------------------------------- metrics


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve for one binary column (Mann-Whitney with average ranks for ties)."""
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    start = 0
    for i in range(1, len(s) + 1):  # average the ranks of tied scores
        if i == len(s) or sorted_s[i] != sorted_s[start]:
            ranks[order[start:i]] = 0.5 * (start + i - 1) + 1
            start = i
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Average precision for one binary column: sum over score thresholds of (recall step) x precision."""
    n_pos = int((y > 0.5).sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order] > 0.5, s[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall_step = np.diff(np.r_[0, tp]) / n_pos
    return float((recall_step * precision).sum())


def metrics(task: str, y: np.ndarray, out: np.ndarray) -> dict:
    """Task metrics from targets and probe outputs (logits, or predictions in target units for regress)."""
    if task == "classify":
        return {"accuracy": float((out.argmax(1) == y).mean())}
    if task == "tag":
        aucs = [roc_auc(y[:, c], out[:, c]) for c in range(y.shape[1])]
        aps = [average_precision(y[:, c], out[:, c]) for c in range(y.shape[1])]
        return {"roc_auc": float(np.nanmean(aucs)), "average_precision": float(np.nanmean(aps))}
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"r2": 1.0 - float(((y - out[:, 0]) ** 2).sum()) / max(ss_tot, 1e-12)}


# ----------------------------------------------------------------------------- probes


class Probes(nn.Module):
    """One independent probe per layer, run as a batch: [L, N, D] -> [L, N, C].

    hidden=0 gives linear probes; hidden>0 one hidden ReLU layer with dropout. combine=True instead mixes the
    L layers with learned softmax weights first and trains one probe on the mixture: [L, N, D] -> [1, N, C].
    """

    def __init__(self, n_layers: int, dim: int, n_out: int, hidden: int = 0, dropout: float = 0.0, combine: bool = False):
        super().__init__()
        P = 1 if combine else n_layers
        self.mix = nn.Parameter(torch.zeros(1, n_layers)) if combine else None  # leading dim = probe count
        sizes = [dim, hidden, n_out] if hidden else [dim, n_out]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(sizes[:-1], sizes[1:]):  # nn.Linear's default initialisation, per probe
            bound = 1 / math.sqrt(a)
            self.weights.append(nn.Parameter(torch.empty(P, a, b).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(P, 1, b).uniform_(-bound, bound)))
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[L, N, D] standardised features -> [P, N, C] outputs."""
        if self.mix is not None:
            x = torch.einsum("l,lnd->nd", self.mix[0].softmax(0), x)[None]
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if i:
                x = F.dropout(F.relu(x), self.dropout, self.training)
            x = torch.baddbmm(b, x, w)
        return x


def _loss(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each probe's mean loss [P] (summed for training, so each probe gets the gradient of its own loss)."""
    P = out.shape[0]
    if task == "classify":
        return F.cross_entropy(out.flatten(0, 1), y.repeat(P), reduction="none").view(P, -1).mean(1)
    if task == "tag":
        return F.binary_cross_entropy_with_logits(out, y.expand_as(out), reduction="none").flatten(1).mean(1)
    return F.mse_loss(out[..., 0], y.expand(P, -1), reduction="none").mean(1)


def train_probes(x: dict, y: dict, task: str, n_out: int, hidden: int, combine: bool, args) -> tuple[Probes, list]:
    """Train with Adam and early stopping on each probe's validation metric; returns the best probes and epochs."""
    torch.manual_seed(args.seed)
    L, N, D = x["train"].shape
    model = Probes(L, D, n_out, hidden, args.dropout if hidden else 0.0, combine)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    P = 1 if combine else L
    best_score, best_loss = torch.full((P,), -float("inf")), torch.full((P,), float("inf"))
    best = [p.detach().clone() for p in model.parameters()]
    best_epoch, since = [0] * P, 0
    g = torch.Generator().manual_seed(args.seed)
    key = METRICS[task][-1]
    for epoch in range(1, args.epochs + 1):
        model.train()
        for idx in torch.randperm(N, generator=g).split(args.batch_size):
            loss = _loss(task, model(x["train"][:, idx]), y["train"][idx]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            out = model(x["valid"])
            vloss = _loss(task, out, y["valid"])
        scores = torch.tensor([metrics(task, y["valid_np"], _to_target_units(o, y)).get(key) for o in out])
        # a plateau of the metric (accuracy moves in steps) is broken by the validation loss
        better = (scores > best_score + 1e-9) | ((scores > best_score - 1e-9) & (vloss < best_loss))
        since = 0 if better.any() else since + 1
        if better.any():
            best_score = torch.where(better, scores, best_score)
            best_loss = torch.where(better, vloss, best_loss)
            for b, p in zip(best, model.parameters()):
                b[better] = p.detach()[better]
            for i in torch.nonzero(better).flatten().tolist():
                best_epoch[i] = epoch
        if since >= args.patience:
            break
    with torch.no_grad():
        for b, p in zip(best, model.parameters()):
            p.copy_(b)
    return model.eval(), best_epoch


def _to_target_units(out: torch.Tensor, y: dict) -> np.ndarray:
    """Probe output for one probe [N, C] -> numpy in the units the metric expects."""
    out = out.numpy()
    mean, std = y["scale"]  # (0, 1) unless regression targets were standardised
    return out * std + mean


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    p = argparse.ArgumentParser(
        description="Probe frozen features per layer (linear and MLP, MARBLE-style) on a labelled CSV of clips.",
        epilog="example: python probe.py tasks/pitch.csv --json pitch.json",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("labels", help="CSV of path,label[,split]; paths relative to the CSV's folder")
    p.add_argument("--task", default="auto", choices=("auto",) + TASKS, help="classify, tag (labels split on ';') or regress; auto guesses")
    p.add_argument("--ckpt", default=None, help="model to probe (default: the shipped model); anything extract.py --ckpt takes")
    p.add_argument("--features", default="model", choices=("model", "random", "cqt", "mfcc"), help="model: the checkpoint; random: its architecture at random initialisation; cqt/mfcc: hand-made statistics baselines")
    p.add_argument("--feats", default=None, help="read features written by `extract.py <csv folder> -o DIR` instead of computing them")
    p.add_argument("--cache", default=None, help="feature cache folder (default: <csv folder>/.probe_cache)")
    p.add_argument("--json", default=None, help="write the full results here")
    p.add_argument("--no-mlp", action="store_true", help="linear probes only")
    p.add_argument("--hidden", type=int, default=512, help="MLP probe hidden units")
    p.add_argument("--dropout", type=float, default=0.5, help="MLP probe dropout")
    p.add_argument("--lr", type=float, default=1e-3, help="probe learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="probe weight decay")
    p.add_argument("--batch-size", type=int, default=64, help="probe training batch size")
    p.add_argument("--epochs", type=int, default=300, help="most epochs per probe")
    p.add_argument("--patience", type=int, default=20, help="stop after this many epochs without a better validation score")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split, probe initialisation and order, and --features random")
    p.add_argument("--batch", type=int, default=8, help="clips per forward pass when extracting")
    p.add_argument("--device", default="auto", help="device for feature extraction: auto, cpu, cuda, mps")
    return p


def run(args) -> dict:
    """Probe every layer and the softmax-weighted combination; returns the results as a dict."""
    t0 = time.time()
    csv_path = Path(args.labels)
    items, splits, task = read_labels(csv_path, args.task, args.seed)
    feats, source = compute_features(items, args, csv_path.parent)
    keep = [i for i, f in enumerate(feats) if f is not None]
    if len(keep) < len(items):
        print(f"probe.py: {len(items) - len(keep)} of {len(items)} clips left out (no features)", file=sys.stderr)
    shapes = {feats[i].shape for i in keep}
    if len(shapes) != 1:
        raise ProbeError(f"{csv_path}: features differ in shape across clips: {sorted(shapes)[:3]}")
    targets, names = encode_targets([items[i][1] for i in keep], task)
    X = torch.from_numpy(np.stack([feats[i] for i in keep], 1))  # [L, N, D]
    split = np.array([splits[i] for i in keep])
    x, y = {}, {}
    for s in ("train", "valid", "test"):
        m = split == s
        if not m.any():
            raise ProbeError(f"{csv_path}: no clip of the {s} split has features")
        x[s], y[s + "_np"] = X[:, torch.from_numpy(m)], targets[m]
    mean, std = x["train"].mean(1, keepdim=True), x["train"].std(1, keepdim=True)
    # Floor each dimension's scale at a tenth of the layer's RMS scale: a near-constant dimension (a CQT bin
    # above the music, a dead unit) would otherwise be blown up to unit variance and the probe would fit its noise.
    std = torch.maximum(std, 0.1 * std.square().mean(2, keepdim=True).sqrt())
    for s in x:  # standardise each layer with the training split's statistics
        x[s] = (x[s] - mean) / (std + 1e-5)
    y["scale"] = (float(y["train_np"].mean()), float(y["train_np"].std() + 1e-8)) if task == "regress" else (0.0, 1.0)
    for s in ("train", "valid"):
        y[s] = torch.from_numpy((y[s + "_np"] - y["scale"][0]) / y["scale"][1] if task == "regress" else y[s + "_np"])
    if task == "classify":
        missing = sorted(set(range(len(names))) - set(y["train_np"].tolist()))
        if missing:
            print(f"probe.py: classes absent from train: {[names[i] for i in missing][:5]}", file=sys.stderr)
    n_out = len(names) if task != "regress" else 1

    L = X.shape[0]
    results = {"labels": str(csv_path), "task": task, "features": source, "layers": L, "dim": int(X.shape[2]),
               "clips": {s: int((split == s).sum()) for s in ("train", "valid", "test")},
               "classes": names, "metrics": list(METRICS[task]), "seed": args.seed, "per_layer": [], "best": {},
               "weighted": {}}
    kinds = {"linear": 0} if args.no_mlp else {"linear": 0, "mlp": args.hidden}
    per = [{"layer": i} for i in range(L)]
    for kind, hidden in kinds.items():
        probes, epochs = train_probes(x, y, task, n_out, hidden, False, args)
        with torch.no_grad():
            out_va, out_te = probes(x["valid"]), probes(x["test"])
        for i in range(L):
            per[i][kind] = {"valid": metrics(task, y["valid_np"], _to_target_units(out_va[i], y)),
                            "test": metrics(task, y["test_np"], _to_target_units(out_te[i], y)),
                            "epochs": epochs[i]}
        key = METRICS[task][-1]
        b = max(range(L), key=lambda i: (per[i][kind]["valid"][key], -i))  # chosen on validation, never on test
        results["best"][kind] = {"layer": b, "valid": per[b][kind]["valid"], "test": per[b][kind]["test"]}
        if L > 1:
            mix, _ = train_probes(x, y, task, n_out, hidden, True, args)
            with torch.no_grad():
                te = _to_target_units(mix(x["test"])[0], y)
            results["weighted"][kind] = {"test": metrics(task, y["test_np"], te),
                                         "weights": [round(w, 4) for w in mix.mix[0].softmax(0).tolist()]}
    results["per_layer"] = per
    results["seconds"] = round(time.time() - t0, 1)
    return results


def print_table(r: dict, file=None):
    """The per-layer table, best layer and weighted combination as plain text (stdout by default)."""
    file = file or sys.stdout
    kinds = [k for k in ("linear", "mlp") if k in r["per_layer"][0]]
    cols = [(k, m) for k in kinds for m in r["metrics"]]
    c = r["clips"]
    print(f"{r['labels']}: {r['task']}, {len(r['classes']) or 'float'} {'classes' if r['task'] == 'classify' else 'tags' if r['task'] == 'tag' else 'targets'}, "
          f"{c['train']}/{c['valid']}/{c['test']} clips (train/valid/test); {r['features']}: {r['layers']} x {r['dim']}", file=file)
    print("test " + ", ".join(r["metrics"]) + " per layer; the best layer is chosen on the validation split", file=file)
    print(f"{'layer':>7} " + " ".join(f"{k + ' ' + m:>24}" for k, m in cols), file=file)
    for p in r["per_layer"]:
        print(f"{p['layer']:>7} " + " ".join(f"{p[k]['test'][m]:>24.4f}" for k, m in cols), file=file)
    print(f"{'best':>7} " + " ".join(f"{r['best'][k]['test'][m]:>17.4f} (L{r['best'][k]['layer']:>2})" for k, m in cols), file=file)
    if r["weighted"]:
        print(f"{'softmax':>7} " + " ".join(f"{r['weighted'][k]['test'][m]:>24.4f}" for k, m in cols), file=file)
        for k in kinds:
            print(f"  {k} layer weights: " + " ".join(f"{w:.2f}" for w in r["weighted"][k]["weights"]), file=file)
    print(f"({r['seconds']} s)", file=file)


def main(argv=None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 on a bad labels file, model or features)."""
    args = build_parser().parse_args(argv)
    if args.features in ("model", "random") and args.ckpt is None and not args.feats and not extract.DEFAULT_CKPT.exists():
        print(f"probe.py: no --ckpt given and no shipped model at {extract.DEFAULT_CKPT}", file=sys.stderr)
        return 2
    try:
        results = run(args)
    except ProbeError as e:
        print(f"probe.py: {e}", file=sys.stderr)
        return 2
    print_table(results)
    if args.json:
        tmp = Path(args.json).with_name(Path(args.json).name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
