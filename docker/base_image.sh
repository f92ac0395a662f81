#!/usr/bin/env bash
# Make a local BASE_IMAGE for docker/Dockerfile where Docker Hub is not reachable: a minimal
# Debian bookworm root from Debian's mirror (debootstrap --variant=minbase) with python3 3.11
# and its venv module, imported with `docker import`.
#
#   docker/base_image.sh [TAG]          # default TAG: mldcn-base:bookworm
#
# Skips the work when TAG already exists (FORCE=1 rebuilds). Needs root, debootstrap, docker.
# Environment: MIRROR (default http://deb.debian.org/debian), SUITE (default bookworm).
set -euo pipefail
TAG="${1:-mldcn-base:bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SUITE="${SUITE:-bookworm}"

if [[ -z "${FORCE:-}" ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG exists (FORCE=1 rebuilds it)"
    exit 0
fi
old_id="$(docker image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)"
root="$(mktemp -d /tmp/mldcn-rootfs.XXXXXX)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$root" "$MIRROR" > "$root.log" 2>&1 || { tail -20 "$root.log"; exit 1; }
rm -f "$root.log"
# What a container never needs: package lists and caches, documentation, translations.
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
       "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
tar --numeric-owner -C "$root" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap $SUITE minbase + python3, python3-venv" - "$TAG" >/dev/null
if [[ -n "$old_id" ]]; then docker rmi "$old_id" >/dev/null 2>&1 || true; fi  # the replaced one
echo "base image $TAG: $(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
