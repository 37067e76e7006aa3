"""MERT pretraining: teachers on the fly, masked prediction, plain torch DDP. One file.

    python train.py --size tiny --data ./music --out runs/tiny --max_steps 60 --warmup_steps 10  # a CPU
    torchrun --nproc_per_node=8 train.py --size 330m --data /music --out runs/330m  # a GPU node

Every step: a batch of random crops (audio.py) -> the teachers label the clean audio (RVQ codes, CQT
frames; teachers.py) -> in-batch noise is mixed in -> spans of frames are masked -> the model predicts
the teachers' labels at the masked frames (mert.py holds the loss). Any field of TrainConfig or
MERTConfig can be set on the command line (`--lr 3e-4`, `--n_layers 6`); the resolved configuration is
printed at the start and saved in every checkpoint.

Design notes:
- MERT's recipe by default (README's recipe table): the official global batch per preset, with the
  gradient accumulation that reaches it on any number of devices; one crop per file per epoch in
  length-grouped batches cut to their shortest clip; the acoustic codes of each crop equal the whole
  file's (the teacher encodes audio before the crop first); masks with equal counts per device's
  micro-batch; fairseq's gradient normalisation (each micro-batch weighted by its masked frames).
- Exact resume: micro-batch g = (step * accum + micro) * world + rank reads global batch g of the
  data stream (a pure function of the seed and g) and seeds its masks, noise and dropout from
  (seed, g), so a resumed run continues bit for bit, and one process accumulating the micro-batches
  of N processes computes what they compute.
- Checkpoints hold model, optimiser, step and both configs; they are written atomically (temp file,
  then rename) from the unwrapped model and read back with torch.load(weights_only=True).
- Faults: the same command continues the run in --out (--resume auto), so a torchrun restart or a
  requeued job resumes by itself; SIGTERM ends the step with a checkpoint (exit 75); the newest
  --keep_ckpts checkpoints stay, CRC-checked on resume, a damaged one is named and skipped.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import audio
import teachers as teachers_lib
from mert import (MERT, MERTConfig, PRESETS, CheckpointError, compute_mask_indices, load_checkpoint, load_state_strict,
                  mix_noise)


@dataclass
class TrainConfig:
    """Training hyperparameters; TRAIN_PRESETS holds the official ones per size."""

    size: str = "tiny"
    data: str = ""  # folder(s), manifest or prepared shards, comma-separated
    val_data: str = ""  # held-out audio for the validation loss (empty: none)
    out: str = "runs/tiny"
    teachers: str = "rvq+cqt"  # any of rvq, randproj, mfcc, cqt joined by '+'
    acoustic_ckpt: str = ""  # rvq.py or EnCodec checkpoint; empty: the random-projection teacher stands in
    mfcc_ckpt: str = ""  # k-means fitted by `python teachers.py fit-mfcc`
    n_q: int = 8  # code streams taken from the acoustic (or random-projection) teacher (MERT: 8)
    acoustic_context: float = teachers_lib.ACOUSTIC_CONTEXT_SECONDS  # s before a crop an LSTM teacher encodes first
    cqt_log: bool = False  # log10(|CQT| + 1e-3) + 1.5 as the CQT target (MERT: linear magnitude)
    freeze: str = ""  # comma-separated parameter-name prefixes kept at their initial values (MERT: none)
    max_steps: int = 400_000
    warmup_steps: int = 32_000
    lr: float = 5e-4
    weight_decay: float = 0.01
    decay_matrices_only: bool = False  # ours: no decay on biases, norms and embeddings (MERT: decay on all)
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 10.0
    batch_size: int = 8  # clips per device per micro-step
    total_batch_size: int = 0  # clips per optimiser step over all devices (0: batch_size x world)
    crop_seconds: float = 5.0
    sampling: str = "epoch"  # "epoch": each file once an epoch (MERT); "duration": files by duration, with replacement
    noise_prob: float = 0.5
    noise_min_seconds: float = 0.5
    noise_max_seconds: float = 1.0
    eval_interval: int = 500
    eval_clips: int = 64
    ckpt_interval: int = 1000
    keep_ckpts: int = 2  # checkpoints kept as ckpt_<step>.pt, newest first (-1: every one)
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    seed: int = 1337
    num_workers: int = 2
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 autocast on CUDA, float32 elsewhere
    compile: bool = False
    # auto: continue OUT's run if it has one (fairseq likewise restores save_dir/checkpoint_last.pt by default,
    # checkpoint.restore_file in fairseq/dataclass/configs.py); true: must continue; false: must start fresh
    resume: str = "auto"
    init: str = ""  # fresh run's starting weights: our checkpoint, a fairseq MERT .pt (with heads) or a Hugging Face folder


TRAIN_PRESETS = {
    "tiny": dict(max_steps=2000, warmup_steps=200, lr=5e-4, grad_clip=10.0, batch_size=8, crop_seconds=5.0,
                 eval_interval=200, ckpt_interval=200, out="runs/tiny"),
    # MERT_RVQ-VAE_CQT_95M.yaml as scripts/run_training.sh runs it: 8 GPUs, max_tokens 1.8M samples ->
    # 15 clips of 5 s, cut to a multiple of 8 by fairseq's batch_by_size (required_batch_size_multiple)
    # = 8 per GPU, update_freq 1: 64 clips per update
    "95m": dict(lr=5e-4, grad_clip=10.0, crop_seconds=5.0, noise_max_seconds=1.0, batch_size=8,
                total_batch_size=64, out="runs/95m"),
    # MERT_RVQ-VAE_CQT_330M.yaml: 64 GPUs, max_tokens 920k (run_training.sh) -> 7 clips of 5.12 s per
    # GPU, update_freq 8: 7 x 64 x 8 = 3,584 clips (5.1 h of audio) per update
    "330m": dict(lr=1.5e-3, grad_clip=1.0, crop_seconds=5.12, noise_max_seconds=1.5, batch_size=7,
                 total_batch_size=3584, out="runs/330m"),
}

HELP = {
    "size": "model and training preset",
    "data": "training audio: folders, files, manifests or prepared shards (space- or comma-separated)",
    "val_data": "held-out audio for the validation loss (space- or comma-separated)",
    "out": "run folder for checkpoints and the JSONL log",
    "teachers": "label producers joined by '+': rvq, randproj, mfcc, cqt",
    "acoustic_ckpt": "RVQ teacher checkpoint (ours or EnCodec 24 kHz)", "mfcc_ckpt": "MFCC k-means teacher file",
    "n_q": "codebooks of the rvq/randproj teacher to predict, the first n_q (MERT: 8)",
    "acoustic_context": "seconds of audio before each crop that an acoustic teacher with an LSTM encodes first, so "
                        "the crop's codes equal the whole file's (MERT encodes whole files); the convolutions' own "
                        "reach is always added exactly",
    "cqt_log": "reconstruct log10(|CQT| + 1e-3) + 1.5 instead of MERT's linear CQT magnitude",
    "freeze": "comma-separated parameter-name prefixes to keep at initialisation, e.g. encoder.pos_conv_embed",
    "max_steps": "optimiser steps", "warmup_steps": "linear warm-up steps, then linear decay to 0 at max_steps",
    "lr": "peak learning rate",
    "weight_decay": "decoupled weight decay, AdamW-style, on every parameter as fairseq's Adam (MERT: 0.01)",
    "decay_matrices_only": "ours, off by default: no weight decay on biases, norms, label and mask embeddings "
                           "(the GPT/BERT convention)",
    "beta1": "Adam beta1",
    "beta2": "Adam beta2", "eps": "Adam epsilon", "grad_clip": "clip the global gradient norm to this (0: off)",
    "batch_size": "clips per device per micro-step",
    "total_batch_size": "clips per optimiser step across devices (the presets: MERT's); gradient accumulation = "
                        "total / (batch_size x devices) (0: no accumulation)",
    "crop_seconds": "seconds per training crop",
    "sampling": "epoch: every file gives one random crop an epoch, batches of similar length cut to their shortest "
                "clip (MERT); duration: files drawn by duration with replacement, short ones zero-padded (padding "
                "is never masked, labelled, scored or mixed in)",
    "noise_prob": "probability that a clip gets in-batch noise (MERT's mixture_prob is the probability it does not: "
                  "noise iff rand > mixture_prob; 0.5 either way); validation batches are mixed too, as MERT's",
    "noise_min_seconds": "shortest noise segment", "noise_max_seconds": "longest noise segment",
    "eval_interval": "steps between validation losses", "eval_clips": "validation clips per evaluation",
    "ckpt_interval": "steps between checkpoints (SIGTERM also writes one)",
    "keep_ckpts": "checkpoints kept as OUT/ckpt_<step>.pt, the newest K (-1: all, to probe or export a run's "
                  "history); a resume falls back to an older one when the newest is damaged",
    "max_bad_steps": "consecutive non-finite steps that stop the run",
    "seed": "seed of crops, masks, noise and initialisation", "num_workers": "data loader processes per device",
    "device": "auto, cpu, cuda", "dtype": "auto, float32 or bfloat16 (autocast)",
    "compile": "torch.compile the model",
    "resume": "auto: continue the run in OUT if there is one, else start it (what a restarted job needs); "
              "true: continue, error if OUT has no checkpoint; false: start fresh, error if OUT holds a run",
    "init": "start a fresh run (new optimiser and schedule) from these weights: a train.py checkpoint, an official "
            "MERT fairseq .pt with its pretraining heads, or a Hugging Face folder or hub id (encoder only; heads "
            "start fresh). Ignored when the run resumes",
}


# -----------------------------------------------------------------------------
# configuration from the command line


# Fields that a resumed run may change (the schedule and its bookkeeping): taken from the checkpoint
# unless given, applied and announced when given. MACHINE_FIELDS always come from the command (where
# and how this launch runs). Every other field (the model, teachers, seed, crops, batch, noise, ...)
# defines the run: a resume takes the checkpoint's value and refuses a different one given on the
# command line, naming it. Fields added later are fixed unless listed here.
RESUME_MAY_CHANGE = ("max_steps", "warmup_steps", "lr", "weight_decay", "beta1", "beta2", "eps", "grad_clip",
                     "eval_interval", "eval_clips", "ckpt_interval", "keep_ckpts", "max_bad_steps", "val_data")
MACHINE_FIELDS = ("data", "out", "device", "dtype", "compile", "num_workers", "resume")
IGNORED_ON_RESUME = ("init",)  # the run's own value stays (where it started); a given one is ignored, with a note
HEAD_FIELDS = ("n_codebooks", "codebook_size", "cqt_bins")  # set by the teachers
LIST_FLAGS = ("data", "val_data")  # path lists: space- or comma-separated

EPILOG = """examples:
  python train.py --size tiny --data ./music --out runs/tiny --max_steps 60 --warmup_steps 10
  torchrun --nproc_per_node=8 --max-restarts 3 train.py --size 95m --data /shards --out runs/95m

