"""Probe frozen MERT features, MARBLE-style: per layer, standardise, then a linear and an MLP probe with early
stopping on the validation split; the test metric per layer, the best layer (chosen on validation) and a learned
softmax-weighted combination of all layers. Clip tasks probe the mean over time, frame tasks every frame.

    python probe.py labels.csv                        # the shipped model; clip task read from unambiguous labels
    python probe.py labels.csv --ckpt m-a-p/MERT-v1-95M --task tag --json results.json
    python probe.py labels.csv --features cqt         # hand-made baseline: mean and std of the log CQT
    python probe.py labels.csv --features random      # the same architecture at random initialisation
    python probe.py chords.csv --task chords          # over time: chords, beats, notes, segments
    python probe.py chords.csv --task chords --ckpt m-a-p/MERT-v2-FullSong   # MERT-v2: frames at 25 Hz

labels.csv has the columns path,label[,split] (a header row is optional). Paths are relative to the CSV's folder.
  classify: one label per clip              -> accuracy
  tag:      labels separated by ';'         -> ROC-AUC and average precision (macro over tags)
  regress:  a number per clip               -> R^2
  chords, beats, notes, segments: the label is an annotation file, read and scored by mirmetrics.py as mir_eval
  does: weighted chord symbol recall (root, majmin, mirex), beat/downbeat F (70 ms), onset/note F (50 ms),
  frame accuracy.
split is train, valid (or val) or test; without it the clips are split 60/20/20 at random (--seed).

Features come from extract.py and are cached under --cache (default: <csv folder>/.probe_cache/<model>/,
mirroring the CSV's paths as extract.py mirrors a folder), so a second run, or a run on another task over the same
clips, reads them back instead of recomputing. --feats DIR reads features you made yourself with
`python extract.py <folder> -o DIR` (any --pool for clip tasks, none for frame tasks).
Files that cannot be read are named once on stderr and left out; the rest go on.
"""

import argparse
import copy
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

import extract
import mirmetrics as mm
import teachers  # the hand-made baselines (CQT, MFCC) and MERT's framing

audio = extract.audio  # the reader extract.py decodes with: clips are read the same way in both
SAMPLE_RATE, HOP = teachers.SAMPLE_RATE, teachers.HOP  # MERT's input rate and frame hop (the baselines' too)

TASKS = ("classify", "tag", "regress")
FRAME_TASKS = ("chords", "beats", "notes", "segments")
SPLITS = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid", "dev": "valid", "test": "test"}
METRICS = {"classify": ("accuracy",), "tag": ("roc_auc", "average_precision"), "regress": ("r2",),
           "chords": mm.CHORD_LEVELS, "beats": ("beat_f", "downbeat_f"), "notes": ("onset_f", "note_f"),
           "segments": ("accuracy",)}
# the metric that early stopping (clip tasks), thresholds and the best layer follow
SELECT = {"classify": "accuracy", "tag": "average_precision", "regress": "r2", "chords": "majmin", "beats": "beat_f",
          "notes": "note_f", "segments": "accuracy"}


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
        task, why = guess_task(path, [lab for _, lab in items])
        print(f"probe.py: --task auto: {task} ({why}); pass --task to choose another", file=sys.stderr)
    if task == "regress":
        bad = next((n for n, (_, lab) in enumerate(items, 1) if not _is_float(lab)), None)
        if bad:
            raise ProbeError(f"{path}: row {bad}: label {items[bad - 1][1]!r} is not a number (task regress)")
    for s in ("train", "valid", "test"):
        if s not in splits:
            raise ProbeError(f"{path}: the {s} split is empty")
    return items, splits, task


# Suffixes of the annotation files frame tasks take as labels (and of their usual neighbours): labels that look
# like these are file names, never classes, and --task auto refuses to guess a clip task over them.
ANNOTATION_SUFFIXES = (".lab", ".beats", ".txt", ".csv", ".tsv", ".jams", ".json", ".mid", ".midi", ".svl", ".arff",
                       ".chords", ".notes", ".seg")


def _rows(ns: list) -> str:
    """Row numbers for a message: the first five, and how many more."""
    return ", ".join(map(str, ns[:5])) + (f" and {len(ns) - 5} more" if len(ns) > 5 else "")


def guess_task(path: Path, labels: list[str]) -> tuple[str, str]:
    """--task auto: (task, why) when the labels leave no doubt; a ProbeError naming rows when they do not
    (annotation file names, or a column of numbers with some non-numbers in it)."""
    files = [n for n, lab in enumerate(labels, 1) if Path(lab).suffix.lower() in ANNOTATION_SUFFIXES]
    if len(files) * 2 > len(labels):
        raise ProbeError(f"{path}: the labels look like annotation files (rows {_rows(files)}, e.g. "
                         f"{labels[files[0] - 1]!r}): pass --task chords, beats, notes or segments (or --task "
                         f"classify if they are class names)")
    words = [n for n, lab in enumerate(labels, 1) if not _is_float(lab)]
    if words and len(words) * 5 <= len(labels):  # mostly numbers: a typo, a missing value, or a header
        raise ProbeError(f"{path}: {len(labels) - len(words)} of {len(labels)} labels are numbers but rows "
                         f"{_rows(words)} are not (e.g. {labels[words[0] - 1]!r}): fix them, or pass --task regress "
                         f"or --task classify")
    if not words:
        distinct = len(set(labels))
        if distinct > 0.2 * len(labels):
            return "regress", f"every label is a number, {distinct} distinct values in {len(labels)} rows"
        return "classify", f"every label is a number but only {distinct} distinct values in {len(labels)} rows"
    if any(";" in lab for lab in labels):
        return "tag", "labels joined by ';'"
    return "classify", f"{len(set(labels))} distinct labels, one a row"


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


