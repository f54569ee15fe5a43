#!/usr/bin/env bash
# The wheels benchmarks/gpu_session.sh installs on a lent GPU machine, which has Python 3.12, its
# own torch, numpy 2 and CUDA, and no network. Run here (with pip and network); .whl/ is ignored by
# git and carried to the machine (keep it under the tool's 64 MiB, with the repository).
set -eu
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
PLATFORMS=()
for tag in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done
# What dp360's field, mesh and texture code imports that the machine's image does not hold.
for spec in nerfstudio==1.1.5 nerfacc==0.5.2 gsplat==1.4.0 tyro docstring_parser typeguard viser==0.2.7 msgspec \
    websockets diffusers xatlas embreex fast_simplification trimesh appdirs defusedxml dill pyquaternion \
    pytorch-msssim rawpy splines tensorly pytest pluggy iniconfig; do
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl "$spec"
done
du -sh .whl
