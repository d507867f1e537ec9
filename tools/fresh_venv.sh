#!/usr/bin/env bash
# Make a brand-new virtual environment at $1 holding exactly the packages of requirements-lock.txt.
#     bash tools/fresh_venv.sh .venv && source .venv/bin/activate
# uv (pinned) does the install; tools/uv_sources.sh bootstraps it and says where CPU torch comes from.
set -euo pipefail
venv=${1:?usage: tools/fresh_venv.sh VENV_DIR}
cd "$(dirname "$0")/.."
source tools/uv_sources.sh
rm -rf "$venv"
uv venv -q --python 3.11 "$venv"
uv pip sync -q --python "$venv/bin/python" "${sources[@]}" requirements-lock.txt
echo "fresh venv at $venv: $(uv pip list -q --python "$venv/bin/python" | tail -n +3 | wc -l) packages from requirements-lock.txt"
