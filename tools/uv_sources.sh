# Sourced (not run) by tools/lock.sh, tools/fresh_venv.sh and tests/canary.sh: makes sure the pinned uv
# is on PATH and sets `sources`, where uv finds the CPU build of torch: a local wheel folder where pip
# is set up with one (PIP_FIND_LINKS or pip's global.find-links, as on the project's build machines),
# else the PyTorch CPU index.
command -v uv >/dev/null || python3 -m pip install -q uv==0.13.9
sources=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
links=${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
if [[ -n "$links" ]]; then sources=(--find-links "$links"); fi
