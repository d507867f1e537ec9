#!/usr/bin/env bash
# Make a brand-new virtual environment at $1 holding exactly the packages of requirements-lock.txt.
#     bash tools/fresh_venv.sh .venv && source .venv/bin/activate
# uv (pinned) does the install; it is bootstrapped into the user's pip if missing.
set -euo pipefail
venv=${1:?usage: tools/fresh_venv.sh VENV_DIR}
cd "$(dirname "$0")/.."
command -v uv >/dev/null || python3 -m pip install -q uv==0.13.9
rm -rf "$venv"
uv venv -q --python 3.11 "$venv"
# The CPU torch wheel: from a local wheel folder where pip is set up with one (PIP_FIND_LINKS, as on
# the project's build machines), else from the PyTorch CPU index.
sources=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
links=${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
if [[ -n "$links" ]]; then sources=(--find-links "$links"); fi
uv pip sync -q --python "$venv/bin/python" "${sources[@]}" requirements-lock.txt
echo "fresh venv at $venv: $(uv pip list -q --python "$venv/bin/python" | tail -n +3 | wc -l) packages from requirements-lock.txt"