def handmade_features(kind: str, frames: bool = False):
    """'cqt': log1p |CQT| (MERT's 336-bin CQT); 'mfcc': 39-d MFCC+deltas. Per clip the mean and std over time
    [1, 2 * dim], or with frames=True every frame [1, frames, dim], frame t centred on 320 t / 24000 s."""
    if kind == "cqt":
        op = teachers.MusicalTeacher().cqt  # MERT's CQT target, as linear magnitude
        fn = lambda w: torch.log1p(op(w)[0].T)  # noqa: E731  (frames, 336)
    else:
        op = teachers.MFCC()
        fn = lambda w: op(w)[0]  # noqa: E731  (frames, 39)

    @torch.inference_mode()
    def features(wav: np.ndarray) -> np.ndarray:
        f = fn(torch.from_numpy(wav)[None])
        if frames:
            return f[None].numpy()  # one "layer": [1, frames, dim]
        return torch.cat([f.mean(0), f.std(0)])[None].numpy()  # one "layer": [1, 2 * dim]
    return features


def _load_model(ckpt) -> "extract.MERT":
    """extract.load_model (every format extract.py reads), with a bad checkpoint as a ProbeError."""
    try:
        return extract.load_model(ckpt)
    except (ValueError, RuntimeError, OSError) as e:  # mert.CheckpointError is a ValueError
        raise ProbeError(str(e))


# Frame grid (hop, centre of frame 0, sample rate) of extract.py's features for every MERT-v1 conv stack (hop 320,
# receptive field 400 at 24 kHz); features read with --feats follow the grid their records name, else this one.
MERT_GRID = (HOP, teachers.MODEL_FIELD / 2, SAMPLE_RATE)


def _feats_grid(paths) -> tuple:
    """The frame grid extract.py recorded beside the first of these feature files that has a record (MERT-v2's
    is 25 Hz), else MERT_GRID."""
    for p in paths:
        try:
            g = json.loads(extract.record_path(p).read_text()).get("frame_grid")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(g, list) and len(g) == 3 and all(isinstance(v, (int, float)) and v >= 0 for v in g) and g[0] > 0:
            return tuple(g)
    return MERT_GRID


def _layer_spec(args) -> str:
    """--layers given space- and/or comma-separated -> extract.py's comma syntax."""
    items = [args.layers] if isinstance(args.layers, str) else args.layers
    return ",".join(v.strip() for a in items for v in a.split(",") if v.strip())


def compute_features(items, args, csv_dir: Path, frames: bool = False) -> tuple[list, str, tuple, list]:
    """Features per clip (None where the clip failed): mean-pooled [layers, dim], or with frames=True every frame
    [layers, frames, dim]. Returns them, a name for the source, its frame grid and the hidden-state indices kept."""
    grid, keep = MERT_GRID, None
    if args.feats:
        root, name = Path(args.feats), f"features in {args.feats}"
        grid = _feats_grid(_cache_path(root, csv_dir, src) for src, _ in items)
    else:
        if args.features in ("cqt", "mfcc"):
            key, grid = args.features, (HOP, 0.0, SAMPLE_RATE)  # CQT and MFCC frames are centred on 320 t
            name = f"{args.features} {'frames' if frames else 'statistics'} baseline"
        else:
            ckpt = args.ckpt or extract.DEFAULT_CKPT
            cfg = loaded = None
            if frames or args.features == "random":  # (clip tasks over cached features never load the model)
                loaded = _load_model(ckpt)
                cfg = loaded.config
                grid = extract.model_info(loaded).grid  # MERT-v1: frame t centred on (hop t + rf / 2) / sr
            if args.features == "random":  # keyed by architecture and seed: any checkpoint of it gives the same
                key = f"random|{args.seed}|{json.dumps(asdict(cfg), sort_keys=True)}"
                name = f"{ckpt}'s architecture at random initialisation (seed {args.seed})"
            else:
                key, name = _stamp(ckpt), str(ckpt)
            key += f"|extract v{extract.EXTRACT_VERSION}"  # features of an older extraction convention are stale
            if frames:  # frame features are big: extract and cache only the layers asked for
                try:
                    keep = extract.parse_layers(_layer_spec(args), loaded.num_states)
                except ValueError as e:
                    raise ProbeError(str(e))
                key += f"|frames|{keep}"
        tag = (Path(str(args.ckpt or "default")).stem if args.features in ("model", "random") else args.features)
        kind = f"{args.features}-frames" if frames else args.features
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        root = Path(args.cache or csv_dir / ".probe_cache") / f"{kind}-{tag}-{digest}"
        jobs = [(src, _cache_path(root, csv_dir, src)) for src, _ in items]
        todo = [j for j in jobs if not j[1].exists()]
        problem = audio.output_problem(root, folder=True) if todo else None
        if problem:  # before any extraction: a read-only dataset folder would fail every clip's cache write
            raise ProbeError(f"feature cache {root}: {problem}; pass --cache DIR to keep the features elsewhere")
        if todo:
            print(f"probe.py: computing features of {len(todo)} of {len(jobs)} clips ({name}) into {root}",
                  file=sys.stderr, flush=True)
        if todo and args.features in ("cqt", "mfcc"):
            fn = handmade_features(args.features, frames)
            for src, dst in todo:
                try:
                    feats = fn(audio.load(src, sr=SAMPLE_RATE))
                except audio.AudioError as e:
                    print(f"error: {e}", file=sys.stderr)
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(dst.name + ".tmp.npy")
                try:
                    np.save(tmp, feats.astype(np.float32))
                    os.replace(tmp, dst)
                except BaseException:  # Ctrl-C, a full disk: no partial file in the cache
                    tmp.unlink(missing_ok=True)
                    raise
        elif todo:  # the checkpoint is loaded only when some clip still needs its features
            if args.features == "random":
                torch.manual_seed(args.seed)
                model = type(loaded)(cfg).eval()  # MERT-v1 or MERT-v2, as the checkpoint
            else:
                model = loaded or _load_model(ckpt)  # loaded once, when the frame grid needed its config
            model = model.to(extract.pick_device(args.device))
            extract.extract_files(model, todo, keep or list(range(model.num_states)), pool="none" if frames else "mean",
                                  batch=args.batch)
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
        if frames:
            f = np.asarray(f, dtype=np.float32) if f.ndim == 3 else None
        else:
            f = np.asarray(f.mean(1) if f.ndim == 3 else f, dtype=np.float32)  # [layers, frames, dim] -> mean over time
        if f is None or f.ndim != (3 if frames else 2) or not np.isfinite(f).all():
            what = "[layers, frames, dim] (extract.py --pool none)" if frames else "[layers, dim]"
            print(f"error: {p}: features are not a finite {what} array", file=sys.stderr)
            out.append(None)
            continue
        out.append(f)
    if keep is None:  # features read back whole: keep the layers asked for now
        n = next((f.shape[0] for f in out if f is not None), 1)
        try:
            keep = extract.parse_layers(_layer_spec(args), n)
        except ValueError as e:
            raise ProbeError(str(e))
        out = [f[keep] if f is not None and f.shape[0] == n else f for f in out]
    return out, name, grid, keep