A rerun of the same command continues the run in --out (--resume auto). SIGTERM finishes the current
step, writes a checkpoint and exits with code 75; rerun the same command to continue. Exit codes:
0 done, 1 unusable input (data, checkpoint), 2 usage, 3 non-finite losses, 75 stopped by SIGTERM.
Flags may be spelled with hyphens too (--max-steps); --data takes paths space- or comma-separated.
"""


def _show(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def _default_text(name: str) -> str:
    """' (default: X)', or per size ' (default: tiny X, 95m Y, 330m Z)', read from the presets at help time."""
    if name == "size":
        return " (default: tiny)"
    if name in HEAD_FIELDS:
        return " (default: from --teachers)"
    if name in TrainConfig.__dataclass_fields__:
        base = TrainConfig.__dataclass_fields__[name].default
        per = {size: _show(TRAIN_PRESETS.get(size, {}).get(name, base)) or "none" for size in PRESETS}
    else:
        base = MERTConfig.__dataclass_fields__[name].default
        per = {size: _show(PRESETS[size].get(name, base)) for size in PRESETS}
    if len(set(per.values())) == 1:
        return f" (default: {next(iter(per.values()))})"
    return " (default: " + ", ".join(f"{k} {v}" for k, v in per.items()) + ")"


def build_parser() -> argparse.ArgumentParser:
    """Every TrainConfig and MERTConfig field as --name (bools take true/false); defaults come from the presets."""
    p = argparse.ArgumentParser(description="MERT pretraining (single process or torchrun DDP).", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(f, help_text):
        kind = f.type if isinstance(f.type, type) else type(f.default)
        help_text = (help_text + _default_text(f.name)).replace("%", "%%")
        if f.name == "resume":
            p.add_argument("--resume", type=_resume_mode, nargs="?", const="true", default=None,
                           metavar="{auto,true,false}", help=help_text)
        elif f.name == "keep_ckpts":
            p.add_argument("--keep_ckpts", type=_keep_count, default=None, metavar="K", help=help_text)
        elif f.name in LIST_FLAGS:
            p.add_argument(f"--{f.name}", nargs="+", default=None, metavar="PATH", help=help_text)
        elif kind is bool:
            p.add_argument(f"--{f.name}", type=_bool, nargs="?", const=True, default=None, help=help_text)
        elif kind is tuple:
            p.add_argument(f"--{f.name}", type=lambda s: tuple(int(v) for v in s.split(",")), default=None,
                           help=help_text + " (comma-separated)")
        else:
            p.add_argument(f"--{f.name}", type=kind, default=None, help=help_text)

    for f in fields(TrainConfig):
        add(f, HELP[f.name] + (f" (choices: {', '.join(PRESETS)})" if f.name == "size" else ""))
    p.add_argument("--print_config", "--print-config", action="store_true", default=None,
                   help="print the resolved training and model configs, the accumulation and the global batch as "
                        "JSON and exit (for WORLD_SIZE devices, 1 outside torchrun); --data is not needed")
    model_group = {f.name for f in fields(TrainConfig)}
    for f in fields(MERTConfig):
        if f.name not in model_group:
            add(f, f"model: MERTConfig.{f.name}")
    return p


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _resume_mode(s: str) -> str:
    """--resume auto|true|false (yes/no/1/0 accepted)."""
    if s.lower() == "auto":
        return "auto"
    try:
        return "true" if _bool(s) else "false"
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {s!r}") from None


def _keep_count(s) -> int:
    """--keep_ckpts K >= 1, or -1 for all; true/false (the flag's old boolean form) mean all / the newest only."""
    if isinstance(s, bool) or str(s).lower() in ("true", "false", "yes", "no"):
        return -1 if (s if isinstance(s, bool) else _bool(str(s))) else 1
    try:
        k = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or -1 (all), got {s!r}") from None
    if k == 0 or k < -1:
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or -1 (all), got {s!r}")
    return k


def hyphen_aliases(argv: list, names) -> list:
    """--max-steps -> --max_steps (also --max-steps=5) for the given flag names: hyphens are aliases."""
    canon = {n.replace("_", "-"): n for n in names if "_" in n}
    out = []
    for a in argv:
        flag, eq, value = a.partition("=")
        if flag.startswith("--") and flag[2:] in canon:
            a = f"--{canon[flag[2:]]}{eq}{value}"
        out.append(a)
    return out


def parse_given(argv=None) -> dict:
    """The fields set on the command line (name -> typed value); list flags joined by commas."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = [f.name for f in fields(TrainConfig)] + [f.name for f in fields(MERTConfig)]
    args = vars(build_parser().parse_args(hyphen_aliases(argv, names)))
    args.pop("print_config", None)  # an action, not a field (main dispatches on it)
    given = {k: v for k, v in args.items() if v is not None}
    for k in LIST_FLAGS:
        if k in given:  # ["a,b", "c"] -> "a,b,c"
            given[k] = ",".join(x.strip() for v in given[k] for x in v.split(",") if x.strip())
    return given


def resolve_configs(argv=None, require_data: bool = True) -> tuple[TrainConfig, dict]:
    """(TrainConfig, MERTConfig overrides) from presets plus command-line values; validated."""
    return configs_from(parse_given(argv), require_data)


def configs_from(given: dict, require_data: bool = True) -> tuple[TrainConfig, dict]:
    """(TrainConfig, MERTConfig overrides) from the presets plus the fields given (parse_given); validated."""
    size = given.get("size", "tiny")
    if size not in PRESETS:
        raise SystemExit(f"train.py: unknown --size {size!r}; choose from {', '.join(PRESETS)}")
    tnames = {f.name for f in fields(TrainConfig)}
    tc = TrainConfig(**{**TRAIN_PRESETS[size], **{k: v for k, v in given.items() if k in tnames}, "size": size})
    model_over = {k: v for k, v in given.items() if k not in tnames}
    if not tc.data and require_data:
        raise SystemExit("train.py: --data is required (a folder of audio, a manifest or prepared shards)")
    if tc.sampling not in ("epoch", "duration"):
        raise SystemExit(f"train.py: --sampling must be epoch or duration, not {tc.sampling!r}")
    if tc.acoustic_context < 0:
        raise SystemExit("train.py: --acoustic_context must be >= 0 seconds")
    if tc.batch_size < 1 or tc.max_steps < 0 or tc.crop_seconds <= 0.02:
        raise SystemExit("train.py: --batch_size must be >= 1, --max_steps >= 0 and --crop_seconds > 0.02")
    return tc, model_over


# -----------------------------------------------------------------------------
# pieces


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up to tc.lr over warmup_steps, then linear decay to 0 at max_steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    return tc.lr * max(0.0, (tc.max_steps - step) / max(1, tc.max_steps - tc.warmup_steps))


def freeze_parameters(model: torch.nn.Module, prefixes: str) -> list[str]:
    """Turn off gradients of the parameters whose names start with any of the comma-separated prefixes."""
    frozen = []
    for prefix in [p.strip() for p in prefixes.split(",") if p.strip()]:
        hits = [(n, p) for n, p in model.named_parameters() if n == prefix or n.startswith(prefix + ".")]
        if not hits:
            raise SystemExit(f"train.py: --freeze {prefix!r} matches no parameter (names look like "
                             f"{next(model.named_parameters())[0]!r})")
        for n, p in hits:
            if p.requires_grad:  # overlapping prefixes name a parameter once
                p.requires_grad_(False)
                frozen.append(n)
    return frozen


def configure_optimizer(model: torch.nn.Module, tc: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW with decoupled decay on every trainable parameter, which is fairseq's Adam (fairseq/optim/adam.py:
    p -= lr * wd * p, then the Adam step; "corresponds to the AdamW variant"), over all parameters as
    fairseq's trainer passes them. decay_matrices_only: no decay on biases, norms and embeddings (ours)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not tc.decay_matrices_only:
        groups = [{"params": [p for _, p in params], "weight_decay": tc.weight_decay}]
    else:
        decay, no_decay = [], []
        for name, p in params:
            matrix = p.dim() >= 2 and "label_embs" not in name and "masked_spec_embed" not in name
            (decay if matrix else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, fused=fused or None)


def set_fairseq_eps(optimizer: torch.optim.Optimizer, tc: TrainConfig) -> None:
    """Before each step: the eps that makes torch's AdamW step fairseq's Adam step exactly.

    fairseq adds eps to sqrt(v) and folds the bias corrections into the step size; torch adds it to
    sqrt(v / (1 - beta2^t)). Equal when torch's eps is eps / sqrt(1 - beta2^t) (they differ in the first
    few hundred steps, and where gradients are as small as eps)."""
    for group in optimizer.param_groups:
        st = next((optimizer.state[p] for p in group["params"] if optimizer.state.get(p)), {})
        t = int(st.get("step", 0)) + 1
        group["eps"] = tc.eps / math.sqrt(1.0 - tc.beta2 ** t)


def resolve_batch(tc: TrainConfig, world: int) -> tuple[int, int]:
    """(clips per optimiser step, gradient accumulation steps) for `world` devices: the same global batch on any
    number of devices whose micro-batches tile it."""
    total = tc.total_batch_size or tc.batch_size * world
    if total % (tc.batch_size * world):
        raise SystemExit(f"train.py: the global batch of {total} clips (--total_batch_size) is not a multiple of "
                         f"--batch_size x devices = {tc.batch_size} x {world}; change either so that it is")
    return total, total // (tc.batch_size * world)


def micro_index(step: int, micro: int, accum: int, world: int, rank: int) -> int:
    """Global micro-batch g of (step, micro-step, rank): the batch the loader gives and the seed of its randomness.

    Rank r's micro-step m of step s reads global batch (s * accum + m) * world + r, so one process that
    accumulates world x accum micro-batches reads, masks and mixes exactly what world processes do."""
    return (step * accum + micro) * world + rank


def draw_masks(cfg: MERTConfig, seed: int, g: int, n_frames: list, T: int) -> np.ndarray:
    """Masks [B, T] of micro-batch g, one device's rows: fairseq applies require_same_masks to the batch its model
    sees (per GPU), so the equal-count cut spans these rows only. n_frames: each clip's valid frames."""
    return compute_mask_indices(len(n_frames), T, cfg.mask_prob, cfg.mask_length, cfg.min_masks, lengths=n_frames,
                                rng=np.random.default_rng([seed, g, 1]))


