"""MERT pretraining: teachers on the fly, masked prediction, plain torch DDP. One file.

    python train.py --size tiny --data ./music --out runs/tiny --max_steps 60 --warmup_steps 10  # a CPU
    torchrun --nproc_per_node=8 train.py --size 330m --data /music --out runs/330m  # a GPU node

Every step: random crops (audio.py) -> the teachers label the clean audio (RVQ codes, CQT frames;
teachers.py) -> in-batch noise is mixed in -> spans of frames are masked -> the model predicts the labels
at the masked frames (mert.py holds the loss). Any TrainConfig or MERTConfig field is a flag (`--lr 3e-4`);
the resolved configs are printed at the start and saved in every checkpoint. Read top-down: configs, the
recipe's pieces, the run's plumbing, the run (set-up, then the loop), the command line.

Design notes:
- MERT's recipe by default (README's recipe table): the official global batch per preset, reached by
  gradient accumulation on any number of devices; one crop per file per epoch in length-grouped batches cut
  to their shortest clip; each crop's acoustic codes equal the whole file's (the teacher encodes audio
  before the crop first, or the codes come from the shards: `audio.py prepare --codes`); masks with equal
  counts per device's micro-batch; fairseq's gradient normalisation (micro-batches weighted by masked frames).
- Exact resume: micro-batch g = (step * accum + micro) * world + rank reads global batch g of the data
  stream (a pure function of the seed and g) and seeds its masks, noise and dropout from (seed, g), so a
  resumed run continues bit for bit, and one process accumulating N processes' micro-batches computes theirs.
- The run folder (atomic checkpoints from the unwrapped model, CRC-checked reads, the log, the plan to start
  or continue, the stop request) is checkpoints.py's; what a resume may change is each field's "resume".
- Faults: the same command continues the run in --out, so a torchrun restart or a requeued job resumes by
  itself; SIGTERM ends the step with a checkpoint (exit 75); a damaged checkpoint is named and skipped.
"""

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import audio
import checkpoints
import teachers as teachers_lib
from mert import (MERT, MERTConfig, PRESETS, CheckpointError, compute_mask_indices, gpu_peak_flops, load_state_strict,
                  not_a_torch_file)

# -----------------------------------------------------------------------------
# configs


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


def _f(default, help: str, resume: str = "fixed", **arg):
    """A TrainConfig field: its default, its --help, what a resumed run does with it (checkpoints.plan_run's policy)
    and any argparse settings of its flag beyond the usual."""
    return field(default=default, metadata={"help": help, "resume": resume, "arg": arg})


MAY_CHANGE, MACHINE, IGNORED = "may_change", "machine", "ignored"
PATHS = dict(nargs="+", metavar="PATH")  # path lists: space- or comma-separated


