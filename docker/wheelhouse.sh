#!/usr/bin/env bash
# Fill docker/wheelhouse/ with binary wheels of the project's dependencies for the image's
# platform (CPython 3.11, glibc x86_64: Debian bookworm), so that `docker build` installs with
# no package index (PIP_NO_INDEX=1 in docker/Dockerfile).
#
#   docker/wheelhouse.sh [EXTRAS]       # default EXTRAS: serve
#
# Reads the requirements of the base install and of EXTRAS from pyproject.toml; adds the build
# backend (setuptools, wheel) that builds the project's own wheel inside the image.
# Environment: PYTHON (default python3, >= 3.11 for tomllib), PY_VERSION (default 3.11),
# GLIBC_MINOR (default 36: bookworm's glibc 2.36; every manylinux tag up to it is accepted).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-serve}"
PYTHON="${PYTHON:-python3}"
PY_VERSION="${PY_VERSION:-3.11}"
GLIBC_MINOR="${GLIBC_MINOR:-36}"
DEST=docker/wheelhouse

reqs="$("$PYTHON" - "$EXTRAS" <<'PY'
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = list(project["dependencies"])
for extra in filter(None, sys.argv[1].split(",")):
    reqs += project["optional-dependencies"][extra]
reqs += project.get("build-system", {}).get("requires", []) or ["setuptools>=68"]
print("\n".join(dict.fromkeys(reqs + ["setuptools>=68", "wheel"])))
PY
)"
req_file="$(mktemp)"
trap 'rm -f "$req_file"' EXIT
printf '%s\n' "$reqs" > "$req_file"
platforms=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64
           --platform manylinux1_x86_64)
for ((minor = 5; minor <= GLIBC_MINOR; minor++)); do
    platforms+=(--platform "manylinux_2_${minor}_x86_64")
done
mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --dest "$DEST" \
    --only-binary=:all: --implementation cp --python-version "$PY_VERSION" \
    --abi "cp${PY_VERSION/./}" "${platforms[@]}" --requirement "$req_file"
echo "wheelhouse: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