def data_position(g: int, tc: TrainConfig, ds: audio.CropDataset) -> dict:
    """Where the data stream stands before global micro-batch g (what a resumed run recomputes from the step)."""
    pos = {"sampling": tc.sampling, "global_batch": g, "batch_size": tc.batch_size}
    if tc.sampling == "epoch":
        pos["epoch"], pos["batch_in_epoch"] = divmod(g, -(-ds.n_files // tc.batch_size))
    return pos


def prepare_batch(batch: dict, context: tuple, device: torch.device) -> tuple:
    """A loader batch (CropDataset.example dicts) -> (wav [B, L] clean crops, lengths [B] list, the teachers' context
    (audio, offset, left, right) or None)."""
    buf = batch["audio"].to(device, non_blocking=True)  # (B, left + L + right)
    L = buf.shape[1] - context[0] - context[1]
    wav = buf[:, context[0]:context[0] + L]
    ctx = (buf, context[0], batch["left"], batch["right"]) if context != (0, 0) else None
    return wav, batch["length"].tolist(), ctx


def build_teachers(tc: TrainConfig, device, log) -> teachers_lib.Teachers:
    """The run's teachers, frozen, on `device`."""
    return teachers_lib.build_teachers(tc.teachers.replace("+", ","), acoustic_ckpt=tc.acoustic_ckpt or None,
                                       mfcc_ckpt=tc.mfcc_ckpt or None, device=device, seed=tc.seed, n_q=tc.n_q,
                                       cqt_log=tc.cqt_log, log=log).to(device).eval()


def fresh_model_config(tc: TrainConfig, teach, model_over: dict, log) -> tuple[MERTConfig, dict | None]:
    """A new run's model config (heads sized by the teachers) and, with --init, the weights to start from."""
    heads = dict(n_codebooks=teach.n_codebooks, codebook_size=teach.codebook_size, cqt_bins=teach.cqt_bins)
    if tc.init:  # the source fixes the model's shape
        return init_from(tc.init, tc.size, heads, model_over, tc.teachers, log)
    return MERTConfig.from_preset(tc.size, **{**heads, **model_over}), None


def print_config(argv=None) -> int:
    """`--print_config`: the resolved configs, accumulation and global batch as JSON on stdout (no data, no devices)."""
    tc, model_over = resolve_configs(argv, require_data=False)
    world = int(os.environ.get("WORLD_SIZE", 1))
    total, accum = resolve_batch(tc, world)
    log = functools.partial(print, file=sys.stderr)
    teach = build_teachers(tc, torch.device("cpu"), log)
    cfg, _ = fresh_model_config(tc, teach, model_over, log)
    left, right = teach.context(tc.acoustic_context)
    out = {"train": asdict(tc), "model": asdict(cfg), "world_size": world, "micro_batch": tc.batch_size,
           "accumulation": accum, "global_batch": {"clips": total, "seconds_per_clip": tc.crop_seconds,
                                                   "audio_hours": round(total * tc.crop_seconds / 3600, 3)},
           "teacher_context_seconds": [left / 24000, right / 24000]}
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(out, indent=1))
    return 0


def estimate_flops_per_clip(cfg: MERTConfig, n_samples: int) -> float:
    """Forward + backward FLOPs for one clip: 3 x (2 x multiply-adds) of convs, linears and attention."""
    macs, n = 0, n_samples
    c_in = 1
    for c, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride):
        n = (n - k) // s + 1
        macs += n * c * c_in * k
        c_in = c
    T, d = n, cfg.dim
    macs += T * cfg.conv_dim[-1] * d  # feature projection
    macs += T * d * (d // cfg.pos_conv_groups) * cfg.pos_conv_kernel  # positional conv
    per_layer = T * (4 * d * d + 2 * d * cfg.ffn_dim) + 2 * T * T * d  # linears + QK^T and AV
    macs += cfg.n_layers * per_layer
    macs += T * d * (cfg.n_codebooks * cfg.final_dim + cfg.cqt_bins)  # heads (upper bound: all frames)
    return 3 * 2 * macs


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU for MFU (H100/H200 SXM: 989 TFLOP/s; A100: 312), None if unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40", 181e12), ("4090", 165e12)):
        if key in name:
            return flops
    return None


# The fields that shape an encoder's weights and outputs: --init takes them from its source.
ARCH_FIELDS = ("dim", "n_layers", "n_heads", "ffn_dim", "pre_ln", "conv_dim", "conv_kernel", "conv_stride", "conv_bias",
               "extractor_norm", "proj_norm", "pos_conv_kernel", "pos_conv_groups", "norm_eps", "sample_rate")


def init_from(path: str, size: str, heads: dict, model_over: dict, teachers: str, log) -> tuple[MERTConfig, dict]:
    """--init: (the run's model config, the initial weights to load) from an existing model.

    The encoder's shape comes from the source; everything else (dropout, masking, loss weights) from --size and
    the command line, as for any fresh run. A pretraining head the source has (code heads: label tables and
    final projection; CQT head) must fit the teachers exactly and is loaded; one it lacks starts fresh.
    """
    try:
        src_cfg, state, src = load_checkpoint(path, for_training=True)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"train.py: --init {e}")
    clash = [f"--{f} {model_over[f]} (source: {getattr(src_cfg, f)})" for f in ARCH_FIELDS + ("final_dim",)
             if f in model_over and model_over[f] != getattr(src_cfg, f)
             and (f != "final_dim" or "label_embs" in state)]  # final_dim is the source's only with its code heads
    if clash:
        raise SystemExit(f"train.py: --init {src} fixes the model's shape; {', '.join(clash)} contradicts it")
    has_codes, has_cqt = "label_embs" in state, "cqt_head.weight" in state
    problems = []
    if has_codes and (src_cfg.n_codebooks, src_cfg.codebook_size) != (heads["n_codebooks"], heads["codebook_size"]):
        problems.append(f"code heads for {src_cfg.n_codebooks} codebooks x {src_cfg.codebook_size} codes, the teachers "
                        f"give {heads['n_codebooks']} x {heads['codebook_size']}")
    if has_cqt and src_cfg.cqt_bins != heads["cqt_bins"]:
        problems.append(f"a CQT head of {src_cfg.cqt_bins} bins, the teachers give {heads['cqt_bins']}")
    if problems:
        raise SystemExit(f"train.py: --init {src} does not fit --teachers {teachers}: it has {'; '.join(problems)}")
    cfg = MERTConfig.from_preset(size, **{**heads, **model_over})
    cfg = replace(cfg, **{f: getattr(src_cfg, f) for f in ARCH_FIELDS},
                  **({"final_dim": src_cfg.final_dim} if has_codes else {}))
    loaded, fresh = ["encoder"], []
    if has_codes:
        loaded.append(f"code heads ({cfg.n_codebooks} x {cfg.codebook_size} codes, final_dim {cfg.final_dim})")
    elif cfg.n_codebooks:
        fresh.append(f"code heads ({cfg.n_codebooks} x {cfg.codebook_size} codes, final_dim {cfg.final_dim})")
    if has_cqt:
        loaded.append(f"CQT head ({cfg.cqt_bins} bins)")
    elif cfg.cqt_bins:
        fresh.append(f"CQT head ({cfg.cqt_bins} bins)")
    if "masked_spec_embed" not in state:
        fresh.append("mask embedding")
    log(f"init: {src}: loaded {', '.join(loaded)}; fresh (not in the source): {', '.join(fresh) or 'nothing'}; "
        f"the optimiser, learning-rate schedule and step start anew")
    shaped_like = [n for n in PRESETS
                   if all(getattr(MERTConfig.from_preset(n), f) == getattr(cfg, f) for f in ARCH_FIELDS)]
    if shaped_like and size not in shaped_like:
        log(f"init: the source has --size {shaped_like[0]}'s shape; the training settings follow --size {size} "
            f"(pass --size {shaped_like[0]} for its learning rate, dropout and crops)")
    return cfg, state


