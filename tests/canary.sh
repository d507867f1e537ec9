#!/usr/bin/env bash
# Canary for the next release: the locked environment, but with the NEWEST transformers, peft and
# gradio the registry has, in a throw-away venv; runs only the model / generation / chat-layout
# contract tests. It reports and always exits 0 (CI's locked run decides whether a change lands).
#     bash tests/canary.sh                         # newest releases
#     CANARY_PINS="transformers==5.23.0" bash tests/canary.sh   # any other versions, e.g. the oldest admitted
# Reading it: "canary OK" = our model still follows the newest generate/cache contract, so widening
# requirements.txt to those versions is safe (then: bash tools/lock.sh --upgrade). "canary BROKEN"
# lists the failing tests: fix them before the range is widened.
set -uo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d "${TMPDIR:-/tmp}/roleplay-canary.XXXXXX")
trap 'rm -rf "$venv"' EXIT
pins=${CANARY_PINS:-"transformers peft gradio"}
source tools/uv_sources.sh
# Only the named packages move; everything else (torch included) stays at its locked version.
upgrade=()
for spec in $pins; do upgrade+=(--upgrade-package "${spec%%[=<>!~]*}"); done
# The locked environment first (as CI's), then only the named packages upgraded.
if ! { bash tools/fresh_venv.sh "$venv" >/dev/null &&
       # shellcheck disable=SC2086  # $pins is a list of requirement specs
       uv pip install -q --python "$venv/bin/python" "${sources[@]}" "${upgrade[@]}" $pins; }; then
  echo "canary BROKEN: could not install $pins"
  exit 0
fi
versions=$("$venv/bin/python" -c "import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in ('transformers', 'peft', 'gradio', 'torch')))")
log="$venv/pytest.log"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_generate_contract.py tests/test_baichuan_model.py \
  tests/test_chat_layout.py tests/test_baichuan_tokenizer.py tests/test_quantizer.py >"$log" 2>&1
status=$?
summary=$(tail -n 1 "$log" | sed 's/=//g; s/^ *//; s/ *$//')
if [[ $status -eq 0 ]]; then
  echo "canary OK with $versions (contract tests: ${summary})"
else
  grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/  /'
  echo "canary BROKEN with $versions (contract tests: ${summary}); the locked versions are unaffected"
fi
exit 0
