"""Is the installed stack the one the tests ran on? The tested ranges have one home,
`requirements.txt`; this module reads them from there and, once per process, warns on stderr about
each key package whose installed version is outside its range (or missing), with both versions:

    warning: transformers 4.57.0 is outside the tested range >=5.23,<5.25 (requirements.txt); ...

A warning, not an error: a newer release usually works (tests/canary.sh checks the newest ones), and
a GPU machine installs its own CUDA build of torch. `roleplay.loading.load_tokenizer` calls
`warn_if_untested` so every script that loads a model checks at start-up.

Example:
    python -c "from roleplay import versions; print(versions.untested() or 'all key packages in range')"
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from utils import REPO_ROOT

REQUIREMENTS = REPO_ROOT / "requirements.txt"
# the packages whose API the code relies on (model loading, quantization, training, serving)
KEY_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "accelerate", "safetensors",
                "gradio")
_warned = False  # once per process, however many models a script loads


def tested_ranges(path: str | Path = REQUIREMENTS) -> dict[str, str]:
    """package name (normalised) -> its version specifier in requirements.txt ("" when unpinned)."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    ranges = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:  # an installed copy without the file: nothing to compare against
        return ranges
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        # as written there (">=5.23,<5.25"), which is what a reader of the file looks for
        written = line[len(req.name):].split(";", 1)[0].strip() if line.startswith(req.name) else ""
        ranges[canonicalize_name(req.name)] = written if not req.extras and written else str(req.specifier)
    return ranges


def installed_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def untested(packages: tuple[str, ...] = KEY_PACKAGES, path: str | Path = REQUIREMENTS) -> list[str]:
    """One line per key package outside its tested range: "NAME INSTALLED is outside ... RANGE"."""
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    ranges = tested_ranges(path)
    problems = []
    for package in packages:
        spec = ranges.get(canonicalize_name(package))
        if not spec:
            continue
        found = installed_version(package)
        if found is None:
            problems.append(f"{package} is not installed (tested range {spec}, {Path(path).name})")
            continue
        try:
            inside = SpecifierSet(spec).contains(Version(found), prereleases=True)
        except InvalidVersion:
            inside = False
        if not inside:
            problems.append(f"{package} {found} is outside the tested range {spec} ({Path(path).name})")
    return problems


def warn_if_untested(stream: TextIO | None = None, path: str | Path = REQUIREMENTS) -> list[str]:
    """Print a warning per untested key package, the first time it is called in a process; returns
    the problems found (an empty list on later calls)."""
    global _warned
    if _warned:
        return []
    _warned = True
    problems = untested(path=path)
    for problem in problems:
        print(f"warning: {problem}; results may differ from the tested set: `pip install -r "
              "requirements-lock.txt` installs it", file=stream or sys.stderr, flush=True)
    return problems
