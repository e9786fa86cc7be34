#!/usr/bin/env bash
# Set-up for a fresh machine (idempotent): Debian's Fashion-MNIST, a virtualenv in .venv, the package with its
# test extras. PyTorch is pinned to the CPU-capable build this project is tested with (any torch>=2.4 works).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y dataset-fashion-mnist || { $SUDO apt-get update && $SUDO apt-get install -y dataset-fashion-mnist; }
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" -e ".[dev]"
echo "set-up done: activate with '. .venv/bin/activate'"
