#!/usr/bin/env bash
# One short session on a lent CUDA machine (no network there): the field's quality at full size.
#
#   bash benchmarks/gpu_wheels.sh            # here, once: the packages the machine lacks, as wheels in .whl/
#   bash benchmarks/gpu_session.sh           # there, from the repository root, with .whl carried
#
# 1. installs the carried wheels into /tmp/site (the machine's own torch, numpy and CUDA stay);
# 2. checks that dp360's field code imports, and stops at once if it does not (a cheap retry);
# 3. compiles gsplat's CUDA kernels in the background (for splatfacto);
# 4. fits nerfacto (the gpu preset, 256 px) on white, black and grey backgrounds, three processes
#    side by side on the one GPU (their fit seconds are therefore upper bounds), and measures each
#    with benchmarks/nerf_quality.py;
# 5. fits splatfacto on black if gsplat compiled in time, and checks its kernels against
#    dp360.nerf.splat_raster (tests/nerf/test_splat_raster.py's CUDA test).
# Results: $OUT/nerf_<background>.json, $OUT/splat_black.json, $OUT/summary.txt (also printed).
# QUICK=1 runs the same steps at test sizes (a check of this script on a CPU; SKIP_INSTALL=1 there).
set -u
OUT=${OUT:-/tmp/dp360-gpu-out}
PY=${PY:-python3}
BUDGET=${BUDGET:-470}  # seconds for steps 3-5, inside the caller's limit
mkdir -p "$OUT"
LOGS=$(mktemp -d)
begin=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - begin))); }

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >"$LOGS/pip.log" 2>&1 || { cat "$LOGS/pip.log"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks
else
    export PYTHONPATH=$PWD:$PWD/benchmarks
fi
export PYTHONUNBUFFERED=1

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    $PY - <<'EOF'
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("numpy", "nerfstudio", "gsplat", "diffusers", "transformers", "trimesh", "embreex", "xatlas"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
import dp360.nerf.fit, dp360.nerf.splat, dp360.nerf.mesh, dp360.nerf.texture, nerf_quality  # noqa: F401,E401
print("dp360 field code imports")
EOF
} >"$OUT/summary.txt" 2>&1 || { cat "$OUT/summary.txt"; exit 1; }

if [ "${QUICK:-0}" = 1 ]; then
    ARGS=(--size 32 --preset test --iterations 20 --texture-size 64)
else
    ARGS=()
fi

(TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 timeout $(($(left) - 150)) $PY -c \
    "import time; t = time.time(); from gsplat.cuda._backend import _C; print('gsplat compiled' if _C is not None else 'gsplat: no kernels', round(time.time() - t), 's')" \
    >"$OUT/gsplat.log" 2>&1) &
gsplat_job=$!

for background in white black grey; do
    timeout $(($(left) - 10)) $PY benchmarks/nerf_quality.py "${ARGS[@]}" --backgrounds $background \
        --json "$OUT/nerf_$background.json" >"$LOGS/nerf_$background.log" 2>&1 &
done

wait $gsplat_job
if grep -q "gsplat compiled" "$OUT/gsplat.log" && [ "$(left)" -gt 60 ]; then
    timeout $(($(left) - 10)) $PY benchmarks/nerf_quality.py "${ARGS[@]}" --fields splatfacto --backgrounds black \
        --json "$OUT/splat_black.json" >"$LOGS/splat_black.log" 2>&1
    # gsplat's kernels against dp360's plain-PyTorch rasteriser (the test that skips without CUDA)
    timeout 60 $PY -c "import sys; sys.path.insert(0, 'tests/nerf'); import test_splat_raster as t
for mode in ('classic', 'antialiased'):
    t.test_gsplats_cuda_kernels_match_the_reference(mode)
print('gsplat kernels match the reference rasteriser (classic, antialiased)')" >"$LOGS/splat_raster.log" 2>&1
fi
wait

{
    echo "--- gsplat"
    tail -c 3000 "$OUT/gsplat.log"
    for log in "$LOGS"/nerf_*.log "$LOGS"/splat_*.log; do  # splat_raster.log has no table: its last lines
        [ -f "$log" ] || continue
        echo "--- $(basename "$log")"
        if grep -q "^background" "$log"; then
            grep -E "^(device|NVIDIA|CPU|background|white|black|grey|target)" "$log"
        else
            tail -n 30 "$log"  # it failed or ran out of time: its last words
        fi
    done
    echo "--- $(($(date +%s) - begin)) s"
} >>"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
