#!/usr/bin/env bash
# Does hyprune pass its tests with the newest releases of everything it depends on?
#
#   bash scripts/check-latest.sh            # prints the versions it got and the pytest summary
#
# A fresh venv in a temporary folder, hyprune installed editable from this checkout, then every
# dependency upgraded to its newest release, *past* the ranges in pyproject.toml (transformers
# included), and the default test suite. Run it before widening a range or refreshing
# constraints.txt; `KEEP=1` keeps the venv (its path is printed) to freeze it into constraints.txt.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/hyprune-latest.XXXX")"
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
# shellcheck disable=SC1091
source "$tmp/venv/bin/activate"
pip install -q torch==2.13.0 -e "$root[test]"
deps=$(python - <<'PY'
import re, tomllib, pathlib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
names = project["dependencies"] + project["optional-dependencies"]["test"]
print(" ".join(sorted({re.split(r"[<>=!~ \[]", d, maxsplit=1)[0] for d in names} - {"torch"})))
PY
)
cd "$root"
# shellcheck disable=SC2086
pip install -q --upgrade $deps || echo "note: pip could not install every newest release (see above); testing what it got"
echo "versions (installed / newest on the index, where pip could not take the newest):"
python - $deps <<'PY'
import re, subprocess, sys
from importlib.metadata import version
for name in sys.argv[1:]:
    listed = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True)
    newest = re.search(r"Available versions: ([^,\s]+)", listed.stdout)
    got = version(name)
    behind = f"   (newest {newest.group(1)} not installable here)" if newest and newest.group(1) != got else ""
    print(f"  {name:14s} {got}{behind}")
PY
[[ "${KEEP:-0}" == 1 ]] && echo "venv kept: $tmp/venv"
HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false python -m pytest -q -p no:cacheprovider
