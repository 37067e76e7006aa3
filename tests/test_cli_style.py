"""One flag style for every command: underscores canonical, the hyphen spelling an alias (README, Set-up)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [["train.py"], ["train.py", "export"], ["convert.py"], ["extract.py"], ["probe.py"], ["rvq.py"], ["audio.py", "prepare"],
            ["teachers.py", "fit-mfcc"], ["teachers.py", "labels"], ["bench.py"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_flag_has_its_underscore_spelling(cmd):
    out = subprocess.run([sys.executable, str(ROOT / cmd[0]), *cmd[1:], "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    lines = [ln for ln in out.splitlines() if re.match(r"\s{2}-", ln)]  # the options' own lines, not the epilog
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", "\n".join(lines)))
    hyphen_only = sorted(f for f in flags if "-" in f[2:] and "--" + f[2:].replace("-", "_") not in flags)
    assert not hyphen_only, f"{' '.join(cmd)}: flags without an underscore spelling: {hyphen_only}"
