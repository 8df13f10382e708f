#!/usr/bin/env bash
# Install kfe with its dev tools and the offline datasets. torch is pinned to the CPU
# build first so that the package's own range (torch>=2.1) does not pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q "setuptools>=70.1"   # tests build wheels offline (bdist_wheel built in)
python3 -m pip install -q -e ".[dev]"
bash scripts/datasets.sh