@dataclass
class TrainConfig:
    """Training hyperparameters; TRAIN_PRESETS holds the official ones per size. On resume a field is "fixed" (the
    default: it defines the run; another value given is refused), MAY_CHANGE (the schedule and its bookkeeping:
    applied and announced when given), MACHINE (where and how this launch runs) or IGNORED (a note says so)."""

    size: str = _f("tiny", "model and training preset")
    data: str = _f("", "training audio: folders, files, manifests or prepared shards (space- or comma-separated)",
                   MACHINE, **PATHS)
    val_data: str = _f("", "held-out audio for the validation loss (space- or comma-separated)",
                       MAY_CHANGE, **PATHS)
    out: str = _f("runs/tiny", "run folder for checkpoints and the JSONL log", MACHINE)
    teachers: str = _f(teachers_lib.LABEL_DEFAULTS["teachers"],
                       "label producers joined by '+': rvq, randproj, mfcc, cqt")
    acoustic_ckpt: str = _f("", "the rvq teacher's checkpoint: EnCodec 24 kHz's encodec_24khz-d7cc33bc.th (MERT's "
                                "teacher) or an rvq.py one. Required by 95m and 330m unless --teachers names another "
                                "code teacher (randproj, mfcc); tiny without it: randproj stands in")
    mfcc_ckpt: str = _f("", "MFCC k-means teacher file (`python teachers.py fit-mfcc`)")
    n_q: int = _f(teachers_lib.LABEL_DEFAULTS["n_q"],
                  "codebooks of the rvq/randproj teacher to predict, the first n_q (MERT: 8)")
    acoustic_context: float = _f(teachers_lib.ACOUSTIC_CONTEXT_SECONDS, "seconds before each crop that an LSTM "
                                 "acoustic teacher encodes first, so the crop's codes equal the whole file's (MERT "
                                 "encodes whole files); the convolutions' reach is added exactly")
    cqt_log: bool = _f(False, "reconstruct log10(|CQT| + 1e-3) + 1.5 instead of MERT's linear CQT magnitude")
    freeze: str = _f("", "comma-separated parameter-name prefixes kept at initialisation (encoder.pos_conv_embed)")
    max_steps: int = _f(400_000, "optimiser steps", MAY_CHANGE)
    warmup_steps: int = _f(32_000, "linear warm-up steps, then linear decay to 0 at max_steps", MAY_CHANGE)
    lr: float = _f(5e-4, "peak learning rate", MAY_CHANGE)
    weight_decay: float = _f(0.01, "decoupled weight decay, AdamW-style, on every parameter as fairseq's Adam "
                                   "(MERT: 0.01)", MAY_CHANGE)
    decay_matrices_only: bool = _f(False, "ours, off by default: no weight decay on biases, norms, label and mask "
                                          "embeddings (the GPT/BERT convention)")
    beta1: float = _f(0.9, "Adam beta1", MAY_CHANGE)
    beta2: float = _f(0.98, "Adam beta2", MAY_CHANGE)
    eps: float = _f(1e-6, "Adam epsilon", MAY_CHANGE)
    grad_clip: float = _f(10.0, "clip the global gradient norm to this (0: off)", MAY_CHANGE)
    batch_size: int = _f(8, "clips per device per micro-step")
    total_batch_size: int = _f(0, "clips per optimiser step across devices (the presets: MERT's); gradient "
                                  "accumulation = total / (batch_size x devices) (0: no accumulation)")
    crop_seconds: float = _f(5.0, "seconds per training crop")
    sampling: str = _f("epoch", "epoch: every file gives one random crop an epoch, batches of similar length cut "
                                "to their shortest clip (MERT); duration: files drawn by duration with replacement, "
                                "short ones zero-padded (padding is never masked, labelled, scored or mixed in)")
    noise_prob: float = _f(0.5, "probability that a clip gets in-batch noise (MERT's mixture_prob is that it does "
                                "not; 0.5 either way); validation batches are mixed too, as MERT's")
    noise_min_seconds: float = _f(0.5, "shortest noise segment")
    noise_max_seconds: float = _f(1.0, "longest noise segment")
    eval_interval: int = _f(500, "steps between validation losses", MAY_CHANGE)
    eval_clips: int = _f(64, "validation clips per evaluation", MAY_CHANGE)
    ckpt_interval: int = _f(1000, "steps between checkpoints (SIGTERM also writes one)", MAY_CHANGE)
    keep_ckpts: int = _f(2, "the newest K checkpoints kept as OUT/ckpt_<step>.pt (-1: all); a resume falls back to "
                            "an older one when the newest is damaged",
                         MAY_CHANGE, type=_keep_count, metavar="K")
    max_bad_steps: int = _f(5, "consecutive non-finite steps that stop the run", MAY_CHANGE)
    seed: int = _f(teachers_lib.LABEL_DEFAULTS["seed"], "seed of crops, masks, noise and initialisation")
    num_workers: int = _f(2, "data loader processes per device", MACHINE)
    device: str = _f("auto", "auto, cpu, cuda", MACHINE)
    dtype: str = _f("auto", "autocast: bfloat16; float16 with dynamic loss scaling, as MERT trained (fairseq fp16); "
                            "float32: none; auto: bfloat16 on CUDA, else float32. Weights, optimiser, loss terms stay "
                            "float32", MACHINE,
                    choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool = _f(False, "torch.compile the model, in place and before DDP wraps it (PyTorch's \"Where to apply "
                              "torch.compile?\"); checkpoints are saved from the plain model", MACHINE)
    # rank 0 alone writes (or CRC-checks and reads) a 330m checkpoint of 3.8 GB while the others wait: 6-13 minutes
    # at 5-10 MB/s on a busy shared file system, beyond NCCL's default 10; a hung rank still ends the job
    dist_timeout: float = _f(60.0, "minutes a collective may wait under torchrun before the run fails (a 330m "
                                   "checkpoint's write on a slow file system takes minutes)", MACHINE)
    # fairseq likewise restores save_dir/checkpoint_last.pt by default (checkpoint.restore_file in
    # fairseq/dataclass/configs.py)
    resume: str = _f("auto", "auto: continue the run in OUT if there is one, else start it (what a restarted job "
                             "needs); true: continue, error if OUT has no checkpoint; false: start fresh, error if "
                             "OUT holds a run", MACHINE,
                     type=_resume_mode, nargs="?", const="true", metavar="{auto,true,false}")
    init: str = _f("", "start a fresh run from these weights: a train.py checkpoint, an official MERT fairseq .pt "
                       "(with its heads), a Hugging Face folder or hub id (encoder only). Ignored on resume", IGNORED)


TRAIN_PRESETS = {
    "tiny": dict(max_steps=2000, warmup_steps=200, lr=5e-4, grad_clip=10.0, batch_size=8, crop_seconds=5.0,
                 eval_interval=200, ckpt_interval=200, out="runs/tiny"),
    # yizhilll/MERT mert_fairseq/config/pretrain/MERT_RVQ-VAE_CQT_95M.yaml: max_tokens 2000000 (line 41)
    # samples per GPU at max_sample_size 120000 (line 31, 5 s) -> 16 clips (fairseq's batch_by_size keeps
    # 16, a multiple of required_batch_size_multiple 8), distributed_world_size 64 (line 19), no update_freq:
    # 16 x 64 = 1,024 clips per update. scripts/run_training.sh is an 8-GPU demo (max_tokens 1.8M -> 15
    # clips cut to 8 by that multiple: 64 clips); --total_batch_size 64 --batch_size 8 gives it.
    "95m": dict(lr=5e-4, grad_clip=10.0, crop_seconds=5.0, noise_max_seconds=1.0, batch_size=16,
                total_batch_size=1024, out="runs/95m"),
    # MERT_RVQ-VAE_CQT_330M.yaml: max_tokens 900000 (line 46; run_training.sh 920000) at max_sample_size
    # 122880 (line 35, 5.12 s) -> 7 clips per GPU either way (8 would be 983,040), world size 64 (line 19),
    # update_freq 8 (line 61): 7 x 64 x 8 = 3,584 clips (5.1 h of audio) per update
    "330m": dict(lr=1.5e-3, grad_clip=1.0, crop_seconds=5.12, noise_max_seconds=1.5, batch_size=7,
                 total_batch_size=3584, out="runs/330m"),
}
HEAD_FIELDS = ("n_codebooks", "codebook_size", "cqt_bins")  # MERTConfig fields the teachers set
NEEDS_ACOUSTIC = ("95m", "330m")  # sizes that refuse to run without EnCodec's (or an rvq.py) codes: check_teachers
EXIT_PREEMPTED, EXIT_INTERRUPTED = checkpoints.EXIT_PREEMPTED, checkpoints.EXIT_INTERRUPTED  # 75 and 130


def usage(msg: str) -> SystemExit:
    """A usage error (a flag names something unusable): the message on stderr; `raise usage(...)` exits 2."""
    print(msg, file=sys.stderr, flush=True)
    return SystemExit(2)


# -----------------------------------------------------------------------------
# the recipe's pieces


def mix_noise(wav: torch.Tensor, rng: np.random.Generator, prob: float = 0.5, n_segments=(1, 3),
              seconds=(0.5, 1.0), sr: int = audio.SAMPLE_RATE, lengths=None) -> torch.Tensor:
    """MERT's in-batch noise mixture (mert_model.py MERTModel.forward / inbatch_noise_augment).

    Clip i gets noise when a uniform draw exceeds mixture_prob = 1 - prob (MERT's flag: 0.5, so prob
    0.5): n ~ U{n_segments} segments (both ends included), each of U{round(seconds * sr)} samples (both
    ends included), cut at a uniform start in [0, P - longest] of the pool, which is the batch's other
    clips (their valid samples) laid end to end, so a segment may straddle two clips; each is added at
    full volume at a uniform position inside clip i's valid samples. A clip whose pool or own length is
    too short for the draw stays clean (MERT's try/except). Returns a new tensor: the teachers must see
    the clean input. Padding (past lengths[b]) is never a noise source nor a target.
    """
    B, L = wav.shape
    lengths = [L] * B if lengths is None else [int(n) for n in lengths]
    lo, hi = (int(round(s * sr)) for s in seconds)
    out = wav.clone()
    for i in range(B):
        if rng.random() <= 1.0 - prob:  # official: noise iff rand > mixture_prob
            continue
        pool = torch.cat([wav[j, :lengths[j]] for j in range(B) if j != i] or [wav.new_zeros(0)])  # (P,)
        n = int(rng.integers(n_segments[0], n_segments[1] + 1))
        if len(pool) - hi + 1 <= 0:
            continue
        starts = rng.integers(0, len(pool) - hi + 1, size=n)
        durs = rng.integers(lo, hi + 1, size=n)
        if int(durs.max()) > lengths[i]:
            continue
        for a, d in zip(starts.tolist(), durs.tolist()):
            dst = int(rng.integers(0, lengths[i] - d + 1))
            out[i, dst:dst + d] += pool[a:a + d]
    return out


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up to tc.lr over warmup_steps, then linear decay to 0 at max_steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    return tc.lr * max(0.0, (tc.max_steps - step) / max(1, tc.max_steps - tc.warmup_steps))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Precision(NamedTuple):
    """How the forward runs: autocast's dtype (float32: no autocast), the context, the loss scaler (float16 only)."""
    dtype: torch.dtype
    autocast: object
    scaler: object
    text: str


def precision(tc: TrainConfig, device: torch.device, world: int, accum: int) -> Precision:
    """--dtype resolved for this device: bfloat16 or float16 autocast, or float32.

    float16 gets dynamic loss scaling as fairseq's fp16 trainer (fairseq/optim/fp16_optimizer.py, MERT's
    yamls set common.fp16): initial scale 2^7 (fp16_init_scale), halved on every overflow (tolerance 0) and
    doubled after 2^14 / (world size x update_freq) steps without one (the default fp16_scale_window)."""
    name = tc.dtype if tc.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = DTYPES[name]
    if dtype == torch.float32:
        return Precision(dtype, contextlib.nullcontext(), None, "float32")
    scaler, text = None, f"{name} autocast (float32 weights, optimiser and loss terms)"
    if dtype == torch.float16:
        window = max(1, 2 ** 14 // (world * accum))
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 7, growth_interval=window)
        text = f"float16 autocast with loss scaling (initial scale 128, doubled after {window} steps without overflow)"
    return Precision(dtype, torch.autocast(device.type, dtype=dtype), scaler, text)


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
    """A loader batch (CropDataset.example dicts) -> (wav [B, L] clean crops, lengths [B] list, the teachers'
    audio.CropContext or None)."""
    buf = batch["audio"].to(device, non_blocking=True)  # (B, left + L + right)
    L = buf.shape[1] - context[0] - context[1]
    wav = buf[:, context[0]:context[0] + L]
    ctx = audio.CropContext(buf, context[0], batch["left"], batch["right"]) if context != (0, 0) else None
    return wav, batch["length"].tolist(), ctx


def check_teachers(tc: TrainConfig) -> None:
    """The teacher flags before anything is built (teachers.check_flags), and no silent stand-in for EnCodec.

    95m and 330m reproduce MERT, whose code targets are EnCodec 24 kHz's: without --acoustic_ckpt they refuse
    rather than train a cluster on random-projection codes; naming randproj or mfcc in --teachers is the way to
    ask for another code teacher. The files are read in build_teachers (errors exit 2 there too)."""
    try:
        names = teachers_lib.check_flags(tc.teachers, tc.acoustic_ckpt, tc.mfcc_ckpt)
    except teachers_lib.FlagError as e:
        raise usage(f"train.py: {e}") from None
    if "acoustic" in names and not tc.acoustic_ckpt and tc.size in NEEDS_ACOUSTIC:
        raise usage(f"train.py: --size {tc.size} trains on EnCodec 24 kHz's codes: pass --acoustic_ckpt "
                    f"encodec_24khz-d7cc33bc.th (README: where to get it) or an rvq.py checkpoint, or name another "
                    f"code teacher explicitly (--teachers randproj+cqt)")
    for flag, path, used in (("--acoustic_ckpt", tc.acoustic_ckpt, "acoustic" in names),
                             ("--mfcc_ckpt", tc.mfcc_ckpt, "mfcc" in names)):
        why = path and used and not_a_torch_file(Path(path))  # a text file: say so, not the unpickler's opcodes
        if why:
            raise usage(f"train.py: {flag} {path}: {why}")


def build_teachers(tc: TrainConfig, device, log) -> teachers_lib.Teachers:
    """The run's teachers, frozen, on `device`; a checkpoint that does not load exits 2 naming its flag."""
    try:
        return teachers_lib.from_flags(tc.teachers, tc.acoustic_ckpt, tc.mfcc_ckpt, seed=tc.seed, n_q=tc.n_q,
                                       cqt_log=tc.cqt_log, device=device, log=log)
    except teachers_lib.FlagError as e:
        raise usage(f"train.py: {e}") from None


def fresh_model_config(tc: TrainConfig, teach, model_over: dict, log) -> tuple[MERTConfig, dict | None]:
    """A new run's model config (heads sized by the teachers) and, with --init, the weights to start from."""
    heads = dict(n_codebooks=teach.n_codebooks, codebook_size=teach.codebook_size, cqt_bins=teach.cqt_bins)
    if not tc.init:
        return MERTConfig.from_preset(tc.size, **{**heads, **model_over}), None
    import convert  # reads every format and maps the source onto the run: --init only
    try:
        cfg, state, notes = convert.init_from(tc.init, tc.size, heads, model_over, fits=f"--teachers {tc.teachers}")
    except (CheckpointError, ValueError) as e:
        raise usage(f"train.py: --init {e}") from None
    for note in notes:
        log(f"init: {note}")
    return cfg, state


# -----------------------------------------------------------------------------
# the run's plumbing: processes, the plan, data, signals


class Proc(NamedTuple):
    """This process in the run: torchrun sets RANK; plain `python train.py` is rank 0 of 1."""
    ddp: bool
    rank: int
    world: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_process(tc: TrainConfig) -> Proc:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU), or run alone; pick the device.

    The rendezvous keys carry this attempt's number: after `torchrun --max-restarts` restarts the workers,
    the launcher's store still holds the previous attempt's addresses under the same keys, and a new rank
    could read a dead rank's address and fail or hang connecting (seen with gloo on torch 2.13).
    """
    if int(os.environ.get("RANK", -1)) == -1:
        return Proc(False, 0, 1, torch.device("cuda" if tc.device == "auto" and torch.cuda.is_available() else
                                              (tc.device if tc.device != "auto" else "cpu")))
    local = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and tc.device in ("auto", "cuda")
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)  # before the first collective (the plan's broadcast)
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.PrefixStore(f"mert/attempt{attempt}/", store),
                            rank=rank, world_size=world, timeout=datetime.timedelta(minutes=tc.dist_timeout))
    return Proc(True, rank, world, device)


def any_rank(proc: Proc, *flags: bool) -> list[bool]:
    """Each flag true if it is true on any rank (one all-reduce for all of them)."""
    if not proc.ddp:
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], device=proc.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _expected_model(size: str, model_over: dict) -> dict:
    """The model config a fresh run of this command builds, without the teacher-set head fields."""
    d = {**{f.name: f.default for f in fields(MERTConfig)}, **PRESETS[size], **model_over}
    return {k: v for k, v in d.items() if k not in HEAD_FIELDS}


def _in_todays_terms(old: dict) -> dict:
    """A checkpoint's train_config as today's fields read it: --keep_ckpts was a boolean once."""
    return {**old, "keep_ckpts": _keep_count(old["keep_ckpts"])} if "keep_ckpts" in old else old


def plan_run(tc: TrainConfig, model_over: dict, given: dict) -> dict:
    """Rank 0, before anything is built: checkpoints.plan_run with TrainConfig's resume policy."""
    policy = {f.name: f.metadata["resume"] for f in fields(TrainConfig)}
    return checkpoints.plan_run(tc.out, tc.resume, asdict(tc), given, policy, _expected_model(tc.size, model_over),
                                upgrade=_in_todays_terms)


