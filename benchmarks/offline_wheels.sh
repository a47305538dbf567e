#!/usr/bin/env bash
# Wheels of what the GPU benchmarks need beyond a GPU host's own torch, timm and transformers, for a host that
# cannot reach a package index (an air-gapped cluster, a lent benchmark machine):
#
#     bash benchmarks/offline_wheels.sh DIR [PYTHON_VERSION] [TORCHAO_VERSION]     # here, where pip reaches PyPI
#     pip install --no-index --no-deps --target SITE DIR/*.whl && export PYTHONPATH=SITE   # there
#
# PYTHON_VERSION is the GPU host's (default 3.12), TORCHAO_VERSION the torchao release built for its torch
# (default 0.17.0, for torch 2.11; torchao's compatibility table lists the others). DeepSpeed is an sdist on PyPI:
# it is built into a pure-Python wheel here, and compiles no op on the GPU host because our optimizer is torch's.
set -euo pipefail
dir=${1:?usage: offline_wheels.sh DIR [PYTHON_VERSION] [TORCHAO_VERSION]}
py=${2:-3.12}
torchao=${3:-0.17.0}
mkdir -p "$dir"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
    webdataset==1.0.2 braceexpand "torchao==$torchao" hjson py-cpuinfo msgpack
python3 -m pip download --quiet --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
    pydantic  # with the pydantic-core it pins (deepspeed's config)
python3 -m pip wheel --quiet --no-deps -w "$dir" deepspeed==0.19.8
ls "$dir"
