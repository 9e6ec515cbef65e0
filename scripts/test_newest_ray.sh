#!/usr/bin/env bash
# Run the test suite against the newest Ray release that pyproject.toml accepts, beside the locked set: the locked
# dependencies except Ray (and what only Ray pins), then the newest Ray in the accepted range.
#
#   scripts/test_newest_ray.sh                # the whole suite (as .ci/run, about 40 minutes on 2 cores)
#   scripts/test_newest_ray.sh -m "not slow"  # pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
grep -v -e '^ray==' constraints.txt > "$venv/constraints-without-ray.txt"
"$venv/bin/pip" install -q -c "$venv/constraints-without-ray.txt" -e ".[test]"
range=$(grep -o '"ray\[[^"]*"' pyproject.toml | tr -d '"')
"$venv/bin/pip" install -q --upgrade "$range"
echo "testing with Ray $("$venv/bin/python" -c 'import ray; print(ray.__version__)') (pyproject: $range)"
"$venv/bin/python" -m raysd.doctor --quick
"$venv/bin/python" -m pytest -q "$@"
rm -rf "$(dirname "$venv")"
