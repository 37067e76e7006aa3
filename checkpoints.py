"""A training run's folder: checkpoints written so that no crash loses one, the log, and the decision
to start or continue. torch and the standard library only; copies out alone.

    OUT/ckpt.pt          the newest checkpoint, always written first
    OUT/ckpt_<step>.pt   the same file kept under its step (a hard link), the newest K of them
    OUT/*.pt.bad         a checkpoint that failed its check on resume, moved aside, never deleted
    OUT/log.jsonl        one JSON record a line: events ("start", "resume") and steps
    OUT/data.pt          the items a run draws its crops from, so a resume reads the same crops
    OUT/skipped_files.txt  the unreadable files this launch skipped, each named once (BadFileLog)

Decisions:
- One atomic save for every file (save): a temp file, fsync, rename, fsync of the folder. A crash or a
  full disk never leaves a half-written file and never touches the previous one.
- Reading checks every record's CRC-32 (torch.save writes a zip archive) before
  torch.load(weights_only=True): torch.load alone takes flipped bits silently.
- Resume takes the newest checkpoint that passes: ckpt.pt, then ckpt_<step>.pt by step. A damaged one,
  one whose name and step disagree, or one another run wrote (its run_id) is named, moved to .bad and
  the next one tried (fairseq likewise restores save_dir/checkpoint_last.pt by default).
- plan_run decides before anything is built, on one process: fresh start, continue, or refuse with
  one line (Refusal). Which config fields a resume may change is the caller's policy, passed in.
- A stop request (SIGTERM from Slurm, Kubernetes or torchrun; Ctrl-C) lets the step finish and a checkpoint be
  written, then the run exits EXIT_PREEMPTED (75) or EXIT_INTERRUPTED (130): StopFlag, the caller's signal handler.
- The log holds each step once: on resume the records past the checkpoint's step are dropped, and
  a torn last line (a kill mid-write) is skipped when read.
"""

import json
import os
import shutil
import signal
import sys
import uuid
import zipfile
from pathlib import Path

import torch

TRAIN_KEYS = ("config", "train_config", "model", "optimizer", "step")  # what a training checkpoint holds


class BadCheckpoint(ValueError):
    """A checkpoint that is missing, truncated, corrupt, foreign or lacks a key; the message names the file."""


class Refusal(Exception):
    """The run cannot start as asked: one line saying why and what to do, and the exit code."""

    def __init__(self, msg: str, code: int = 2):
        super().__init__(msg)
        self.code = code


def _oneline(e: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(e).split()) or type(e).__name__


EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped on request with a checkpoint; run the command again
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as a shell reports it: the same stop and checkpoint as SIGTERM