def load_data(tc: TrainConfig, proc: Proc, crop: int, teach, print0=print) -> tuple:
    """(training CropDataset, validation CropDataset or None): crops on the label frame grid, each with its acoustic
    codes from the shards (`audio.py prepare --codes`, when they are the run's acoustic teacher's: another teacher
    file, n_q or codebook size, or a mix of sources with and without codes, exit 2) or with the audio around it that
    the teachers need (ds.context)."""
    kw = dict(crop_samples=crop, on_bad=checkpoints.BadFileLog(Path(tc.out) / "skipped_files.txt", proc.rank),
              hop=teachers_lib.HOP)
    want = None  # the codes the shards must hold to stand in for the acoustic teacher
    if isinstance(teach.code_teacher, teachers_lib.AcousticTeacher):
        want = {"teacher": {"file": Path(tc.acoustic_ckpt).name, "sha256": teachers_lib.file_sha256(tc.acoustic_ckpt)},
                "n_q": tc.n_q, "codebook_size": teach.codebook_size, "hop": teachers_lib.HOP}
    out = []
    for sources, flag, seed in ((tc.data, "data", tc.seed), (tc.val_data, "val_data", tc.seed + 1)):
        if not sources:
            out.append(None)
            continue
        try:  # codes from the shards: the acoustic teacher does not run, and the CQT needs no context
            codes = audio.match_shard_codes(sources.split(","), want, f"--{flag} (--acoustic_ckpt {tc.acoustic_ckpt}, "
                                            f"--n_q {tc.n_q})", note=lambda m: print0(f"train.py: {m}"))
            out.append(audio.CropDataset(sources.split(","), seed=seed, codes=codes,
                                         context=(0, 0) if codes else teach.context(tc.acoustic_context), **kw))
        except audio.AudioError as e:  # a missing --data path, nothing usable in it, an unreadable shard index
            raise SystemExit(f"train.py: {e}") from None
        except ValueError as e:  # the flags ask for other codes than the shards hold
            if proc.master:
                print(f"train.py: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
    return tuple(out)


def make_loader(ds: audio.CropDataset, tc: TrainConfig, proc: Proc, start: int, loaders: list):
    """The training batches from global sample `start` on, this rank's share; registered in `loaders` to close.
    Its workers ignore SIGTERM and Ctrl-C: this process stops them (audio.close_loader)."""
    dl = audio.make_loader(ds, tc.batch_size, start=start, rank=proc.rank, world_size=proc.world,
                           num_workers=tc.num_workers, pin_memory=proc.device.type == "cuda", sampling=tc.sampling,
                           ignore_signals=True)
    if tc.num_workers > 0:
        loaders.append(dl)
    return iter(dl)


# -----------------------------------------------------------------------------
# the run: set-up, then the loop


def build_model(tc: TrainConfig, cfg: MERTConfig, init_state, state, src, device) -> tuple:
    """(model, optimiser, frozen parameter names): seeded, --init's weights over it, --freeze, then on resume the
    checkpoint's model and optimiser state (with this launch's hyperparameters: --lr, ... may change)."""
    torch.manual_seed(tc.seed)
    model = MERT(cfg).to(device)
    if init_state is not None:  # over the seeded initialisation: the heads the source lacks stay fresh
        load_state_strict(model, {**model.state_dict(), **init_state}, tc.init)
    frozen = freeze_parameters(model, tc.freeze)  # before the optimiser, which skips frozen parameters
    optimizer = configure_optimizer(model, tc, fused=device.type == "cuda")
    if state is not None:
        model.load_state_dict(state["model"])
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # the parameter groups differ: the run was started with another --freeze
            raise SystemExit(f"train.py: {src}'s optimiser state does not fit this model's trainable "
                             f"parameters (was the run started with a different --freeze?): {e}")
        for g, h in zip(optimizer.param_groups, hyper):
            g.update(h)
    return model, optimizer, frozen


def forward_micro(model, raw: MERT, teach, batch: dict, g: int, tc: TrainConfig, context: tuple, autocast) -> tuple:
    """Loss, loss parts and masked-frame count of one micro-batch: labels of the clean crops, then MERT's in-batch
    noise (also in validation, as MERT mixes in its forward), masks of this device's rows. raw: the unwrapped model.
    context: the batch's dataset's (left, right) context; a batch with "codes" (from the shards) brings its codes."""
    wav, lengths, ctx = prepare_batch(batch, context, next(raw.parameters()).device)
    T = raw.num_frames(wav.shape[1])
    mask = draw_masks(raw.config, tc.seed, g, [min(T, raw.num_frames(n)) for n in lengths], T)
    with torch.no_grad():  # the teachers see the clean audio; codes from the shards replace the acoustic teacher
        targets = teach(wav, T, context=ctx, **({"codes": batch["codes"]} if "codes" in batch else {}))
    noisy = mix_noise(wav, np.random.default_rng([tc.seed, g, 2]), tc.noise_prob, lengths=lengths,
                      seconds=(tc.noise_min_seconds, tc.noise_max_seconds)) if tc.noise_prob > 0 else wav
    with autocast:
        _, loss, parts = model(noisy, lengths=None if min(lengths) == wav.shape[1] else lengths, targets=targets,
                               mask=mask)
    return loss, parts, parts.pop("n_masked").float()


def reduce_step(sums: dict, proc: Proc) -> dict:
    """Masked-frame-weighted means of the step's loss terms over all micro-batches and ranks."""
    keys = sorted(sums)
    v = torch.stack([torch.as_tensor(sums[k], device=proc.device, dtype=torch.float32) for k in keys])
    if proc.ddp:
        dist.all_reduce(v)
    n = v[keys.index("n")].clamp(min=1)
    return {k: (x if k in ("n", "seconds") else x / n) for k, x in zip(keys, v)}  # totals stay totals


@torch.no_grad()
def evaluate(model, raw: MERT, teach, val_ds, tc: TrainConfig, proc: Proc, context: tuple, autocast) -> float:
    """The validation loss over the first eval_clips clips of val_ds, this rank's share of them."""
    model.eval()
    sums = {"n": 0.0, "loss": 0.0}
    n_val = min(tc.eval_clips, 10_000)
    for start in range(proc.rank * tc.batch_size, n_val, proc.world * tc.batch_size):
        idx = range(start, min(start + tc.batch_size, n_val))
        batch = torch.utils.data.default_collate([val_ds.example(i) for i in idx])
        g = 1 << 62 | start  # a seed no training batch uses
        loss, _, n = forward_micro(raw, raw, teach, batch, g, tc, context, autocast)
        sums["n"] += n
        sums["loss"] += loss.float() * n
    model.train()
    return reduce_step(sums, proc)["loss"].item()


def train(tc: TrainConfig, model_over: dict, given: dict, proc: Proc, loaders: list) -> int:
    """The run: fresh start or resume, teachers, data, model, then the loop. Returns the exit code."""
    ddp, rank, world, device, master = *proc, proc.master
    print0 = functools.partial(print, flush=True) if master else (lambda *a, **k: None)

    # -- fresh start or resume (rank 0 decides, every rank follows): see checkpoints.plan_run
    plan = checkpoints.decide_on_rank0(lambda: plan_run(tc, model_over, given), ddp, master)
    tc = TrainConfig(**plan["train_config"])
    for note in plan["notes"]:
        print0(f"train.py: {note}")
    total, accum = resolve_batch(tc, world)
    prec = precision(tc, device, world, accum)
    autocast, scaler = prec.autocast, prec.scaler
    out, ckpt_path = Path(tc.out), Path(tc.out) / "ckpt.pt"

    # -- teachers, then the data (crops on the label frame grid, with the audio around them the teachers need)
    teach = build_teachers(tc, device, print0)
    crop = int(round(tc.crop_seconds * audio.SAMPLE_RATE))
    train_ds, val_ds = load_data(tc, proc, crop, teach, print0)
    context = train_ds.context
    if train_ds.codes_info is not None and (val_ds is None or val_ds.codes_info is not None):
        teach.code_teacher.cpu()  # never runs: its codes come from the shards; off the accelerator
    data_id = {"n_files": train_ds.n_files, "seconds": round(float(train_ds.seconds), 3)}
    saved = checkpoints.keep_data_table(out, train_ds.table(), bool(plan["resume"]), ddp, master)
    if saved is not None:  # some of the run's items are gone: draw from its own table, whose data id still holds
        train_ds.use_table(saved)
        data_id = None

    # -- the model and optimiser: fresh, from --init, or as the checkpoint left them
    state = init_state = None
    if plan["resume"]:
        try:  # rank 0 has it already; the others read the file it chose (OUT must be shared by all nodes)
            state = plan["_state"] if master else checkpoints.read_checkpoint(plan["resume"])
        except checkpoints.BadCheckpoint as e:
            raise SystemExit(f"train.py: rank {rank} cannot read {e} (is --out on a file system every node "
                             f"sees?)") from None
        cfg = MERTConfig.from_dict(state["config"])
        if given.get("init"):
            print0(f"train.py: resuming {plan['resume']}: --init {given['init']} is ignored (it seeds fresh runs "
                   f"only)")
    else:
        cfg, init_state = fresh_model_config(tc, teach, model_over, print0)
    model, optimizer, frozen = build_model(tc, cfg, init_state, state, plan["resume"], device)
    if scaler is not None and state is not None and "scaler" in state:  # the loss scale the run had reached
        scaler.load_state_dict(state["scaler"])
    step = start_step = state["step"] if state is not None else 0
    if state is not None and data_id is None:
        data_id = state.get("data")
    elif state is not None and state.get("data") != data_id:
        print0(f"warning: the training data changed since the checkpoint ({state.get('data')} -> {data_id}); "
               f"the resumed run reads a different stream than the interrupted one would have")
    if step >= tc.max_steps and state is not None:
        print0(f"train.py: the run in {out} is at step {step}, --max_steps is {tc.max_steps}: nothing to do "
               f"(raise --max_steps to train on)")
        return 0
    print0(f"train config: {json.dumps(asdict(tc))}\nmodel config: {json.dumps(asdict(cfg))}")
    print0(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | world {world} | micro-batch "
           f"{tc.batch_size} | accumulation {accum} | {total} clips x {tc.crop_seconds} s per step "
           f"({total * tc.crop_seconds / 3600:.2f} h of audio) | sampling {tc.sampling} | " +
           ("acoustic codes from the shards" if train_ds.codes_info is not None else
            f"teacher context {context[0] / audio.SAMPLE_RATE:g} s + {context[1] / audio.SAMPLE_RATE:g} s") +
           f" | device {device} | precision {prec.text}")
    if frozen:
        print0(f"frozen at initialisation: {', '.join(frozen)}")
    raw_model = model  # saved, evaluated and measured; DDP and compile only wrap its calls
    if tc.compile:
        # in place, on the inner module, then DDP around it: PyTorch's "Where to apply torch.compile?" (its
        # DDP example compiles the module passed to DDP); the state dict keeps its names (no _orig_mod.)
        raw_model.compile()
    if ddp:
        # layerdrop leaves layers without gradients on some steps (find_unused_parameters); otherwise the graph
        # is the same every step (static_graph), but torch 2.13's static graph breaks on a backward without
        # sync (reducer.cpp expect_autograd_hooks_ assert; pytorch/pytorch#143580): only without accumulation
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=cfg.layerdrop > 0, static_graph=cfg.layerdrop == 0 and accum == 1,
                    gradient_as_bucket_view=True)  # gradients live in the buckets: no copy, less memory

    # SIGTERM (Slurm, Kubernetes, torchrun passing one on) finishes the step: see checkpoints.StopFlag. Installed
    # before the loader starts its workers, which ignore it (audio.worker_init).
    stop = checkpoints.StopFlag("train.py", verbose=master)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    # micro-step k = step * accum + m of rank r reads global samples [(k*W + r)*b, (k*W + r + 1)*b)
    loader = make_loader(train_ds, tc, proc, step * accum * world * tc.batch_size, loaders)
    flops_per_step = raw_model.estimate_flops(crop) * total  # MFU: against the GPU's dense bf16 peak, if known
    peak = gpu_peak_flops(device)
    log_path = out / "log.jsonl"
    if master:  # the log holds each step once: records past the resumed step are dropped, atomically
        event = {"event": "resume" if state is not None else "start", "step": step, "run_id": plan["run_id"],
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world": world,
                 "train_config": asdict(tc), "model_config": asdict(cfg)}
        if state is not None:
            event.update(checkpoint=Path(plan["resume"]).name, applied=plan.get("applied", []))
        checkpoints.rewrite_log(log_path, plan["_log"] + [event])
    bad_in_row, save_failed, stopping = 0, None, False

    model.train()
    while True:
        last = step == tc.max_steps
        stop_now = stopping and not last  # every rank agreed (any_rank below): checkpoint this step and leave
        if val_ds is not None and not stop_now and (step % tc.eval_interval == 0 or last) and step > 0:
            v = evaluate(model, raw_model, teach, val_ds, tc, proc, val_ds.context, autocast)
            print0(f"step {step} | val loss {v:.4f}")
            if master:
                checkpoints.append_log(log_path, {"step": step, "val_loss": v})
        if master and step > start_step and (stop_now or last or step % tc.ckpt_interval == 0):
            save_failed = checkpoints.write_or_report(out, {
                "config": asdict(cfg), "train_config": asdict(tc), "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step, "data": data_id, "run_id": plan["run_id"],
                "position": data_position(step * accum * world, tc, train_ds),
                **({"scaler": scaler.state_dict()} if scaler is not None else {})}, tc.keep_ckpts)
        if stop_now:
            if ddp:
                dist.barrier()  # nobody exits before rank 0 has written
            print0(f"train.py: stopped by {stop.name} at step {step}; " +
                   ("its checkpoint could not be written" if save_failed else
                    f"checkpoint {ckpt_path} written" if step > start_step else "no new checkpoint") +
                   f"; run the same command to continue (exit {stop.code})")
            raise SystemExit(stop.code)
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
            loss, parts, n = forward_micro(model, raw_model, teach, batch, g, tc, context, autocast)
            # fairseq (hubert_criterion.py + trainer): each micro-batch's loss is summed over its masked frames,
            # and the step's gradient divided by the frames masked over all micro-batches and ranks
            (loss * n if scaler is None else scaler.scale(loss * n)).backward()
            sums["n"] += n
            sums["seconds"] += float(batch["length"].sum()) / audio.SAMPLE_RATE  # epoch batches are cut to their shortest clip
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() * n
        means = reduce_step(sums, proc)
        n_total, seconds, loss_sum = means.pop("n"), means.pop("seconds").item(), means.pop("loss")  # all ranks
        if scaler is not None:  # the accumulated gradient back to true scale (and inf/NaN noted) before clipping
            scaler.unscale_(optimizer)
        grads = [p.grad for p in raw_model.parameters() if p.grad is not None]
        if grads:  # DDP averaged the ranks' sums: times world / frames = the frame-weighted mean
            torch._foreach_mul_(grads, world / n_total.clamp(min=1).item())
        gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        # one all-reduce: a non-finite step on any rank is skipped by all; a SIGTERM on any rank stops all
        nonfinite, stopping = any_rank(proc, not bool(torch.isfinite(loss_sum) & torch.isfinite(gnorm)),
                                       stop.requested)
        # float16: an overflow in the scaled backward (finite loss) is the loss scaler's business, as in fairseq:
        # skip the step, halve the scale, and do not count it as a bad step
        overflow = scaler is not None and nonfinite and bool(torch.isfinite(loss_sum))
        if not nonfinite:
            set_fairseq_eps(optimizer, tc)
            optimizer.step()  # unscale_ above has checked for inf/NaN; every rank agreed on nonfinite
            bad_in_row = 0
        elif overflow:
            old_scale = scaler.get_scale()
            print0(f"step {step}: float16 gradient overflow; step skipped, loss scale {old_scale:g} -> "
                   f"{old_scale * scaler.get_backoff_factor():g}")
            if old_scale * scaler.get_backoff_factor() < 1e-4:  # fairseq's min_loss_scale
                print0(f"train.py: the float16 loss scale fell below 1e-4; stopping. Lower --lr, use --dtype "
                       f"bfloat16, or resume from {ckpt_path}")
                raise SystemExit(3)
        else:
            bad_in_row += 1
            print0(f"step {step}: non-finite loss or gradient ({loss_sum.item()}, grad norm {gnorm.item()}); step "
                   f"skipped ({bad_in_row} in a row)")
            if bad_in_row >= tc.max_bad_steps:
                print0(f"train.py: {bad_in_row} non-finite steps in a row; stopping. Lower --lr, check the data, "
                       f"or resume from {ckpt_path}")
                raise SystemExit(3)
        if scaler is not None:
            scaler.update()  # backs off after an overflow, grows after growth_interval clean steps
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rec = {"step": step, "loss": loss_sum.item(), "grad_norm": gnorm.item(), "lr": lr, "ms": dt * 1000,
               "audio_s_per_s": seconds / dt, **{k: float(v) for k, v in means.items()}}
        if peak:  # the estimate is for full crops; a batch cut shorter did proportionally less (attention aside)
            rec["mfu"] = flops_per_step * seconds / (total * tc.crop_seconds) / dt / world / peak
        if master:
            shown = " ".join(f"{k} {v:.3f}" for k, v in rec.items()
                             if k in ("features_pen", "ce", "cqt", "ce_u", "cqt_u"))
            print(f"step {step} | loss {rec['loss']:.4f} ({shown}) | gnorm {rec['grad_norm']:.2f} | lr {lr:.2e} | "
                  f"{rec['ms']:.0f} ms | {rec['audio_s_per_s']:.0f} audio-s/s"
                  + (f" | mfu {rec['mfu'] * 100:.1f}%" if peak else ""), flush=True)
            checkpoints.append_log(log_path, rec)
        step += 1
    if save_failed:  # the last checkpoint is missing: the run did not end where it was asked to
        print(save_failed, file=sys.stderr, flush=True)
        return 1
    print0(f"train.py: done at step {step}; final checkpoint {ckpt_path}")
    return 0


