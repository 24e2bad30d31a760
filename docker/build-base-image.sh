#!/bin/sh
# Build a stand-in for debian:12-slim from Debian's archive, for machines that cannot reach Docker Hub:
# a minbase bookworm tree (debootstrap), committed as a local image with buildah. Usage: build-base-image.sh NAME
set -eu
name=${1:?usage: build-base-image.sh IMAGE_NAME}
command -v debootstrap >/dev/null || { echo "needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
debootstrap --variant=minbase bookworm "$tree" http://deb.debian.org/debian
rm -rf "$tree"/var/lib/apt/lists/* "$tree"/var/cache/apt/*.bin
ctr=$(buildah --storage-driver vfs from scratch)
tar -C "$tree" --exclude=./dev/* -cf "$tree.tar" .
trap 'rm -rf "$tree" "$tree.tar"' EXIT
buildah --storage-driver vfs add "$ctr" "$tree.tar" /  # a local tar archive is unpacked
buildah --storage-driver vfs config --cmd /bin/bash "$ctr"
buildah --storage-driver vfs commit --rm "$ctr" "$name"