class StopFlag:
    """SIGTERM and SIGINT (Ctrl-C) handler: ask the loop to finish its step, write a checkpoint and exit with
    EXIT_PREEMPTED (SIGTERM) or EXIT_INTERRUPTED (Ctrl-C). A second Ctrl-C stops at once (KeyboardInterrupt)."""

    def __init__(self, prog: str, verbose: bool = True):
        self.requested, self.pid, self.prog, self.verbose = False, os.getpid(), prog, verbose
        self.name, self.code = "SIGTERM", EXIT_PREEMPTED

    def __call__(self, signum, frame):
        if os.getpid() != self.pid:  # a forked loader worker that inherited the handler: nothing to do
            return
        if self.requested:
            if signum == signal.SIGINT:  # the user insists: the caller says what is kept
                raise KeyboardInterrupt
            return
        self.requested = True
        if signum == signal.SIGINT:
            self.name, self.code = "Ctrl-C", EXIT_INTERRUPTED
        if self.verbose:
            again = "; Ctrl-C again stops at once" if signum == signal.SIGINT else ""
            print(f"{self.prog}: {self.name}: finishing this step, then a checkpoint and exit {self.code}{again}",
                  file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# writing


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


def save(path, obj):
    """Write obj to path atomically: bytes as they are, anything else with torch.save; temp file, fsync,
    rename, fsync the folder. The temp file goes on failure; the file at path is untouched until the rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            if isinstance(obj, bytes):
                f.write(obj)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on the disk before the name points at it (network file systems)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e.__context__, KeyboardInterrupt) and not isinstance(e, KeyboardInterrupt):
            # Ctrl-C inside torch.save: its zip writer, closing, raises "unexpected pos" over the interrupt
            raise KeyboardInterrupt from None
        raise
    _fsync_dir(path.parent)


def keep_copy(src: Path, dst: Path):
    """Keep src's current contents also as dst: a hard link (no second write of a 330M checkpoint),
    or a copy where the file system has no links; via a temp name and rename, like save."""
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


def kept_checkpoints(out: Path) -> list[Path]:
    """OUT/ckpt_<step>.pt files, oldest step first."""
    return [q for _, q in sorted((int(q.stem[5:]), q) for q in out.glob("ckpt_*.pt") if q.stem[5:].isdigit())]


def write_checkpoint(out: Path, obj: dict, keep: int) -> Path:
    """OUT/ckpt.pt (atomic), kept also as OUT/ckpt_<step>.pt; then only the newest `keep` of those stay (-1: all).

    ckpt.pt is written first, so it is always the newest complete checkpoint; a failed write (full
    disk) raises OSError and leaves every earlier file as it was.
    """
    main = out / "ckpt.pt"
    save(main, obj)
    try:
        keep_copy(main, out / f"ckpt_{obj['step']}.pt")
    except OSError as e:  # ckpt.pt itself is complete: only the extra name is missing
        print(f"{main}: could not keep it also as ckpt_{obj['step']}.pt ({_oneline(e)})", file=sys.stderr,
              flush=True)
    if keep > 0:
        for q in kept_checkpoints(out)[:-keep]:
            q.unlink(missing_ok=True)
    return main


def write_or_report(out: Path, obj: dict, keep: int, prog: str = "train.py") -> str | None:
    """write_checkpoint, said in one line; a failed write (full disk, quota, I/O error) is named on stderr and the run
    goes on, the previous checkpoints untouched: returns that message to repeat at the end, else None."""
    try:
        write_checkpoint(out, obj, keep)
    except OSError as e:
        prev = checkpoint_candidates(out)
        failed = (f"{prog}: step {obj['step']}: could not write a checkpoint in {out} ({_oneline(e)}); the newest one "
                  f"left is {prev[0].name if prev else 'none'}")
        print(failed + "; training goes on and tries again at the next checkpoint", file=sys.stderr, flush=True)
        return failed
    print(f"step {obj['step']} | checkpoint {out / 'ckpt.pt'} (also ckpt_{obj['step']}.pt)", flush=True)
    return None


# -----------------------------------------------------------------------------
# reading


def read_checkpoint(path, keys=TRAIN_KEYS) -> dict:
    """A checkpoint loaded with weights_only=True after checking every stored CRC; BadCheckpoint naming
    the file if it is missing, truncated, corrupt or lacks one of `keys`."""
    path = Path(path)
    if not path.is_file():
        raise BadCheckpoint(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            zip_magic = f.read(2) == b"PK"
        with zipfile.ZipFile(path) as z:  # torch.save writes a zip archive with a CRC-32 per record
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
        what = "truncated or damaged checkpoint" if zip_magic else "not a checkpoint written by torch.save"
        raise BadCheckpoint(f"{path}: {what} ({_oneline(e)})") from None
    if bad is not None:
        raise BadCheckpoint(f"{path}: corrupt checkpoint (CRC mismatch in {bad})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, unpickler and zip-record errors alike
        raise BadCheckpoint(f"{path}: unreadable checkpoint ({type(e).__name__}: {_oneline(e)})") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise BadCheckpoint(f"{path}: not a train.py checkpoint (no {', '.join(map(repr, missing))})")
    return state


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def checkpoint_candidates(out: Path) -> list[Path]:
    """OUT's checkpoints, newest first: ckpt.pt (always written first), then ckpt_<step>.pt by step;
    files that are the same inode (hard links) listed once."""
    files = kept_checkpoints(out)[::-1]
    main = out / "ckpt.pt"
    if main.is_file():
        files = [main] + [q for q in files if not _same_file(main, q)]
    return files


def newest_valid(out: Path, log_run: str | None) -> tuple[dict | None, Path | None, list]:
    """(state, path) of the newest checkpoint that passes read_checkpoint, its step matching its name and its
    run_id the log's run (log_run); and [(path, problem)] for each newer one that failed."""
    problems = []
    for path in checkpoint_candidates(out):
        try:
            st = read_checkpoint(path)
            if path.stem[5:].isdigit() and int(path.stem[5:]) != st["step"]:
                raise BadCheckpoint(f"{path}: holds step {st['step']}, not {path.stem[5:]}")
            if log_run and st.get("run_id") and st["run_id"] != log_run:
                raise BadCheckpoint(f"{path}: written by another run (run_id {st['run_id']}; log.jsonl is run "
                                    f"{log_run})")
        except BadCheckpoint as e:
            problems.append((path, str(e)))
            continue
        return st, path, problems
    return None, None, problems


def move_aside(out: Path, path: Path) -> list[str]:
    """Rename path and its hard links in OUT to <name>.bad (a damaged file is kept, never deleted); the new names."""
    twins = [q for q in out.glob("ckpt_*.pt") if q != path and _same_file(q, path)]
    for q in [path] + twins:
        q.replace(q.with_name(q.name + ".bad"))
    return [q.name + ".bad" for q in [path] + twins]


# -----------------------------------------------------------------------------
# the log and the data table


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
    """Replace the log atomically."""
    save(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def append_log(path: Path, record: dict):
    """Add one record to the log (opened per record: nothing to close on any way out)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _table_rows(t: dict) -> set:
    """A data table (audio.CropDataset.table()) as a set of items, each named by its file (or shard) and extent."""
    return {(t["paths"][r], -1, n) if k == 0 else (t["shard_files"][r], o, n)
            for k, r, o, n in zip(t["kind"], t["ref"], t["offset"], t["length"])}


def compare_data_table(path: Path, now: dict) -> tuple[bool, str, dict | None]:
    """(restore, note, saved table) for a resumed run whose scan of its data gives the table `now`: restore the
    saved one when only some of its items are gone (they stay in the draw and are skipped when drawn, exactly
    as in the run that saw them go bad), so the resumed run reads the same crops."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        old, new = _table_rows(saved), _table_rows(now)
    except Exception as e:  # missing (a run from before data.pt) or damaged: the scan of now stands
        return False, f"cannot read {path} ({_oneline(e)}); the crops come from today's scan of --data", None
    if new == old:
        return False, "", saved
    if new < old:
        return True, (f"{len(old - new)} of the run's {len(old)} files are missing or unreadable now; they stay "
                      f"in the draw and are skipped when drawn, as in the run itself"), saved
    return False, (f"--data has {len(new - old)} files the run did not start with; the crops come from today's "
                   f"files"), saved


def keep_data_table(out: Path, table: dict, resume: bool, ddp: bool = False, master: bool = True,
                    prog: str = "train.py") -> dict | None:
    """A fresh run saves the table of the items it draws crops from (OUT/data.pt, rank 0); a resumed one gets the
    saved table back (to use instead of `table`, today's scan) when some of its items are gone now
    (compare_data_table), so it reads the same crops. None: use `table`."""
    path = out / "data.pt"
    if not resume:
        if master:
            save(path, table)
        return None
    d = decide_on_rank0(lambda: dict(zip(("restore", "note", "_table"), compare_data_table(path, table))), ddp,
                        master, prog)
    if d["note"] and master:
        print(f"{prog}: {d['note']}", flush=True)
    if not d["restore"]:
        return None
    return d.get("_table") or torch.load(path, map_location="cpu", weights_only=True)  # rank 0 has read it already


def decide_on_rank0(fn, ddp: bool, master: bool, prog: str = "train.py"):
    """fn() on rank 0, its dict result (or its Refusal: one line, then exit with its code on every rank) sent to every
    rank under torch.distributed; keys starting with '_' stay on rank 0."""
    result = None
    if master:
        try:
            result = fn()
        except Refusal as e:
            result = {"refusal": (str(e), e.code)}
    if ddp:
        import torch.distributed as dist
        box = [None if result is None else {k: v for k, v in result.items() if not k.startswith("_")}]
        dist.broadcast_object_list(box, src=0)
        result = result if master else box[0]
    if "refusal" in result:
        msg, code = result["refusal"]
        if master:
            print(f"{prog}: {msg}", file=sys.stderr, flush=True)
        raise SystemExit(code)
    return result


# -----------------------------------------------------------------------------
# the files a run skipped


class BadFileLog:
    """OUT/skipped_files.txt: names each unusable file once per launch, across ranks and loader workers (as a data
    set's on_bad callback).

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


# -----------------------------------------------------------------------------
# the run plan


def _show(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def _norm(v):
    """A config value as JSON sees it (tuples and lists alike), for comparisons."""
    return json.loads(json.dumps(v))


def _diff(old: dict, new: dict, names) -> list[str]:
    return [f"--{k} {_show(old[k])} -> {_show(new[k])}" for k in names
            if k in old and k in new and _norm(old[k]) != _norm(new[k])]


def plan_run(out, mode: str, config: dict, given: dict, policy: dict, model: dict, upgrade=None) -> dict:
    """Before anything is built (one process): start fresh or continue which checkpoint, with what config.

    mode: "auto" (continue OUT's run if there is one), "true" (must continue), "false" (must start fresh).
    config: this command's training config; given: the fields set on its command line (training and model);
    model: the model config a fresh run of it builds (the fields a resume compares). policy: field ->
    "may_change" (a resume takes the given value and says so), "machine" (always this command's), "ignored"
    (the run's own value stays, a given one is ignored) or "fixed" (the default: the run's value; a different
    one given is refused). upgrade(old config) -> the config in today's terms (older runs' values).

    Returns {"resume": path or None, "_state": the loaded checkpoint or None, "train_config": dict,
    "run_id": str, "notes": [lines to print], "_log": the log records to keep, "applied": [changes]}; raises
    Refusal when it must not go on (a run it would overwrite, another run's log, no valid checkpoint, a fixed
    field changed).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for tmp in list(out.glob("ckpt*.pt.tmp")) + [out / "log.jsonl.tmp"]:  # left by a kill mid-write
        tmp.unlink(missing_ok=True)
    (out / "skipped_files.txt").unlink(missing_ok=True)  # BadFileLog names each file once per launch
    log_path = out / "log.jsonl"
    log = read_log(log_path)
    events = [r for r in log if r.get("event") in ("start", "resume") and "run_id" in r]
    log_run = events[-1]["run_id"] if events else None
    has_checkpoints = bool(checkpoint_candidates(out))
    fixed = lambda names: [k for k in names if policy.get(k, "fixed") == "fixed"]  # noqa: E731
    notes = []
    if mode == "false" and has_checkpoints:
        raise Refusal(f"{out} already holds a run ({checkpoint_candidates(out)[0].name}); continue it with "
                      f"--resume auto (the default) or choose another --out (--resume false never overwrites a run)")
    state, chosen, problems = newest_valid(out, log_run) if mode != "false" else (None, None, [])
    if has_checkpoints and state is None:
        raise Refusal(f"no valid checkpoint in {out}: {'; '.join(m for _, m in problems)}. Restore a good copy, or "
                      f"move them away to start over (nothing was changed)", code=1)
    if state is None and mode == "true":
        raise Refusal(f"--resume true but {out} holds no checkpoint (use --resume auto to start the run when there "
                      f"is none)")
    for path, msg in problems:  # damaged or foreign files (and their hard links) are moved aside, never deleted
        notes.append(f"skipping {msg}; moved to {', '.join(move_aside(out, path))}")

    if state is None:  # a fresh start; a log without a checkpoint must be this very run's, restarted early
        if log:
            last = events[-1] if events else None
            if last is None or "train_config" not in last or "model_config" not in last:
                raise Refusal(f"{log_path} is another run's log and {out} has no checkpoint; choose another --out "
                              f"or delete {log_path} to start over here")
            changed = _diff(last["train_config"], config, fixed(config)) + _diff(last["model_config"], model, model)
            if changed:
                raise Refusal(f"{log_path} is another run's log ({', '.join(changed)}) and {out} has no checkpoint; "
                              f"choose another --out or delete {log_path} to start over here")
            notes.append(f"{out}: the run stopped before its first checkpoint; starting it again from step 0")
        return {"resume": None, "_state": None, "train_config": dict(config), "run_id": uuid.uuid4().hex[:12],
                "notes": notes, "_log": []}

    # resume: the checkpoint's configuration, with what the command line may change applied
    old = upgrade(state["train_config"]) if upgrade else state["train_config"]
    merged = {**config, **{k: v for k, v in old.items() if k in config and policy.get(k) != "machine"}}
    refused = _diff(merged, given, fixed(k for k in given if k in config))
    refused += _diff(state["config"], given, [k for k in given if k not in config])
    if refused:
        raise Refusal(f"cannot change {', '.join(refused)} when continuing the run in {chosen} (step "
                      f"{state['step']}); drop the flag, or start a new run in another --out")
    may_change = [k for k in given if policy.get(k) == "may_change"]
    applied = _diff(merged, given, may_change)
    merged.update({k: given[k] for k in may_change})
    notes.append(f"resuming {chosen} at step {state['step']}" + (f", applying {', '.join(applied)}" if applied else ""))
    keep = [r for r in log if r.get("step", 0) < state["step"] or
            (r.get("event") and r.get("step", 0) <= state["step"])]
    return {"resume": str(chosen), "_state": state, "train_config": merged, "notes": notes,
            "run_id": state.get("run_id") or log_run or "unknown", "_log": keep, "applied": applied}