# -----------------------------------------------------------------------------
# the command line

EPILOG = """examples:
  python train.py --size tiny --data ./music --out runs/tiny --max_steps 60 --warmup_steps 10
  torchrun --nproc_per_node=8 --max-restarts 3 train.py --size 95m --data /shards --out runs/95m
  python train.py export runs/95m/ckpt.pt models/mine.pt   # the same as python convert.py ...

A rerun of the same command continues the run in --out (--resume auto). SIGTERM finishes the current
step, writes a checkpoint and exits with code 75; Ctrl-C does the same with exit code 130 (a second Ctrl-C
stops at once); rerun the same command to continue. Exit codes: 0 done, 1 unusable input (data, checkpoint,
a full disk), 2 usage (flags, a --device this torch lacks, an --out that cannot be written), 3 non-finite losses,
75 stopped by SIGTERM, 130 stopped by Ctrl-C.
Flags may be spelled with hyphens too (--max-steps); --data takes paths space- or comma-separated.
"""


def _default_text(name: str) -> str:
    """' (default: X)', or per size ' (default: tiny X, 95m Y, 330m Z)', read from the presets at help time."""
    if name == "size":
        return f" (choices: {', '.join(PRESETS)}) (default: tiny)"
    if name in HEAD_FIELDS:
        return " (default: from --teachers)"
    if name in TrainConfig.__dataclass_fields__:
        base = TrainConfig.__dataclass_fields__[name].default
        per = {size: TRAIN_PRESETS.get(size, {}).get(name, base) for size in PRESETS}
    else:
        base = MERTConfig.__dataclass_fields__[name].default
        per = {size: PRESETS[size].get(name, base) for size in PRESETS}
    per = {k: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v) or "none" for k, v in per.items()}
    if len(set(per.values())) == 1:
        return f" (default: {next(iter(per.values()))})"
    return " (default: " + ", ".join(f"{k} {v}" for k, v in per.items()) + ")"


