#!/usr/bin/env bash
# Every GPU check and benchmark of the repo, stage by stage, each with its own time limit, so a
# failing or slow stage costs only itself. Outputs (one .txt per stage, JSON where the script
# writes it) go to OUT_DIR.
#
#   bash bench/gpu_all.sh OUT_DIR                 # all stages
#   bash bench/gpu_all.sh OUT_DIR tests norm      # some stages
#
# Stages: tests (tests/test_gpu.py + the CUDA runs of the codegen tests), norm (bench/gpu_norm.py
# at large shapes), decode (gpu_norm.py at 1..64 rows: launch included), host (host_overhead.py
# on CUDA and, with TRITON_INTERPRET=1, on this machine's CPU), glu (bench/gpu_glu.py),
# backward (bench/gpu_norm_backward.py; rows of 16384, the looped kernel, too), compiled (bench/compiled_regions.py on CUDA: regions
# inside Inductor's code, against Inductor alone and the opaque op). Uses the installed torch/triton; the repo needs no
# install (PYTHONPATH is set to it).
set -u
out=${1:?usage: bash bench/gpu_all.sh OUT_DIR [stages...]}
shift
stages=${*:-tests compiled norm decode host glu backward}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FXREWRITE_CACHE_DIR="${FXREWRITE_CACHE_DIR:-$(mktemp -d)}"

python - <<'EOF' | tee "$out/versions.txt"
import platform, torch, triton
print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
print(f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}")
EOF
git log -1 --format='commit %H %cd' 2>/dev/null | tee -a "$out/versions.txt"

stage() {  # stage NAME LIMIT_S COMMAND...: run, keep the output, say how it ended
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    echo "stage $name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$out/stages.txt"
    tail -n 3 "$out/$name.txt"
}

for s in $stages; do
    case $s in
    tests)
        stage test_gpu 300 python -m pytest -q -p no:cacheprovider tests/test_gpu.py
        stage test_codegen_cuda 150 python -m pytest -q -p no:cacheprovider -x tests/test_codegen.py \
            tests/test_host_overhead.py tests/test_codegen_compiled.py $(ls tests/test_codegen_glu.py tests/test_codegen_backward.py 2>/dev/null) ;;
    norm)
        stage gpu_norm 200 python bench/gpu_norm.py --M 4096 32768 --N 1024 4096 --rep 100 --wall-rounds 11 \
            --json "$out/gpu_norm.json" ;;
    decode)
        stage gpu_norm_decode 120 python bench/gpu_norm.py --M 1 16 64 --N 4096 --rep 100 --wall-rounds 21 \
            --json "$out/gpu_norm_decode.json" ;;
    host)
        stage host_overhead_cuda 90 python bench/host_overhead.py --device cuda --rounds 1000 --null-rounds 3000
        stage host_overhead_cpu 120 env TRITON_INTERPRET=1 python bench/host_overhead.py --device cpu --rounds 100 \
            --null-rounds 5000 ;;
    glu)
        [ -f bench/gpu_glu.py ] && stage gpu_glu 150 python bench/gpu_glu.py ;;
    backward)
        [ -f bench/gpu_norm_backward.py ] && stage gpu_norm_backward 150 python bench/gpu_norm_backward.py
        stage gpu_norm_backward_wide 120 python bench/gpu_norm_backward.py --M 64 4096 --N 16384 ;;
    compiled)
        stage compiled_regions_cuda 200 python bench/compiled_regions.py --device cuda --rounds 31 ;;
    *) echo "unknown stage $s" ;;
    esac
done
