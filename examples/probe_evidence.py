"""Probe a model, the same architecture at random initialisation, and CQT/MFCC statistics on the synthesised
tasks of make_probe_tasks.py, and print one markdown table (the evidence table of the README).

    python examples/make_probe_tasks.py probe_tasks
    python examples/probe_evidence.py probe_tasks --ckpt models/mert_default.pt --json evidence.json

Per task and feature set it reports the test metric of the layer chosen on the validation split, for the linear
and the MLP probe (see probe.py); features are cached under probe_tasks/.probe_cache, so reruns are quick.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # probe.py and friends live one folder up
import probe  # noqa: E402

TASKS = ("pitch", "timbre", "chord", "tempo", "instruments")
FEATURES = ("model", "random", "cqt", "mfcc")
NAMES = {"model": "pretrained", "random": "random init", "cqt": "CQT stats", "mfcc": "MFCC stats"}


def main(argv=None) -> int:
    """Run every (task, feature set) probe and print the table; returns the exit code."""
    p = argparse.ArgumentParser(description="Evidence table: model vs random init vs CQT/MFCC statistics.")
    p.add_argument("tasks", help="folder written by make_probe_tasks.py")
    p.add_argument("--ckpt", default=None, help="model to probe (default: the shipped model)")
    p.add_argument("--features", default=",".join(FEATURES), help="comma list of model, random, cqt, mfcc")
    p.add_argument("--only", default=",".join(TASKS), help="comma list of tasks")
    p.add_argument("--seed", type=int, default=0, help="probe seed (and the random initialisation's)")
    p.add_argument("--json", default=None, help="write every probe's full results here")
    args = p.parse_args(argv)
    feature_sets, tasks = args.features.split(","), args.only.split(",")
    results = {}
    for task in tasks:
        for fs in feature_sets:
            argv_probe = [str(Path(args.tasks) / f"{task}.csv"), "--features", fs, "--seed", str(args.seed)]
            if args.ckpt:
                argv_probe += ["--ckpt", args.ckpt]
            r = probe.run(probe.build_parser().parse_args(argv_probe))
            results[f"{task}/{fs}"] = r
            best = r["best"]
            print(f"{task} / {NAMES[fs]}: " + ", ".join(f"{k} {best[k]['test']} (layer {best[k]['layer']})" for k in best)
                  + f" [{r['seconds']} s]", file=sys.stderr)
    print("| task | metric | " + " | ".join(NAMES[f] for f in feature_sets) + " |")
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
