#!/usr/bin/env bash
# Build a Debian base image locally, for machines that reach the package registries but no
# container registry: debootstrap a minimal bookworm with Python 3.11, then `docker import` it.
#
#   scripts/build-base-image.sh [TAG]          # default tag: boneage-base:bookworm
#   docker build --network host --build-arg BASE_IMAGE=boneage-base:bookworm -t boneage:cpu .
#
# Everyone else uses the Dockerfile's default base (the public python:3.11-slim image).
set -euo pipefail
tag="${1:-boneage-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" >/dev/null
# What an image does not need: package caches, lists, docs, manuals, locales, and glibc's iconv
# modules (Python's codecs are its own).
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
       "$rootfs"/usr/lib/x86_64-linux-gnu/gconv
# The host's CA certificates, so that builds behind a TLS-inspecting proxy reach the registries.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs"/etc/ssl/certs/ca-certificates.crt
fi
tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$tag" >/dev/null
docker image ls "$tag"
