#!/usr/bin/env bash
# Refresh requirements-lock.txt from requirements.txt: exact versions of every package, direct and
# transitive, for Python 3.11 on Linux x86-64 with the CPU build of torch.
#     bash tools/lock.sh            # keep locked versions that still satisfy requirements.txt
#     bash tools/lock.sh --upgrade  # take the newest versions requirements.txt admits
# tools/uv_sources.sh bootstraps the pinned uv and says where the CPU torch wheel comes from.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/uv_sources.sh
uv pip compile requirements.txt -o requirements-lock.txt --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 --no-header --quiet "${sources[@]}" "$@"
{
  echo "# Exact versions of every package RolePlayProj is tested with (CPU build of torch)."
  echo "# Made from requirements.txt by 'bash tools/lock.sh'; do not edit by hand."
  echo "# Install: pip install -r requirements-lock.txt"
  cat requirements-lock.txt
} > requirements-lock.txt.tmp
mv requirements-lock.txt.tmp requirements-lock.txt
echo "wrote requirements-lock.txt ($(grep -c '==' requirements-lock.txt) packages)"