class BadFileLog:
    """CropDataset's on_bad: names each unusable file once per launch, across ranks and loader workers.

    Every process appends "<path>\t<problem>" to OUT/skipped_files.txt under an exclusive lock and
    prints only what was not there yet (a file that vanishes mid-run fails in every loader process).
    A module-level class, not a closure, because loader workers pickle it.
    """

    def __init__(self, path, rank: int):
        self.path, self.rank = str(path), rank

    def __call__(self, msg: str):
        key = msg.split(": ", 1)[0]  # "<path>: <problem>" -> the path
        try:
            import fcntl
            with open(self.path, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                f.seek(0)
                if any(line.split("\t", 1)[0] == key for line in f):
                    return
                f.write(f"{key}\t{msg}\n")
                f.flush()
        except (OSError, ImportError):  # no lock on this system or file system: name it here anyway
            pass
        print(f"[rank {self.rank}] skipping unreadable audio: {msg}", file=sys.stderr, flush=True)


def _fsync_dir(d: Path):
    """Make a rename in d durable (a crash right after must not bring the old name back)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # no directory handles on this system
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: Path, obj: dict):
    """torch.save to a temp file, fsync, then rename: a crash or a full disk never leaves a half-written
    checkpoint and never touches the previous one; the temp file is removed on failure."""
    _save_atomic(path, obj)


def _save_atomic(path: Path, obj):
    _write_atomic(path, lambda f: torch.save(obj, f))


def _write_atomic(path: Path, write):
    """write(f) into a temp file, fsync, rename over path, fsync the folder; the temp file goes on failure."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on the disk before the name points at it (network file systems)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def keep_copy(src: Path, dst: Path):
    """Keep src's current contents also as dst: a hard link (no second write of a 330M checkpoint),
    or a copy where the file system has no links; via a temp name and rename, like save_checkpoint."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


TRAIN_KEYS = ("config", "train_config", "model", "optimizer", "step")


def read_checkpoint(path, keys=TRAIN_KEYS) -> dict:
    """A checkpoint loaded with weights_only=True after checking every stored CRC (torch.load alone
    takes flipped bits silently); CheckpointError naming the file if it is missing, truncated, corrupt
    or lacks one of `keys`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            zip_magic = f.read(2) == b"PK"
        with zipfile.ZipFile(path) as z:  # torch.save writes a zip archive with a CRC-32 per record
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
        what = "truncated or damaged checkpoint" if zip_magic else "not a checkpoint written by torch.save"
        raise CheckpointError(f"{path}: {what} ({audio._oneline(e)})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint (CRC mismatch in {bad})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, unpickler and zip-record errors alike
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {audio._oneline(e)})") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a train.py checkpoint (no {', '.join(map(repr, missing))})")
    return state