def build_parser() -> argparse.ArgumentParser:
    """Every TrainConfig and MERTConfig field as --name (bools take true/false), --na-me its hyphen alias (kept out
    of --help); each default comes from the presets, applied in configs_from."""
    p = argparse.ArgumentParser(description="MERT pretraining (single process or torchrun DDP).", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(f, help_text):
        kind = f.type if isinstance(f.type, type) else type(f.default)
        kw = dict(default=None, help=(help_text + _default_text(f.name)).replace("%", "%%"))
        if kind is bool:
            kw.update(type=_bool, nargs="?", const=True)
        elif kind is tuple:
            kw.update(type=lambda s: tuple(int(v) for v in s.split(",")), help=kw["help"] + " (comma-separated)")
        else:
            kw.update(type=kind)
        kw.update(f.metadata.get("arg", {}))
        p.add_argument(f"--{f.name}", **kw)
        if "_" in f.name:
            p.add_argument(f"--{f.name.replace('_', '-')}", **{**kw, "dest": f.name, "help": argparse.SUPPRESS})

    for f in fields(TrainConfig):
        add(f, f.metadata["help"])
    p.add_argument("--print_config", "--print-config", action="store_true", default=None,
                   help="print the resolved training and model configs, the teachers and their checkpoints, the "
                        "accumulation and the global batch as JSON and exit (for WORLD_SIZE devices, 1 outside "
                        "torchrun); --data is not needed, the teacher flags are checked as for a run")
    for f in fields(MERTConfig):
        if f.name not in TrainConfig.__dataclass_fields__:
            add(f, f"model: MERTConfig.{f.name}")
    return p


def parse_given(argv=None) -> dict:
    """The fields set on the command line (name -> typed value); path lists joined by commas."""
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    args.pop("print_config", None)  # an action, not a field (main dispatches on it)
    given = {k: v for k, v in args.items() if v is not None}
    for f in fields(TrainConfig):
        if f.name in given and f.metadata["arg"].get("nargs") == "+":  # ["a,b", "c"] -> "a,b,c"
            given[f.name] = ",".join(x.strip() for v in given[f.name] for x in v.split(",") if x.strip())
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
    if tc.dist_timeout <= 0:
        raise usage(f"train.py: --dist_timeout must be > 0 minutes, not {tc.dist_timeout:g}")
    check_teachers(tc)
    return tc, model_over


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
           "teachers": {teachers_lib.FLAG_NAME.get(n, n): {"acoustic": tc.acoustic_ckpt, "mfcc": tc.mfcc_ckpt}.get(n)
                        for n in teach.names},
           "teacher_context_seconds": [left / audio.SAMPLE_RATE, right / audio.SAMPLE_RATE]}
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(out, indent=1))
    return 0


