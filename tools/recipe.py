"""The training recipe as train.sh resolves it, for the bench and the tests.

train.sh is the recipe's one home (users edit it); anything else that claims to use the recipe asks
train.sh for it with `bash train.sh --print`, which prints the train.py command line the train stage
would run in a given environment, and runs nothing.

Example (from the repo root):
    python -c "from tools.recipe import train_args; print(train_args())"
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN_SH = REPO / "train.sh"


def train_commands(env: Mapping[str, str] | None = None) -> list[list[str]]:
    """Every train.py run of the train stage for `env` on top of this process's env (launcher included):
    one, or with ROLES=a,b one per role."""
    # a UTF-8 locale: bash's %q quotes non-ASCII text (role names) as $'...' in the C locale, which shlex cannot read
    full_env = {**os.environ, "LC_ALL": "C.UTF-8", **(env or {})}
    proc = subprocess.run(["bash", str(TRAIN_SH), "--print"], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bash train.sh --print failed ({proc.returncode}): {proc.stderr.strip()}")
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def train_command(env: Mapping[str, str] | None = None) -> list[str]:
    """The train stage's full command (launcher included) for `env` on top of this process's env."""
    commands = train_commands(env)
    if len(commands) != 1:
        raise RuntimeError(f"bash train.sh --print gave {len(commands)} commands (ROLES set?); use train_commands")
    return commands[0]


def train_args(env: Mapping[str, str] | None = None) -> list[str]:
    """Only train.py's own arguments (what follows `train.py` in the train stage's command)."""
    cmd = train_command(env)
    return cmd[cmd.index("train.py") + 1:]


def arg_value(args: list[str], flag: str) -> str | None:
    """The value after `flag` in an argument list (None when the flag is absent)."""
    return args[args.index(flag) + 1] if flag in args else None
