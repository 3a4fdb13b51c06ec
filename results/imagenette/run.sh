#!/usr/bin/env bash
# One run of the ImageNette learning-curve study (README "ImageNette learning curves"), started or
# resumed: bash results/imagenette/run.sh ARM SEED [EPOCHS]   (ARM: ijepa, njepa, fixed, first, lr3e-4, ema0.99,
#   const-ijepa, const-njepa, none, pmean-1.76)
# Two at a time on 2 cores: prefix OMP_NUM_THREADS=1; alone, leave it out. A run killed (session end,
# Ctrl-C) continues from its last checkpoint when the same line is run again.
set -euo pipefail
arm=$1; seed=$2; epochs=${3:-100}; lr=1e-3  # the paper's peak lr; the lr3e-4 lever lowers it
case $arm in
  ijepa) flags="--lambda1 0 --lambda2 0" ;;                       # I-JEPA
  first) flags="--lambda1 0 --lambda2 0 --context-keep first" ;;  # I-JEPA with I-JEPA's own context cut
  lr3e-4) flags="--lambda1 0 --lambda2 0"; lr=3e-4 ;;            # I-JEPA, peak lr 3e-4
  ema0.99) flags="--lambda1 0 --lambda2 0 --ema 0.99" ;;          # I-JEPA, EMA momentum 0.99 at the start
  njepa) flags="" ;;                                              # N-JEPA, the paper's defaults
  fixed) flags="--noise-dist fixed" ;;                            # N-JEPA, sigma = 0.5
  none) flags="--noise none" ;;                                   # N-JEPA's two predictors and three losses, zero noise
  pmean-1.76) flags="--p-mean -1.76" ;;                          # N-JEPA, sigma scaled to the paper's placed share (86 %)
  const-ijepa) flags="--lambda1 0 --lambda2 0 --lr-schedule constant" ;;  # I-JEPA, lr constant after warmup (Sec. 4.4)
  const-njepa) flags="--lr-schedule constant" ;;                  # N-JEPA, lr constant after warmup (Sec. 4.4)
  *) echo "unknown arm $arm" >&2; exit 2 ;;
esac
out=runs/in-$arm$([ "$epochs" = 100 ] || echo "-${epochs}ep")-s$seed
export NJEPA_MIRROR=${NJEPA_MIRROR:-file://$(realpath ../shared/data/imagenette)}
if [ -f "$out/ckpt.pt" ]; then
  exec python train.py --resume --out "$out"
fi
exec python train.py --data imagenette --model vit_tiny --img 64 --patch 8 --batch 64 --lr "$lr" --epochs "$epochs" \
  --seed "$seed" --eval-every 5 --knn-bank 2000 --knn-queries 2000 --keep-every 5,10,15,20,25,30,40,50,60,75,100 \
  $flags --out "$out"
