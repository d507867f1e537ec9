"""requirements.txt (readable ranges) and requirements-lock.txt (exact versions) must agree.

The lock is made from requirements.txt by `bash tools/lock.sh`; editing one without the other fails
here, with the command that fixes it.
"""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
FIX = "run `bash tools/lock.sh` to refresh requirements-lock.txt"
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==(\S+)")


def direct_requirements(text: str) -> dict[str, Requirement]:
    reqs = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            reqs[canonicalize_name(req.name)] = req
    return reqs


def locked(text: str) -> tuple[dict[str, Version], set[str]]:
    """Pinned versions, and the packages the lock says come straight from requirements.txt."""
    versions: dict[str, Version] = {}
    direct: set[str] = set()
    current = ""
    for line in text.splitlines():
        if match := PIN.match(line):
            current = canonicalize_name(match.group(1))
            versions[current] = Version(match.group(2))
        elif "-r requirements.txt" in line and current:
            direct.add(current)
    return versions, direct


def check(requirements: str, lock: str) -> list[str]:
    """Every disagreement between the two files, one sentence each."""
    reqs = direct_requirements(requirements)
    versions, direct = locked(lock)
    problems = []
    for name, req in reqs.items():
        if name not in versions:
            problems.append(f"{req} is in requirements.txt but not in the lock")
        elif not req.specifier.contains(versions[name], prereleases=True):
            problems.append(f"the lock pins {name}=={versions[name]}, outside requirements.txt's {req}")
    problems += [f"the lock lists {name} as a direct requirement, requirements.txt does not" for name in
                 sorted(direct - set(reqs))]
    return problems


def test_requirements_and_lock_agree() -> None:
    problems = check((REPO / "requirements.txt").read_text(), (REPO / "requirements-lock.txt").read_text())
    assert not problems, "; ".join(problems) + f" -- {FIX}"


def test_lock_pins_every_package_and_the_cpu_torch() -> None:
    lock = (REPO / "requirements-lock.txt").read_text()
    versions, _ = locked(lock)
    loose = [line for line in lock.splitlines() if line and not line.startswith((" ", "#", "-")) and "==" not in line]
    assert not loose, f"unpinned lines in the lock: {loose}"
    assert versions["torch"].local == "cpu", "the lock must hold the CPU build of torch (no CUDA packages)"
    assert not [name for name in versions if name.startswith("nvidia-")]
    assert len(versions) > len(direct_requirements((REPO / "requirements.txt").read_text()))  # transitive too


def test_the_check_catches_each_kind_of_drift() -> None:
    lock = "torch==2.13.0+cpu\n    # via -r requirements.txt\nfoo==1.0\n    # via -r requirements.txt\n"
    assert check("torch>=2.13,<2.14\nfoo>=1\n", lock) == []
    assert "outside" in check("torch>=2.14\nfoo>=1\n", lock)[0]
    assert "not in the lock" in check("torch>=2.13\nfoo>=1\nbar\n", lock)[0]
    assert "does not" in check("torch>=2.13\n", lock)[0]