# ----------------------------------------------------------------------------- metrics


def metrics(task: str, y: np.ndarray, out: np.ndarray) -> dict:
    """Task metrics from targets and probe outputs (logits, or predictions in target units for regress)."""
    if task == "classify":
        return {"accuracy": float((out.argmax(1) == y).mean())}
    if task == "tag":
        aucs = [mm.roc_auc(y[:, c], out[:, c]) for c in range(y.shape[1])]
        aps = [mm.average_precision(y[:, c], out[:, c]) for c in range(y.shape[1])]
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
    if task in ("classify", "chords", "segments"):  # frames without a label (-100) count for nothing
        ce = F.cross_entropy(out.flatten(0, 1), y.repeat(P), ignore_index=-100, reduction="none").view(P, -1)
        return ce.sum(1) / (y != -100).sum().clamp(min=1)
    if task in ("tag", "beats", "notes"):
        return F.binary_cross_entropy_with_logits(out, y.expand_as(out), reduction="none").flatten(1).mean(1)
    return F.mse_loss(out[..., 0], y.expand(P, -1), reduction="none").mean(1)


class Progress:
    """One probe training's epochs on stderr: a tqdm bar (epoch, best validation score so far and its layer) in a
    terminal; written to a log file instead, a line every 30 s and one at the end of a frame task's training or of
    any that took longer (frame tasks run for many minutes per layer set on a CPU)."""

    def __init__(self, total: int, desc: str, args):
        from tqdm import tqdm
        self.desc, self.total, self.t0, self.last, self.args = desc, total, time.time(), time.time(), args
        self.bar = tqdm(total=total, desc=desc, unit="epoch", file=sys.stderr, leave=False) if sys.stderr.isatty() \
            else None

    def _state(self, best: torch.Tensor) -> str:
        i = int(best.argmax())
        ids = getattr(self.args, "layer_ids", None)
        where = "the combination" if len(best) == 1 and self.desc.endswith("combination") else \
            f"layer {ids[i] if ids is not None and len(ids) == len(best) else i}"
        return f"best valid {SELECT[self.args.task]} {float(best[i]):.4f} ({where})"

    def update(self, epoch: int, best: torch.Tensor):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(self._state(best))
        elif time.time() - self.last >= 30:
            self.last = time.time()
            print(f"probe.py: {self.desc}: epoch {epoch}/{self.total}, {self._state(best)}, "
                  f"{time.time() - self.t0:.0f} s", file=sys.stderr, flush=True)

    def close(self, epoch: int, best: torch.Tensor):
        if self.bar is not None:
            self.bar.close()
        elif self.args.task in FRAME_TASKS or time.time() - self.t0 >= 30:
            print(f"probe.py: {self.desc}: done after {epoch} epochs, {self._state(best)}, "
                  f"{time.time() - self.t0:.0f} s", file=sys.stderr, flush=True)


