#!/usr/bin/env bash
# Make sure Fashion-MNIST is on this machine: Debian's dataset-fashion-mnist package where apt is available,
# otherwise a download of the official files with checksums (cnnmod data fetch).
set -euo pipefail
cnnmod=${1:-cnnmod}
debian=/usr/share/datasets/fashion-mnist
if [ -f "$debian/train-images-idx3-ubyte.gz" ] || [ -f "${CNNMOD_DATA:-/nonexistent}/fashion-mnist/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's dataset-fashion-mnist" >&2
  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null && exit 0
  echo "apt-get could not install dataset-fashion-mnist; downloading instead" >&2
fi
"$cnnmod" data fetch fashion-mnist