def kept_checkpoints(out: Path) -> list[Path]:
    """OUT/ckpt_<step>.pt files, oldest step first."""
    return [q for _, q in sorted((int(q.stem[5:]), q) for q in out.glob("ckpt_*.pt") if q.stem[5:].isdigit())]


def checkpoint_candidates(out: Path) -> list[Path]:
    """OUT's checkpoints, newest first: ckpt.pt (always written first), then ckpt_<step>.pt by step;
    files that are the same inode (hard links) listed once."""
    files = kept_checkpoints(out)[::-1]
    main = out / "ckpt.pt"
    if main.is_file():
        files = [main] + [q for q in files if not _same_file(main, q)]
    return files


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def write_checkpoint(out: Path, obj: dict, keep: int) -> Path:
    """OUT/ckpt.pt (atomic), kept also as OUT/ckpt_<step>.pt; then only the newest `keep` of those stay.

    ckpt.pt is written first, so it is always the newest complete checkpoint; a failed write (full
    disk) raises OSError and leaves every earlier file as it was.
    """
    main = out / "ckpt.pt"
    save_checkpoint(main, obj)
    try:
        keep_copy(main, out / f"ckpt_{obj['step']}.pt")
    except OSError as e:  # ckpt.pt itself is complete: only the extra name is missing
        print(f"train.py: could not keep {main} also as ckpt_{obj['step']}.pt ({audio._oneline(e)})", file=sys.stderr,
              flush=True)
    if keep > 0:
        for q in kept_checkpoints(out)[:-keep]:
            q.unlink(missing_ok=True)
    return main


def read_log(path: Path) -> list[dict]:
    """log.jsonl's records; a torn last line (a kill mid-write) and other unparsable lines are dropped."""
    recs = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return recs
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            recs.append(r)
    return recs


def rewrite_log(path: Path, records: list[dict]):
    """Replace the log atomically (temp file, fsync, rename)."""
    _write_atomic(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))


def _norm(v):
    """A config value as JSON sees it (tuples and lists alike), for comparisons."""
    return json.loads(json.dumps(v))


def _diff(old: dict, new: dict, names) -> list[str]:
    return [f"--{k} {_show(old[k])} -> {_show(new[k])}" for k in names
            if k in old and k in new and _norm(old[k]) != _norm(new[k])]


def _expected_model(size: str, model_over: dict) -> dict:
    """The model config a fresh run of this command builds, without the teacher-set head fields."""
    base = {f.name: f.default for f in fields(MERTConfig)}
    d = {**base, **PRESETS[size], **model_over}
    return {k: v for k, v in d.items() if k not in HEAD_FIELDS}


class Refusal(Exception):
    """The run cannot start as asked: one line saying why and what to do, and the exit code."""

    def __init__(self, msg: str, code: int = 2):
        super().__init__(msg)
        self.code = code


def plan_run(tc: TrainConfig, model_over: dict, given: dict) -> dict:
    """Rank 0, before anything is built: start fresh or continue which checkpoint, with what config.

    Returns {"resume": path or None, "_state": the loaded checkpoint or None, "train_config": dict,
    "run_id": str, "notes": [lines to print], "_log": the log records to keep}; raises Refusal when it must not
    go on (a run it would overwrite, another run's log, no valid checkpoint, a fixed field changed).
    """
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    for tmp in list(out.glob("ckpt*.pt.tmp")) + [out / "log.jsonl.tmp"]:  # left by a kill mid-write
        tmp.unlink(missing_ok=True)
    (out / "skipped_files.txt").unlink(missing_ok=True)  # BadFileLog names each file once per launch
    log_path = out / "log.jsonl"
    log = read_log(log_path)
    events = [r for r in log if r.get("event") in ("start", "resume") and "run_id" in r]
    log_run = events[-1]["run_id"] if events else None
    cands = checkpoint_candidates(out) if out.is_dir() else []
    notes = []
    if tc.resume == "false" and cands:
        raise Refusal(f"train.py: {out} already holds a run ({cands[0].name}); continue it with --resume auto "
                      f"(the default) or choose another --out (--resume false never overwrites a run)")
    state, chosen, problems = None, None, []
    for path in cands if tc.resume != "false" else []:
        try:
            st = read_checkpoint(path)
            if path.stem[5:].isdigit() and int(path.stem[5:]) != st["step"]:
                raise CheckpointError(f"{path}: holds step {st['step']}, not {path.stem[5:]}")
            if log_run and st.get("run_id") and st["run_id"] != log_run:
                raise CheckpointError(f"{path}: written by another run (run_id {st['run_id']}; "
                                      f"{log_path.name} is run {log_run})")
        except CheckpointError as e:
            problems.append((path, str(e)))
            continue
        state, chosen = st, path
        break
    if cands and state is None:
        raise Refusal(f"train.py: no valid checkpoint in {out}: {'; '.join(m for _, m in problems)}. Restore a "
                      f"good copy, or move them away to start over (nothing was changed)", code=1)
    if state is None and tc.resume == "true":
        raise Refusal(f"train.py: --resume true but {out} holds no checkpoint (use --resume auto to start "
                      f"the run when there is none)")
    for path, msg in problems:  # damaged or foreign files (and their hard links) are moved aside, never deleted
        twins = [q for q in out.glob("ckpt_*.pt") if q != path and _same_file(q, path)]
        for q in [path] + twins:
            q.replace(q.with_name(q.name + ".bad"))
        notes.append(f"skipping {msg}; moved to {', '.join(q.name + '.bad' for q in [path] + twins)}")

    if state is None:  # a fresh start; a log without a checkpoint must be this very run's, restarted early
        if log:
            last = events[-1] if events else None
            if last is None or "train_config" not in last or "model_config" not in last:
                raise Refusal(f"train.py: {log_path} is another run's log and {out} has no checkpoint; choose "
                              f"another --out or delete {log_path} to start over here")
            fixed = [k for k in asdict(tc) if k not in RESUME_MAY_CHANGE + MACHINE_FIELDS + IGNORED_ON_RESUME]
            changed = _diff(last["train_config"], asdict(tc), fixed) + \
                _diff(last["model_config"], _expected_model(tc.size, model_over), _expected_model(tc.size, {}))
            if changed:
                raise Refusal(f"train.py: {log_path} is another run's log ({', '.join(changed)}) and {out} has no "
                              f"checkpoint; choose another --out or delete {log_path} to start over here")
            notes.append(f"{out}: the run stopped before its first checkpoint; starting it again from step 0")
        import uuid
        return {"resume": None, "_state": None, "train_config": asdict(tc), "run_id": uuid.uuid4().hex[:12],
                "notes": notes, "_log": []}

    # resume: the checkpoint's configuration, with what the command line may change applied
    old = state["train_config"]
    known = {f.name for f in fields(TrainConfig)}
    merged = {**asdict(tc), **{k: v for k, v in old.items() if k in known and k not in MACHINE_FIELDS}}
    if "keep_ckpts" in old:  # an older run's boolean --keep_ckpts
        merged["keep_ckpts"] = _keep_count(old["keep_ckpts"])
    refused = _diff(merged, given, [k for k in given if k in known and
                                    k not in RESUME_MAY_CHANGE + MACHINE_FIELDS + IGNORED_ON_RESUME])
    refused += _diff(state["config"], given, [k for k in given if k not in known])
    if refused:
        raise Refusal(f"train.py: cannot change {', '.join(refused)} when continuing the run in {chosen} (step "
                      f"{state['step']}); drop the flag, or start a new run in another --out")
    applied = _diff(merged, given, [k for k in given if k in RESUME_MAY_CHANGE])
    merged.update({k: given[k] for k in given if k in RESUME_MAY_CHANGE})
    merged["size"] = old.get("size", merged["size"])
    notes.append(f"resuming {chosen} at step {state['step']}"
                 + (f", applying {', '.join(applied)}" if applied else ""))
    keep = [r for r in log if r.get("step", 0) < state["step"] or
            (r.get("event") and r.get("step", 0) <= state["step"])]
    return {"resume": str(chosen), "_state": state, "train_config": merged, "notes": notes,
            "run_id": state.get("run_id") or log_run or "unknown", "_log": keep, "applied": applied}