def train_probes(data, hidden: int, combine: bool, args) -> tuple[Probes, list]:
    """Train with AdamW and early stopping on each probe's validation score; returns the best probes and epochs.

    data (ClipData or FrameData) gives the sizes, train_loss(model, batch indices) and valid_scores(model)."""
    torch.manual_seed(args.seed)
    model = Probes(data.n_layers, data.dim, data.n_out, hidden, args.dropout if hidden else 0.0, combine)
    groups = [{"params": [p for n, p in model.named_parameters() if n != "mix"]}]
    if combine:
        # The layer weights get their own, larger step: Adam moves a parameter by about lr per step whatever its
        # gradient, so at the probe's lr the mixing logits barely leave 0 in the few hundred steps before early
        # stopping, and the weights stayed at 1/L. No weight decay: it would pull them back to uniform.
        groups.append({"params": [model.mix], "lr": args.mix_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    P = 1 if combine else data.n_layers
    # float64: in float32, score - 1e-9 rounds back to score, so a tie never counted and a plateau of the
    # metric (accuracy moves in steps) stopped training instead of being broken by the validation loss
    best_score = torch.full((P,), -float("inf"), dtype=torch.float64)
    best_loss = torch.full((P,), float("inf"), dtype=torch.float64)
    best = [p.detach().clone() for p in model.parameters()]
    best_epoch, since = [0] * P, 0
    g = torch.Generator().manual_seed(args.seed)
    progress = Progress(args.epochs, f"{'mlp' if hidden else 'linear'} probe" +
                        (" on the layer combination" if combine else f"s of {P} layers"), args)
    for epoch in range(1, args.epochs + 1):
        model.train()
        for idx in torch.randperm(data.n_train, generator=g).split(args.batch_size or data.batch_size):
            loss = data.train_loss(model, idx).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            scores, vloss = data.valid_scores(model)
        scores, vloss = scores.double(), vloss.double()
        better = (scores > best_score + 1e-9) | ((scores > best_score - 1e-9) & (vloss < best_loss))
        since = 0 if better.any() else since + 1
        if better.any():
            best_score = torch.where(better, scores, best_score)
            best_loss = torch.where(better, vloss, best_loss)
            for b, p in zip(best, model.parameters()):
                b[better] = p.detach()[better]
            for i in torch.nonzero(better).flatten().tolist():
                best_epoch[i] = epoch
        progress.update(epoch, best_score)
        if since >= args.patience:
            break
    progress.close(epoch, best_score)
    with torch.no_grad():
        for b, p in zip(best, model.parameters()):
            p.copy_(b)
    return model.eval(), best_epoch


def _to_target_units(out: torch.Tensor, y: dict) -> np.ndarray:
    """Probe output for one probe [N, C] -> numpy in the units the metric expects."""
    out = out.numpy()
    mean, std = y["scale"]  # (0, 1) unless regression targets were standardised
    return out * std + mean


def _standardise(x: dict, n: int = None) -> dict:
    """Standardise each layer [L, N, D] of every split, in place, with the training split's statistics
    (over its first n items when given: the frame tasks' last row is padding)."""
    train = x["train"][:, :n]
    mean, std = train.mean(1, keepdim=True), train.std(1, keepdim=True)
    # Floor each dimension's scale at a tenth of the layer's RMS scale: a near-constant dimension (a CQT bin
    # above the music, a dead unit) would otherwise be blown up to unit variance and the probe would fit its noise.
    std = torch.maximum(std, 0.1 * std.square().mean(2, keepdim=True).sqrt())
    for v in x.values():
        v.sub_(mean).div_(std + 1e-5)
    return x


class ClipData:
    """A clip task as the probes see it: standardised features [L, N, D] and targets per split."""

    batch_size = 64

    def __init__(self, task: str, X: torch.Tensor, targets: np.ndarray, n_classes: int, split: np.ndarray):
        self.task, self.x, y = task, {}, {}
        for s in ("train", "valid", "test"):
            m = split == s
            self.x[s], y[s + "_np"] = X[:, torch.from_numpy(m)], targets[m]
        self.x = _standardise(self.x)  # boolean indexing copied each split: standardising in place is safe
        y["scale"] = (float(y["train_np"].mean()), float(y["train_np"].std() + 1e-8)) if task == "regress" else (0.0, 1.0)
        for s in ("train", "valid"):
            y[s] = torch.from_numpy((y[s + "_np"] - y["scale"][0]) / y["scale"][1] if task == "regress" else y[s + "_np"])
        self.y = y
        self.n_layers, self.n_train, self.dim = self.x["train"].shape
        self.n_out = n_classes if task != "regress" else 1

    def train_loss(self, model, idx):
        return _loss(self.task, model(self.x["train"][:, idx]), self.y["train"][idx])

    def valid_scores(self, model):
        out = model(self.x["valid"])
        scores = [metrics(self.task, self.y["valid_np"], _to_target_units(o, self.y))[SELECT[self.task]] for o in out]
        return torch.tensor(scores, dtype=torch.float64), _loss(self.task, out, self.y["valid"])

    def evaluate(self, model) -> list:
        """Per probe: the valid and test metrics."""
        out = {s: model(self.x[s]) for s in ("valid", "test")}
        return [{s: metrics(self.task, self.y[s + "_np"], _to_target_units(out[s][i], self.y)) for s in out}
                for i in range(out["valid"].shape[0])]


# ----------------------------------------------------------------------------- frame tasks

# The probe's chord classes are MIREX's majmin vocabulary (mm.MAJMIN_VOCAB: N and the 24 major and minor triads,
# the level most chord recognition results are reported at, and one with enough examples per class in any
# dataset). Reference chords are scored as written (mirmetrics reads the whole grammar); for training, a chord
# whose notes up to the fifth are a major or minor triad (C:7, A:min7/5) is that triad, and others (dim, aug, sus,
# X) are not trained on.


def chord_class(label: str) -> int:
    """A reference chord's index in mm.MAJMIN_VOCAB, or -100 (no training target)."""
    i = mm.majmin_index(label)
    return -100 if i is None else i


PEAK_RADIUS_S = {"beats": 0.1, "notes": 0.05}  # a peak is the largest activation within this many seconds


def frame_times(n: int, grid: tuple) -> np.ndarray:
    """Centre times (s) of n frames on a grid: (hop in samples, centre of frame 0 in samples, sample rate)."""
    hop, first, sr = grid
    return (first + hop * np.arange(n)) / sr


class FrameData:
    """A frame task as the probes see it: every clip's frames, standardised, with --context frames either side,
    targets at the frames' centre times, and the decoding and scoring of probe outputs against the annotations."""

    batch_size = 512

    def __init__(self, task: str, clips: list, feats: list, grid: tuple, args):
        self.task, self.context, self.args = task, args.context, args
        self.frame_s = grid[0] / grid[2]
        for c, f in zip(clips, feats):
            c["times"] = frame_times(f.shape[1], grid)
            try:
                rate, n, _ = audio.info(c["path"])
                c["end"] = n / rate
            except audio.AudioError:  # features without their audio (--feats): the last frame's edge
                c["end"] = c["times"][-1] + self.frame_s / 2
        train = [c for c in clips if c["split"] == "train"]
        if task == "chords":
            self.classes = mm.MAJMIN_VOCAB
        elif task == "segments":
            self.classes = sorted({lab for c in train for lab in c["ann"][1]})
        elif task == "beats":  # downbeats when every beat file numbers its beats in the bar
            numbered = sum(c["ann"][1] is not None for c in clips)
            if 0 < numbered < len(clips):
                print(f"probe.py: {len(clips) - numbered} of {len(clips)} beat files have no beat-in-bar numbers: "
                      "beats only, no downbeats", file=sys.stderr)
            self.classes = ["beat", "downbeat"] if numbered == len(clips) else ["beat"]
        else:
            midi = np.concatenate([mm.hz_to_midi(c["ann"][1]) for c in train])
            if not len(midi):
                raise ProbeError(f"{args.labels}: no notes in the training split")
            self.low = int(midi.min())
            self.classes = [f"{mm.NOTE_NAMES[m % 12]}{m // 12 - 1}" for m in range(self.low, int(midi.max()) + 1)]
        self.n_out = len(self.classes)
        self.clips, x, y = {}, {}, {}
        for s in ("train", "valid", "test"):
            cs = [(c, f) for c, f in zip(clips, feats) if c["split"] == s]  # run() made sure none is empty
            self.clips[s] = [c for c, _ in cs]
            y[s] = torch.from_numpy(np.concatenate([self._targets(c) for c, _ in cs]))
            L, _, D = cs[0][1].shape
            x[s] = torch.empty(L, len(y[s]) + 1, D)  # [L, frames of all clips + a pad row, D]
            lo = 0
            for c, f in cs:
                c["lo"], c["hi"] = lo, lo + len(c["times"])
                x[s].numpy()[:, lo:c["hi"]] = f  # (f may be a read-only memory map of the cached file)
                lo = c["hi"]
        self.n_layers, self.n_train, self.dim = L, len(y["train"]), D * (2 * self.context + 1)
        self.x = _standardise(x, self.n_train)
        for v in self.x.values():
            v[:, -1] = 0  # past a clip's edge the context is the mean frame
        self.y = y
        self.ctx = {s: self._context_index(self.clips[s]) for s in x}

    def _mark(self, col: np.ndarray, times: np.ndarray, events: np.ndarray):
        """Target 1 at the frame holding each event, 0.5 at its neighbours (a little tolerance for the timing, as
        beat trackers widen their targets); events outside the clip's frames are dropped."""
        k = np.round((np.asarray(events) - times[0]) / self.frame_s).astype(int)
        k = k[(k >= 0) & (k < len(times))]
        for d in (-1, 1):
            j = np.clip(k + d, 0, len(times) - 1)
            col[j] = np.maximum(col[j], 0.5)
        col[k] = 1.0

    def _targets(self, c) -> np.ndarray:
        """Training targets of one clip's frames: class indices [T] (-100: none), or activations [T, C]."""
        times, ann = c["times"], c["ann"]
        if self.task in ("chords", "segments"):
            labels = mm.labels_at(ann[0], ann[1], times)
            index = {n: i for i, n in enumerate(self.classes)}
            if self.task == "chords":
                return np.array([-100 if lab is None else chord_class(lab) for lab in labels], np.int64)
            c["ref"] = labels  # what the segments score compares with, at every evaluation
            return np.array([index.get(lab, -100) for lab in labels], np.int64)
        y = np.zeros((len(times), self.n_out), np.float32)
        if self.task == "beats":
            self._mark(y[:, 0], times, ann[0])
            if self.n_out == 2:
                self._mark(y[:, 1], times, ann[0][ann[1] == 1])
        else:
            for (onset, _), m in zip(ann[0], mm.hz_to_midi(ann[1])):
                if self.low <= m < self.low + self.n_out:
                    self._mark(y[:, m - self.low], times, [onset])
        return y

    def _context_index(self, clips) -> torch.Tensor:
        """[frames, 2K + 1] rows of the frames t-K..t+K of the same clip (the zero pad row past its edges)."""
        rows, pad = [], clips[-1]["hi"]
        for c in clips:
            t = np.arange(c["lo"], c["hi"])[:, None] + np.arange(-self.context, self.context + 1)[None]
            rows.append(np.where((t >= c["lo"]) & (t < c["hi"]), t, pad))
        return torch.from_numpy(np.concatenate(rows))

    def _inputs(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        x = self.x[split][:, self.ctx[split][idx]]  # [L, B, 2K + 1, D]
        return x.flatten(2)

    def train_loss(self, model, idx):
        return _loss(self.task, model(self._inputs("train", idx)), self.y["train"][idx])

    def _outputs(self, model, split: str) -> torch.Tensor:
        """Probe outputs [P, frames, C] of a whole split, a chunk of frames at a time."""
        n = len(self.y[split])
        return torch.cat([model(self._inputs(split, torch.arange(a, min(a + 4096, n)))) for a in range(0, n, 4096)], 1)

    def valid_scores(self, model):
        """Early stopping follows the frame accuracy for chords and segments, the loss for beats and notes."""
        out, y = self._outputs(model, "valid"), self.y["valid"]
        vloss = _loss(self.task, out, y)
        if self.task in ("chords", "segments"):
            m = y != -100
            return (out.argmax(-1)[:, m] == y[m]).double().mean(1), vloss
        return -vloss.double(), vloss

    def evaluate(self, model) -> list:
        """Per probe: decode, score the valid and test splits; activation thresholds are chosen on valid."""
        out = {s: self._outputs(model, s) for s in ("valid", "test")}
        results = []
        for p in range(out["valid"].shape[0]):
            r = {}
            r["valid"], th = self.score("valid", out["valid"][p].numpy())
            r["test"], _ = self.score("test", out["test"][p].numpy(), th)
            if th:
                r["thresholds"] = th
            results.append(r)
        return results

    def score(self, split: str, out: np.ndarray, thresholds: dict | None = None) -> tuple[dict, dict]:
        """Metrics of one probe's outputs [frames, C] on a split, and the thresholds used (chosen here if None)."""
        clips = self.clips[split]
        if self.task == "chords":
            pred, total = out.argmax(1), {lvl: [0.0, 0.0] for lvl in mm.CHORD_LEVELS}
            for c in clips:
                chords = [mm.MAJMIN_VOCAB[k] for k in pred[c["lo"]:c["hi"]]]
                iv, labels = mm.frames_to_segments(chords, c["times"], c["end"])
                for lvl, (ok, n) in mm.chord_scores(c["ann"][0], c["ann"][1], iv, labels).items():
                    total[lvl][0] += ok
                    total[lvl][1] += n
            return {lvl: mm.ratio(*total[lvl]) for lvl in mm.CHORD_LEVELS}, {}  # duration-weighted over clips
        if self.task == "segments":
            pred, ok, n = out.argmax(1), 0, 0
            for c in clips:
                a, b = mm.frame_accuracy(c["ref"], [self.classes[k] for k in pred[c["lo"]:c["hi"]]])
                ok, n = ok + a, n + b
            return {"accuracy": mm.ratio(ok, n)}, {}
        act = 1 / (1 + np.exp(-out.astype(np.float64)))
        radius = max(1, round(PEAK_RADIUS_S[self.task] / self.frame_s))
        peaks = [np.where(mm.pick_peaks(act[c["lo"]:c["hi"]], radius), act[c["lo"]:c["hi"]], 0.0) for c in clips]
        names = ("beat_f", "downbeat_f")[:self.n_out] if self.task == "beats" else ("note_f",)
        thresholds = dict(thresholds or {})
        res = {}
        for name in names:
            if name in thresholds:
                scores = self._events(clips, peaks, name, thresholds[name])
            else:  # the threshold that scores best on this (the validation) split
                thresholds[name], scores = mm.best_threshold(lambda th: self._events(clips, peaks, name, th), name)
            res.update({k: v for k, v in scores.items() if k in METRICS[self.task]})
        return res, thresholds

    def _events(self, clips, peaks, name: str, th: float) -> dict:
        """The event F-measures (mean over clips) of the peaks at or above one threshold."""
        if self.task == "beats":
            col = 0 if name == "beat_f" else 1
            refs = [c["ann"][0] if col == 0 else c["ann"][0][c["ann"][1] == 1] for c in clips]
            ests = [c["times"][pk[:, col] >= th] for c, pk in zip(clips, peaks)]
            return {name: mm.mean_beat_f(refs, ests, 0.07, self.args.min_beat_time)}
        ests = []
        for c, pk in zip(clips, peaks):
            t, p = np.nonzero(pk >= th)
            on = c["times"][t]
            # offsets are neither predicted nor scored
            ests.append((np.stack([on, on + self.frame_s], 1), mm.midi_to_hz(self.low + p)))
        return mm.mean_note_scores([c["ann"] for c in clips], ests)


# ----------------------------------------------------------------------------- main


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag under its canonical (underscore) spelling with its default once; the hyphen aliases still work."""

    def _format_action_invocation(self, action):
        names = action.option_strings
        aliases = [o for o in names if "-" in o[2:] and "--" + o[2:].replace("-", "_") in names]
        if aliases:
            action = copy.copy(action)
            action.option_strings = [o for o in action.option_strings if o not in aliases]
        return super()._format_action_invocation(action)

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (--flag_name canonical, --flag-name accepted too)."""
    p = argparse.ArgumentParser(
        description="Probe frozen features per layer (linear and MLP, MARBLE-style) on a labelled CSV of clips: "
                    "clip tasks on features averaged over time, frame tasks (chords, beats, notes, segments) on "
                    "every frame. Flags may be spelled with hyphens (--weight-decay) too.",
        epilog="examples: python probe.py tasks/pitch.csv --json pitch.json\n"
               "          python probe.py tasks/chords.csv --task chords --features cqt",
        formatter_class=_Help)

    def add(name, **kw):  # --name_x, also as --name-x
        extract.add_flag(p, f"--{name}", **kw)
    p.add_argument("labels", help="CSV of path,label[,split]; paths relative to the CSV's folder; for frame tasks the label is an annotation file")
    add("task", default="auto", choices=("auto",) + TASKS + FRAME_TASKS,
        help="classify, tag (labels split on ';') or regress (auto guesses among these); chords, beats, notes or segments over time")
    add("ckpt", default=None, help="model to probe (default: the shipped model); anything extract.py --ckpt takes")
    add("features", default="model", choices=("model", "random", "cqt", "mfcc"), help="model: the checkpoint; random: its architecture at random initialisation; cqt/mfcc: hand-made baselines")
    add("feats", default=None, help="read features written by `extract.py <csv folder> -o DIR` instead of computing them")
    add("cache", default=None, help="feature cache folder (default: <csv folder>/.probe_cache)")
    add("json", default=None, help="write the full results here")
    add("layers", nargs="+", default="all", help="hidden states to probe: all, N, A-B or a list, space- or "
        "comma-separated (as extract.py --layers)")
    add("no_mlp", action="store_true", help="linear probes only")
    add("hidden", type=int, default=512, help="MLP probe hidden units")
    add("dropout", type=float, default=0.5, help="MLP probe dropout")
    add("lr", type=float, default=1e-3, help="probe learning rate (AdamW)")
    add("mix_lr", type=float, default=1e-2, help="learning rate of the layer-combination weights")
    add("weight_decay", type=float, default=1e-4, help="probe weight decay")
    add("batch_size", type=int, default=None, help="probe training batch size (default: 64 clips; 512 frames for frame tasks)")
    add("epochs", type=int, default=None, help="most epochs per probe (default: 300; 50 for frame tasks, whose epochs "
        "are hundreds of batches)")
    add("patience", type=int, default=None, help="stop after this many epochs without a better validation score "
        "(default: 20; 5 for frame tasks)")
    add("seed", type=int, default=0, help="seed of the random split, probe initialisation and order, and --features random")
    add("context", type=int, default=0, help="frame tasks: frames either side joined to each frame's features")
    add("min_beat_time", type=float, default=0.0, help="beats: ignore beats before this time (s) when scoring (MIREX: 5)")
    add("pitch_unit", default="hz", choices=("hz", "midi"), help="notes: unit of the pitch column")
    add("batch", type=int, default=8, help="clips per forward pass when extracting")
    add("device", default="auto", help="device for feature extraction: auto, cpu, cuda, mps")
    return p


def _probe_all(data, args) -> dict:
    """Per-layer probes, the best layer on validation and the learned layer combination, linear and MLP."""
    L, key = data.n_layers, SELECT[args.task]
    out = {"per_layer": [{} for _ in range(L)], "best": {}, "weighted": {}}
    kinds = {"linear": 0} if args.no_mlp else {"linear": 0, "mlp": args.hidden}
    for kind, hidden in kinds.items():
        probes, epochs = train_probes(data, hidden, False, args)
        with torch.no_grad():
            res = data.evaluate(probes)
        for i in range(L):
            out["per_layer"][i][kind] = {**res[i], "epochs": epochs[i]}
        b = max(range(L), key=lambda i: (res[i]["valid"][key], -i))  # chosen on validation, never on test
        out["best"][kind] = {"layer": b, "valid": res[b]["valid"], "test": res[b]["test"]}
        if L > 1:
            mix, epochs = train_probes(data, hidden, True, args)
            with torch.no_grad():
                res = data.evaluate(mix)[0]
            out["weighted"][kind] = {**res, "epochs": epochs[0],
                                     "weights": [round(w, 4) for w in mix.mix[0].softmax(0).tolist()]}
    return out


def run(args) -> dict:
    """Probe every layer and the softmax-weighted combination; returns the results as a dict."""
    t0 = time.time()
    csv_path = Path(args.labels)
    items, splits, task = read_labels(csv_path, args.task, args.seed)
    args.task = task
    frames = task in FRAME_TASKS
    if args.epochs is None:
        args.epochs = 50 if frames else 300
    if args.patience is None:
        args.patience = 5 if frames else 20
    anns = [None] * len(items)
    if frames:  # read every annotation first: a bad one is named once and its clip left out
        for i, (_, label) in enumerate(items):
            ann = Path(label)
            ann = ann if ann.is_absolute() else csv_path.parent / ann
            try:
                anns[i] = mm.read_annotation(task, ann, args.pitch_unit)
            except mm.AnnotationError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            if not len(anns[i][0]):  # scored as it is, it would drop a metric (downbeats) for every clip
                print(f"error: {ann}: no {task} in the file; clip left out", file=sys.stderr)
                anns[i] = None
        ok = [i for i in range(len(items)) if anns[i] is not None]
        feats = [None] * len(items)
        got, source, grid, layer_ids = compute_features([items[i] for i in ok], args, csv_path.parent, frames=True)
        for i, f in zip(ok, got):
            feats[i] = f
    else:
        feats, source, grid, layer_ids = compute_features(items, args, csv_path.parent)
    keep = [i for i, f in enumerate(feats) if f is not None]
    if len(keep) < len(items):
        print(f"probe.py: {len(items) - len(keep)} of {len(items)} clips left out (no features"
              f"{' or annotation' if frames else ''})", file=sys.stderr)
    if not keep:
        raise ProbeError(f"{csv_path}: no clip has features{' and an annotation' if frames else ''}")
    shapes = {(feats[i].shape[0], feats[i].shape[-1]) if frames else feats[i].shape for i in keep}
    if len(shapes) != 1:
        raise ProbeError(f"{csv_path}: features differ in shape across clips: {sorted(shapes)[:3]}")
    split = np.array([splits[i] for i in keep])
    for s in ("train", "valid", "test"):
        if not (split == s).any():
            raise ProbeError(f"{csv_path}: no clip of the {s} split has features")
    if frames:
        clips = [{"path": items[i][0], "split": splits[i], "ann": anns[i]} for i in keep]
        data = FrameData(task, clips, [feats[i] for i in keep], grid, args)
        names = data.classes
        del feats
    else:
        targets, names = encode_targets([items[i][1] for i in keep], task)
        if task == "classify":
            missing = sorted(set(range(len(names))) - set(targets[split == "train"].tolist()))
            if missing:
                print(f"probe.py: classes absent from train: {[names[i] for i in missing][:5]}", file=sys.stderr)
        X = torch.from_numpy(np.stack([feats[i] for i in keep], 1))  # [L, N, D]
        data = ClipData(task, X, targets, len(names), split)
    results = {"labels": str(csv_path), "task": task, "features": source, "layers": data.n_layers,
               "dim": int(data.dim // (2 * args.context + 1) if frames else data.dim),
               "clips": {s: int((split == s).sum()) for s in ("train", "valid", "test")},
               "classes": names, "metrics": list(METRICS[task]), "seed": args.seed}
    if frames:
        results["frames"] = {s: len(data.y[s]) for s in ("train", "valid", "test")}
        results["frame_times"] = {"first": grid[1] / grid[2], "hop": grid[0] / grid[2]}  # seconds
        results["context"] = args.context
        if task == "beats" and data.n_out == 1:
            results["metrics"] = ["beat_f"]
    args.layer_ids = layer_ids  # for the progress lines
    probed = _probe_all(data, args)
    for i, p in enumerate(probed["per_layer"]):
        p["layer"] = int(layer_ids[i])
    for b in probed["best"].values():
        b["layer"] = int(layer_ids[b["layer"]])
    results["per_layer"] = [{"layer": p.pop("layer"), **p} for p in probed["per_layer"]]
    results["best"], results["weighted"] = probed["best"], probed["weighted"]
    results["clips_left_out"] = len(items) - len(keep)
    results["seconds"] = round(time.time() - t0, 1)
    return results


DESCRIBE = {"chords": "weighted chord symbol recall", "beats": "F-measure (70 ms)", "notes": "F-measure (50 ms)",
            "segments": "frame"}


def print_table(r: dict, file=None):
    """The per-layer table, best layer and weighted combination as plain text (stdout by default)."""
    file = file or sys.stdout
    kinds = [k for k in ("linear", "mlp") if k in r["per_layer"][0]]
    cols = [(k, m) for k in kinds for m in r["metrics"]]
    c = r["clips"]
    unit = {"classify": "classes", "tag": "tags", "regress": "targets", "beats": "activations", "notes": "pitches"}
    n = f"{c['train']}/{c['valid']}/{c['test']} clips"
    if "frames" in r:
        f = r["frames"]
        n += f" ({f['train']}/{f['valid']}/{f['test']} frames, context +-{r['context']})"
    print(f"{r['labels']}: {r['task']}, {len(r['classes']) or 'float'} {unit.get(r['task'], 'classes')}, {n} "
          f"(train/valid/test); {r['features']}: {r['layers']} x {r['dim']}", file=file)
    print(f"test {DESCRIBE.get(r['task'], '')}{' ' if r['task'] in DESCRIBE else ''}"
          + ", ".join(r["metrics"]) + " per layer; the best layer is chosen on the validation split", file=file)
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
    """Run the CLI; returns the exit code (0 ok, 1 when clips were left out, 2 on bad flags, a bad labels file,
    model or features)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    bad = [f for f, ok in (("--epochs", args.epochs is None or args.epochs >= 1),
                           ("--patience", args.patience is None or args.patience >= 1),
                           ("--context", args.context >= 0),
                           ("--batch_size", args.batch_size is None or args.batch_size >= 1),
                           ("--batch", args.batch >= 1), ("--hidden", args.hidden >= 1)) if not ok]
    if bad:
        print(f"probe.py: {', '.join(bad)} out of range (see --help)", file=sys.stderr)
        return 2
    if args.features in ("model", "random") and args.ckpt is None and not args.feats and not extract.DEFAULT_CKPT.exists():
        print(f"probe.py: no --ckpt given and no shipped model at {extract.DEFAULT_CKPT}", file=sys.stderr)
        return 2
    try:
        extract.pick_device(args.device)  # the one device check every command shares
    except ValueError as e:
        print(f"probe.py: {e}", file=sys.stderr)
        return 2
    problem = args.json and audio.output_problem(args.json)
    if problem:
        print(f"probe.py: --json {args.json}: {problem}", file=sys.stderr)
        return 2
    try:
        results = run(args)
    except ProbeError as e:
        print(f"probe.py: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # cached features are renamed into place whole: a rerun reads back what is done
        print("probe.py: interrupted (Ctrl-C); no results written (the features cached so far are complete and "
              "a rerun reads them back)", file=sys.stderr)
        return 130
    print_table(results)
    if args.json:
        tmp = Path(args.json).with_name(Path(args.json).name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, args.json)
    if results["clips_left_out"]:  # the table stands, on fewer clips than asked: say so in the exit code too
        print(f"probe.py: exit 1: {results['clips_left_out']} clips left out (named above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
