"""Probe a model, the same architecture at random initialisation, and CQT/MFCC features on the synthesised
tasks of make_probe_tasks.py, and print one markdown table (the evidence tables of the README).

    python examples/make_probe_tasks.py probe_tasks
    python examples/probe_evidence.py probe_tasks --ckpt models/mert_default.pt --json evidence.json
    python examples/make_probe_tasks.py timed --tasks chords,beats,notes,keys --n 150
    python examples/probe_evidence.py timed --only chords,beats,notes,keys --features model,random,cqt

Per task and feature set it reports the test metric of the layer chosen on the validation split, for the linear
and the MLP probe (see probe.py); features are cached under <tasks>/.probe_cache, so reruns are quick. The timed
tasks (chords, beats, notes, keys) are probed frame by frame (probe.py --task chords/beats/notes/segments).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # probe.py and friends live one folder up
import probe  # noqa: E402

TASKS = ("pitch", "timbre", "chord", "tempo", "instruments")
TIMED = {"chords": "chords", "beats": "beats", "notes": "notes", "keys": "segments"}  # task -> probe.py --task
FEATURES = ("model", "random", "cqt", "mfcc")
NAMES = {"model": "pretrained", "random": "random init", "cqt": "CQT stats", "mfcc": "MFCC stats"}


def _list(values: list[str]) -> list[str]:
    """Space- and/or comma-separated values -> a list."""
    return [v.strip() for arg in values for v in arg.split(",") if v.strip()]


def main(argv=None) -> int:
    """Run every (task, feature set) probe and print the table; returns the exit code."""
    p = argparse.ArgumentParser(description="Evidence table: model vs random init vs CQT/MFCC features.")
    p.add_argument("tasks", help="folder written by make_probe_tasks.py")
    p.add_argument("--ckpt", default=None, help="model to probe (default: the shipped model)")
    p.add_argument("--features", nargs="+", default=list(FEATURES), help="some of model, random, cqt, mfcc")
    p.add_argument("--only", nargs="+", default=list(TASKS), help="tasks, e.g. pitch chord or chords,beats,notes,keys")
    p.add_argument("--seed", type=int, default=0, help="probe seed (and the random initialisation's)")
    p.add_argument("--context", type=int, default=0, help="timed tasks: frames of context either side (probe.py)")
    p.add_argument("--json", default=None, help="write every probe's full results here")
    args = p.parse_args(argv)
    feature_sets, tasks = _list(args.features), _list(args.only)
    bad = [t for t in tasks if t not in TASKS and t not in TIMED] + [f for f in feature_sets if f not in FEATURES]
    if bad:
        p.error(f"unknown task or feature set: {', '.join(bad)}")
    names = dict(NAMES)
    if all(t in TIMED for t in tasks):  # frame features, not statistics over time
        names.update(cqt="CQT frames", mfcc="MFCC frames")
    results = {}
    for task in tasks:
        for fs in feature_sets:
            argv_probe = [str(Path(args.tasks) / f"{task}.csv"), "--features", fs, "--seed", str(args.seed)]
            if task in TIMED:
                argv_probe += ["--task", TIMED[task], "--context", str(args.context)]
            if args.ckpt:
                argv_probe += ["--ckpt", args.ckpt]
            r = probe.run(probe.build_parser().parse_args(argv_probe))
            results[f"{task}/{fs}"] = r
            best = r["best"]
            print(f"{task} / {names[fs]}: " + ", ".join(f"{k} {best[k]['test']} (layer {best[k]['layer']})" for k in best)
                  + f" [{r['seconds']} s]", file=sys.stderr)
    print("| task | metric | " + " | ".join(names[f] for f in feature_sets) + " |")
    print("|---|---|" + "---|" * len(feature_sets))
    for task in tasks:
        r0 = results[f"{task}/{feature_sets[0]}"]
        for m in r0["metrics"]:
            cells = []
            for fs in feature_sets:
                b = results[f"{task}/{fs}"]["best"]
                lin, mlp = b["linear"], b["mlp"]
                layer = f" (L{lin['layer']}/L{mlp['layer']})" if results[f"{task}/{fs}"]["layers"] > 1 else ""
                cells.append(f"{lin['test'][m]:.3f} / {mlp['test'][m]:.3f}{layer}")
            print(f"| {task} | {m} | " + " | ".join(cells) + " |")
    print("\ncells: linear / MLP probe test score of the layer chosen on validation (that layer in brackets)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
