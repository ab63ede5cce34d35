#!/usr/bin/env bash
# Regenerate docs/gallery/ from the examples at their default settings (one example at a time).
#   scripts/make_gallery.sh                  # every example
#   scripts/make_gallery.sh align_mlp lmc_mlp  # only these
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
gallery="$root/docs/gallery"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MPLBACKEND=Agg
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  names=(align_mlp align_cnn align_resnet lmc_mlp lmc_cnn lmc_resnet continual_avalanche lightning_callbacks)
fi
mkdir -p "$gallery"
for name in "${names[@]}"; do
  echo "== $name"
  start=$(date +%s)
  "$python" "$root/examples/$name.py" --out "$work/$name"
  for f in "$work/$name"/*.png "$work/$name"/*.gif; do
    [ -e "$f" ] || continue
    base="$(basename "$f")"
    case "$base" in lmc_epoch*) continue ;; esac  # per-epoch monitor plots: barriers.png sums them up
    cp "$f" "$gallery/${name}__${base}"
  done
  echo "   $(( $(date +%s) - start )) s"
done
ls -l "$gallery"