def decide_on_rank0(ddp: bool, master: bool, fn):
    """fn() on rank 0, its result (or its Refusal) sent to every rank; keys starting with '_' stay on rank 0."""
    result = None
    if master:
        try:
            result = fn()
        except Refusal as e:
            result = {"refusal": (str(e), e.code)}
    if ddp:
        box = [None if result is None else {k: v for k, v in result.items() if not k.startswith("_")}]
        dist.broadcast_object_list(box, src=0)
        result = result if master else box[0]
    if "refusal" in result:
        msg, code = result["refusal"]
        if master:
            print(msg, file=sys.stderr, flush=True)
        if ddp:
            dist.destroy_process_group()
        raise SystemExit(code)
    return result


def _table_rows(t: dict) -> set:
    """A CropDataset.table() as a set of items, each named by its file (or shard) and extent."""
    return {(t["paths"][r], -1, n) if k == 0 else (t["shard_files"][r], o, n)
            for k, r, o, n in zip(t["kind"], t["ref"], t["offset"], t["length"])}


def keep_data_table(ddp: bool, master: bool, ds, out: Path, plan: dict) -> bool:
    """Fresh run: save the items it draws crops from (OUT/data.pt). Resume: if some of them are gone or
    unreadable now, draw from the saved items anyway (the bad ones fail when drawn and are redrawn,
    exactly as in the run that saw them go bad), so the resumed run reads the same crops. True if restored."""
    path = out / "data.pt"
    if not plan["resume"]:
        if master:
            _save_atomic(path, ds.table())
        return False

    read = {}  # rank 0's copy of the saved table, so it is loaded once there

    def decide():
        try:
            saved = read["table"] = torch.load(path, map_location="cpu", weights_only=True)
            old, now = _table_rows(saved), _table_rows(ds.table())
        except Exception as e:  # missing (a run from before data.pt) or damaged: the scan of now stands
            return {"restore": False, "note": f"cannot read {path} ({audio._oneline(e)}); the crops come from "
                                               f"today's scan of --data"}
        if now == old:
            return {"restore": False, "note": ""}
        if now < old:
            return {"restore": True, "note": f"{len(old - now)} of the run's {len(old)} files are missing or "
                                             f"unreadable now; they stay in the draw and are skipped when drawn, "
                                             f"as in the run itself"}
        return {"restore": False, "note": f"--data has {len(now - old)} files the run did not start with; the "
                                          f"crops come from today's files"}

    d = decide_on_rank0(ddp, master, decide)
    if d["note"] and master:
        print(f"train.py: {d['note']}", flush=True)
    if d["restore"]:
        ds.use_table(read.get("table") or torch.load(path, map_location="cpu", weights_only=True))
    return d["restore"]


class StopFlag:
    """SIGTERM handler: ask the loop to finish its step, write a checkpoint and exit with EXIT_PREEMPTED."""

    def __init__(self, verbose: bool = True):
        self.requested, self.pid, self.verbose = False, os.getpid(), verbose

    def __call__(self, signum, frame):
        if os.getpid() != self.pid:  # a forked loader worker that inherited the handler: nothing to do
            return
        if not self.requested and self.verbose:
            print(f"train.py: SIGTERM: finishing this step, then a checkpoint and exit {EXIT_PREEMPTED}",
                  file=sys.stderr, flush=True)
        self.requested = True


EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped on request with a checkpoint; run the command again


def _loader_worker_init(worker_id: int):
    """Loader workers ignore SIGTERM (Slurm and torchrun signal the whole process group): the training
    process decides when to stop and shuts its workers down itself."""
    audio.worker_init(worker_id)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def init_distributed(backend: str):
    """init_process_group from torchrun's environment, with this attempt's keys apart from earlier ones'.

    After `torchrun --max-restarts` restarts the workers, the launcher's store still holds the previous
    attempt's addresses under the same keys, and a new rank can read a dead rank's address and fail or
    hang connecting (seen with gloo on torch 2.13). A prefix per attempt (TORCHELASTIC_RESTART_COUNT)
    keeps every attempt's rendezvous apart.
    """
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"mert/attempt{attempt}/", store), rank=rank,
                            world_size=world)


def any_rank(ddp: bool, device, *flags: bool) -> list[bool]:
    """Each flag true if it is true on any rank (one all-reduce for all of them)."""
    if not ddp:
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    """Train as the command line says (see --help); SIGTERM stops it with a checkpoint and exit code 75."""
    if {"--print_config", "--print-config"} & set(sys.argv[1:] if argv is None else argv):
        return print_config(argv)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if on_main_thread else None
    loaders = []
    try:
        return _train(argv, loaders)
    finally:
        for dl in loaders:
            close_loader(dl)
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def close_loader(dl):
    """Stop a DataLoader's worker processes now (they exit when told). Needed on the way out with an
    exception (SIGTERM's exit 75, a crash): the traceback keeps the loader alive until interpreter exit,
    where multiprocessing would SIGTERM the workers, which ignore it (_loader_worker_init), and wait."""
    it = getattr(dl, "_iterator", None)  # a persistent-workers DataLoader keeps its iterator here
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()