def _flag_errors(fn, *a):
    """fn(*a), with a configuration refusal (SystemExit carrying its message) turned into a usage error: exit 2."""
    try:
        return fn(*a)
    except SystemExit as e:
        if isinstance(e.code, str):
            raise usage(e.code) from None
        raise


def _interrupted(out: Path) -> str:
    """What a Ctrl-C that stopped the run at once leaves: the newest checkpoint in out, if any."""
    kept = checkpoints.checkpoint_candidates(out) if out.is_dir() else []
    return f"the newest checkpoint is {kept[0]}; run the same command to continue" if kept else "no checkpoint written"


def main(argv=None) -> int:
    """Train as the command line says (see --help); SIGTERM stops it with a checkpoint and exit code 75, Ctrl-C
    with exit code 130. `train.py export ...` is `convert.py ...` (the encoder as our .pt or a Hugging Face folder)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        import convert
        return convert.main(argv[1:], prog="train.py export")
    try:
        if {"--print_config", "--print-config"} & set(argv):
            return _flag_errors(print_config, argv)
        given = parse_given(argv)
        tc, model_over = _flag_errors(configs_from, given)
    except KeyboardInterrupt:  # re-raised: the command line exits 130 (see the bottom of this file)
        print("train.py: interrupted (Ctrl-C) before the run started; nothing written", file=sys.stderr)
        raise
    master = int(os.environ.get("RANK", 0)) == 0
    if tc.device != "auto":  # the one device check every command shares
        try:
            audio.pick_device(tc.device)
        except ValueError as e:
            raise usage(f"train.py: {e}") from None
    out = Path(tc.out)
    problem = audio.output_problem(out, folder=True)
    if problem:
        raise usage(f"train.py: --out {out}: {problem}")
    fresh = not out.exists()  # a start that fails leaves no run folder behind
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if on_main_thread else {}
    proc, loaders, code = None, [], 1
    try:
        proc = setup_process(tc)
        code = train(tc, model_over, given, proc, loaders)
        return code
    except SystemExit as e:
        code = e.code
        raise
    except KeyboardInterrupt:  # before the loop's handler was in place, or a second Ctrl-C during a step
        if master:
            print(f"train.py: stopped at once by Ctrl-C; {_interrupted(out)}", file=sys.stderr, flush=True)
        code = EXIT_INTERRUPTED
        raise  # the command line exits 130; a caller in Python sees the interrupt
    except OSError as e:  # a full disk or an I/O error outside the checkpoint writer (which goes on without it)
        print(f"train.py: {audio.one_line(e)}" + (f": {e.filename}" if getattr(e, "filename", None) and
                                                  str(e.filename) not in str(e) else ""), file=sys.stderr, flush=True)
        return 1
    finally:  # every way out: loader workers stopped, the signal handlers restored, the process group left
        for dl in loaders:
            audio.close_loader(dl)
        for s, h in previous.items():
            signal.signal(s, h)
        if proc is not None and proc.ddp and dist.is_initialized():
            dist.destroy_process_group()
        if fresh and master and code not in (0, None) and out.is_dir() and not checkpoints.checkpoint_candidates(out):
            import shutil
            shutil.rmtree(out, ignore_errors=True)  # made by this failed start and holding no checkpoint


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # main() said what was kept, in one line
        sys.exit(EXIT_INTERRUPTED)