def _train(argv=None, loaders=None):
    given = parse_given(argv)
    tc, model_over = configs_from(given)

    # -- distributed set-up: torchrun sets RANK; plain `python train.py` runs one process
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        use_cuda = torch.cuda.is_available() and tc.device in ("auto", "cuda")
        device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)  # before the first collective (decide_on_rank0's broadcast)
        init_distributed("nccl" if use_cuda else "gloo")
    else:
        rank, world = 0, 1
        device = torch.device("cuda" if tc.device == "auto" and torch.cuda.is_available() else
                              (tc.device if tc.device != "auto" else "cpu"))
    master = rank == 0

    def print0(*a, **k):
        if master:
            print(*a, **k, flush=True)

    # -- fresh start or resume (rank 0 decides, every rank follows): see plan_run
    plan = decide_on_rank0(ddp, master, lambda: plan_run(tc, model_over, given))
    tc = TrainConfig(**plan["train_config"])
    for note in plan["notes"]:
        print0(f"train.py: {note}")

    total, accum = resolve_batch(tc, world)
    use_bf16 = (tc.dtype == "bfloat16") or (tc.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    out = Path(tc.out)

    # -- teachers, then the data (crops on the label frame grid, with the audio around them the teachers need)
    teach = build_teachers(tc, device, print0)
    context = teach.context(tc.acoustic_context)
    crop = int(round(tc.crop_seconds * 24000))
    on_bad = BadFileLog(out / "skipped_files.txt", rank)
    data_kw = dict(crop_samples=crop, on_bad=on_bad, hop=teachers_lib.HOP, context=context)
    try:
        train_ds = audio.CropDataset(tc.data.split(","), seed=tc.seed, **data_kw)
        val_ds = audio.CropDataset(tc.val_data.split(","), seed=tc.seed + 1, **data_kw) if tc.val_data else None
    except audio.AudioError as e:  # a missing --data path, or nothing usable in it
        if ddp:
            dist.destroy_process_group()
        raise SystemExit(f"train.py: {e}") from None
    data_id = {"n_files": train_ds.n_files, "seconds": round(float(train_ds.seconds), 3)}
    if keep_data_table(ddp, master, train_ds, out, plan):
        data_id = None  # the run's own items: the checkpoint's data id still holds
    ckpt_path = out / "ckpt.pt"
    state = init_state = None
    if plan["resume"]:
        try:  # rank 0 has it already; the others read the file it chose (OUT must be shared by all nodes)
            state = plan["_state"] if master else read_checkpoint(plan["resume"])
        except CheckpointError as e:
            raise SystemExit(f"train.py: rank {rank} cannot read {e} (is --out on a file system every node "
                             f"sees?)") from None
        cfg = MERTConfig.from_dict(state["config"])
        if given.get("init"):
            print0(f"train.py: resuming {plan['resume']}: --init {given['init']} is ignored (it seeds fresh runs only)")
    else:
        cfg, init_state = fresh_model_config(tc, teach, model_over, print0)
    torch.manual_seed(tc.seed)
    model = MERT(cfg).to(device)
    if init_state is not None:  # over the seeded initialisation: the heads the source lacks stay fresh
        load_state_strict(model, {**model.state_dict(), **init_state}, tc.init)
    n_params = sum(p.numel() for p in model.parameters())
    frozen = freeze_parameters(model, tc.freeze)  # before the optimiser, which skips frozen parameters
    optimizer = configure_optimizer(model, tc, fused=device.type == "cuda")
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        # the optimiser's hyperparameters are this launch's (--lr, --weight_decay, ... may change on resume)
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # the parameter groups differ: the run was started with another --freeze
            raise SystemExit(f"train.py: {plan['resume']}'s optimiser state does not fit this model's trainable "
                             f"parameters (was the run started with a different --freeze?): {e}")
        for g, h in zip(optimizer.param_groups, hyper):
            g.update(h)
        step = state["step"]
        if data_id is None:
            data_id = state.get("data")
        elif state.get("data") != data_id:
            print0(f"warning: the training data changed since the checkpoint ({state.get('data')} -> {data_id}); "
                   f"the resumed run reads a different stream than the interrupted one would have")
    start_step = step
    if step >= tc.max_steps and state is not None:
        print0(f"train.py: the run in {out} is at step {step}, --max_steps is {tc.max_steps}: nothing to do "
               f"(raise --max_steps to train on)")
        if ddp:
            dist.destroy_process_group()
        return 0
    print0(f"train config: {json.dumps(asdict(tc))}")
    print0(f"model config: {json.dumps(asdict(cfg))}")
    print0(f"{n_params / 1e6:.2f}M parameters | world {world} | micro-batch {tc.batch_size} | accumulation {accum} "
           f"| {total} clips x {tc.crop_seconds} s per step ({total * tc.crop_seconds / 3600:.2f} h of audio) "
           f"| sampling {tc.sampling} | teacher context {context[0] / 24000:g} s + {context[1] / 24000:g} s "
           f"| device {device} | bf16 {use_bf16}")
    if frozen:
        print0(f"frozen at initialisation: {', '.join(frozen)}")
    raw_model = model
    if tc.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=cfg.layerdrop > 0)

    # SIGTERM (Slurm, Kubernetes, torchrun passing one on) finishes the step: see StopFlag. Installed
    # before the loader starts its workers, which ignore it (_loader_worker_init).
    stop = StopFlag(verbose=master)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)

    # micro-step k = step * accum + m of rank r reads global samples [(k*W + r)*b, (k*W + r + 1)*b)
    dl = audio.make_loader(train_ds, tc.batch_size, start=step * accum * world * tc.batch_size, rank=rank,
                           world_size=world, num_workers=tc.num_workers, pin_memory=device.type == "cuda",
                           sampling=tc.sampling)
    if tc.num_workers > 0:
        dl.worker_init_fn = _loader_worker_init
        if loaders is not None:
            loaders.append(dl)
    loader = iter(dl)
    flops_per_step = estimate_flops_per_clip(cfg, crop) * total
    peak = peak_flops(device)
    log = None
    if master:  # the log holds each step once: records past the resumed step are dropped, atomically
        event = {"event": "resume" if state is not None else "start", "step": step, "run_id": plan["run_id"],
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world": world,
                 "train_config": asdict(tc), "model_config": asdict(cfg)}
        if state is not None:
            event.update(checkpoint=Path(plan["resume"]).name, applied=plan.get("applied", []))
        rewrite_log(out / "log.jsonl", plan["_log"] + [event])
        log = open(out / "log.jsonl", "a")
    bad_in_row, save_failed, stopping = 0, None, False

    def checkpoint(step: int) -> bool:
        """Rank 0 writes OUT/ckpt.pt (and ckpt_<step>.pt); a failed write is named, the run goes on."""
        nonlocal save_failed
        if not master:
            return True
        ck = {"config": asdict(cfg), "train_config": asdict(tc), "model": raw_model.state_dict(),
              "optimizer": optimizer.state_dict(), "step": step, "data": data_id, "run_id": plan["run_id"],
              "position": data_position(step * accum * world, tc, train_ds)}
        try:
            write_checkpoint(out, ck, tc.keep_ckpts)
        except OSError as e:  # full disk, quota, I/O error: the previous checkpoints are untouched
            prev = checkpoint_candidates(out)
            save_failed = (f"train.py: step {step}: could not write a checkpoint in {out} ({audio._oneline(e)}); "
                           f"the newest one left is {prev[0].name if prev else 'none'}")
            print(save_failed + "; training goes on and tries again at the next checkpoint", file=sys.stderr,
                  flush=True)
            return False
        save_failed = None
        print(f"step {step} | checkpoint {ckpt_path} (also ckpt_{step}.pt)", flush=True)
        return True

    def forward_micro(batch: dict, g: int, model_) -> tuple:
        """Loss, loss parts and masked-frame count of one micro-batch: labels of the clean crops, then MERT's
        in-batch noise (also in validation, as MERT mixes in its forward), masks of this device's rows."""
        wav, lengths, ctx = prepare_batch(batch, context, device)
        T = raw_model.num_frames(wav.shape[1])
        n_frames = [min(T, raw_model.num_frames(n)) for n in lengths]
        mask = draw_masks(cfg, tc.seed, g, n_frames, T)
        with torch.no_grad():
            targets = teach(wav, T, context=ctx)  # the teachers see the clean audio
        noisy = mix_noise(wav, np.random.default_rng([tc.seed, g, 2]), tc.noise_prob, lengths=lengths,
                          seconds=(tc.noise_min_seconds, tc.noise_max_seconds)) if tc.noise_prob > 0 else wav
        with autocast:
            _, loss, parts = model_(noisy, lengths=None if min(lengths) == wav.shape[1] else lengths,
                                    targets=targets, mask=mask)
        return loss, parts, parts.pop("n_masked").float()

    def reduce_step(sums: dict) -> dict:
        """Masked-frame-weighted means of the step's loss terms over all micro-batches and ranks."""
        keys = sorted(sums)
        v = torch.stack([torch.as_tensor(sums[k], device=device, dtype=torch.float32) for k in keys])
        if ddp:
            dist.all_reduce(v)
        n = v[keys.index("n")].clamp(min=1)
        return {k: (x if k in ("n", "seconds") else x / n) for k, x in zip(keys, v)}  # totals stay totals

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        sums = {"n": 0.0, "loss": 0.0}
        n_val = min(tc.eval_clips, 10_000)
        for start in range(rank * tc.batch_size, n_val, world * tc.batch_size):
            idx = range(start, min(start + tc.batch_size, n_val))
            batch = torch.utils.data.default_collate([val_ds.example(i) for i in idx])
            loss, _, n = forward_micro(batch, 1 << 62 | start, raw_model)  # a seed no training batch uses
            sums["n"] += n
            sums["loss"] += loss.float() * n
        model.train()
        return reduce_step(sums)["loss"].item()

    model.train()
    while step <= tc.max_steps:
        last = step == tc.max_steps
        if stopping and not last:  # every rank agreed (any_rank below): checkpoint this step and leave
            saved = checkpoint(step) if step > start_step else True
            if ddp:
                dist.barrier()  # nobody exits before rank 0 has written
                dist.destroy_process_group()
            print0(f"train.py: stopped by SIGTERM at step {step}; " +
                   (f"checkpoint {ckpt_path} written" if saved and step > start_step else
                    "no new checkpoint" if saved else "its checkpoint could not be written") +
                   f"; run the same command to continue (exit {EXIT_PREEMPTED})")
            if log is not None:
                log.close()
            raise SystemExit(EXIT_PREEMPTED)
        if val_ds is not None and (step % tc.eval_interval == 0 or last) and step > 0:
            v = evaluate()
            print0(f"step {step} | val loss {v:.4f}")
            if master:
                log.write(json.dumps({"step": step, "val_loss": v}) + "\n")
                log.flush()
        if step > start_step and (step % tc.ckpt_interval == 0 or last):
            checkpoint(step)
        if last:
            break

        t0 = time.perf_counter()
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = {"n": 0.0, "loss": 0.0, "seconds": 0.0}
        for micro in range(accum):
            g = micro_index(step, micro, accum, world, rank)
            torch.manual_seed(hash((tc.seed, g)) % (2 ** 62))  # dropout and layerdrop of micro-batch g
            batch = next(loader)
            if ddp:
                model.require_backward_grad_sync = micro == accum - 1
            loss, parts, n = forward_micro(batch, g, model)
            # fairseq (hubert_criterion.py + trainer): each micro-batch's loss is summed over its masked frames,
            # and the step's gradient divided by the frames masked over all micro-batches and ranks
            (loss * n).backward()
            sums["n"] += n
            sums["seconds"] += float(batch["length"].sum()) / 24000  # epoch batches are cut to their shortest clip
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() * n
        step_means = reduce_step(sums)
        n_total = step_means.pop("n")
        seconds = step_means.pop("seconds").item()  # audio trained on this step, all ranks
        loss_sum = step_means.pop("loss")
        parts_sum = step_means
        grads = [p.grad for p in raw_model.parameters() if p.grad is not None]
        if grads:  # DDP averaged the ranks' sums: times world / frames = the frame-weighted mean
            torch._foreach_mul_(grads, world / n_total.clamp(min=1).item())
        gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        # one all-reduce: a non-finite step on any rank is skipped by all; a SIGTERM on any rank stops all
        nonfinite, stopping = any_rank(ddp, device, not bool(torch.isfinite(loss_sum) & torch.isfinite(gnorm)),
                                       stop.requested)
        if not nonfinite:
            set_fairseq_eps(optimizer, tc)
            optimizer.step()
            bad_in_row = 0
        else:
            bad_in_row += 1
            print0(f"step {step}: non-finite loss or gradient ({loss_sum.item()}, grad norm {gnorm.item()}); step skipped "
                   f"({bad_in_row} in a row)")
            if bad_in_row >= tc.max_bad_steps:
                print0(f"train.py: {bad_in_row} non-finite steps in a row; stopping. Lower --lr, check the data, "
                       f"or resume from {ckpt_path}")
                if ddp:
                    dist.destroy_process_group()
                if log is not None:
                    log.close()
                raise SystemExit(3)
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        audio_s = seconds / dt
        rec = {"step": step, "loss": loss_sum.item(), "grad_norm": gnorm.item(), "lr": lr, "ms": dt * 1000,
               "audio_s_per_s": audio_s, **{k: float(v) for k, v in parts_sum.items()}}
        if peak:
            # the estimate is for full crops; a batch cut shorter did proportionally less (attention aside)
            rec["mfu"] = flops_per_step * seconds / (total * tc.crop_seconds) / dt / world / peak
        if master:
            shown = " ".join(f"{k} {v:.3f}" for k, v in rec.items() if k in ("features_pen", "ce", "cqt", "ce_u", "cqt_u"))
            print(f"step {step} | loss {rec['loss']:.4f} ({shown}) | gnorm {rec['grad_norm']:.2f} | lr {lr:.2e} | "
                  f"{rec['ms']:.0f} ms | {audio_s:.0f} audio-s/s" + (f" | mfu {rec['mfu'] * 100:.1f}%" if peak else ""),
                  flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        step += 1
    if master:
        log.close()
    if ddp:
        dist.destroy_process_group()
    if save_failed:  # the last checkpoint is missing: the run did not end where it was asked to
        print(save_failed, file=sys.stderr, flush=True)
        return 1
    print0(f"train.py: done at step {step}; final checkpoint {ckpt_path}")
    return 0


def export(argv=None) -> int:
    """`python train.py export RUN/ckpt.pt OUT`: the encoder alone, as our .pt (default) or a Hugging Face folder."""
    p = argparse.ArgumentParser(
        prog="train.py export", description=export.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python train.py export runs/95m/ckpt.pt models/mine.pt\n"
               "  python train.py export runs/95m/ckpt.pt hf/mert-mine --format hf   # for transformers' HubertModel")
    p.add_argument("ckpt", help="a checkpoint written by train.py (also: a fairseq MERT .pt, a Hugging Face folder)")
    p.add_argument("out", help="the .pt file (--format pt) or the folder (--format hf) to write, atomically")
    p.add_argument("--format", default="pt", choices=["pt", "hf"],
                   help="pt (default): our encoder checkpoint (extract.py, probe.py); hf: the Hugging Face MERT-v1 "
                        "layout (config.json, model.safetensors, preprocessor_config.json) that transformers' "
                        "HubertModel loads")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of the weights (default: float16 for pt, float32 for hf as in MERT-v1's files)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty existing --format hf folder")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("float16" if args.format == "pt" else "float32"))
    meta = {}
    try:
        try:  # our checkpoints carry step and configs worth keeping in a .pt export
            obj = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        except Exception:  # a folder, a fairseq pickle, ...: load_checkpoint reads it or names the problem
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("config"), dict) and "model" in obj:
            cfg, state, src = MERTConfig.from_dict(obj["config"]), obj["model"], args.ckpt
            meta = {k: obj[k] for k in ("step", "train_config", "data") if k in obj}
        else:
            cfg, state, src = load_checkpoint(args.ckpt)
        model = MERT(cfg)
        load_state_strict(model, state, src)
    except (CheckpointError, ValueError) as e:
        print(f"train.py export: {e}", file=sys.stderr)
        return 1
    if args.format == "hf":
        try:
            folder = model.save_pretrained(args.out, dtype=dtype, overwrite=args.overwrite)
        except FileExistsError as e:
            p.error(str(e))
        except CheckpointError as e:
            print(f"train.py export: {args.ckpt}: cannot be expressed as a HuBERT config: {e}", file=sys.stderr)
            return 1
        mb = (folder / "model.safetensors").stat().st_size / 1e6
        print(f"train.py export: {folder}/ (Hugging Face MERT-v1 layout: config.json, model.safetensors {mb:.1f} MB "
              f"{args.dtype or 'float32'}, preprocessor_config.json; step {meta.get('step')})")
        return 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out, heads=False, dtype=dtype, **meta)
    print(f"train.py export: {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB, step {meta.get('step')})")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["export"]:
        sys.exit(export(sys.argv[2:]))
    sys.exit(main())
