#!/usr/bin/env bash
# Issue 9's figures on one GPU, in one go, most important first:
#
#     OUT=results bash benchmarks/gpu_suite.sh [PART ...]
#
# Generates 4096 ImageNet-like JPEGs into WebDataset shards once, then runs benchmarks/throughput.py for each
# part named (all by default, in the order below). JSON lines go to stdout and $OUT/results.jsonl, everything
# else to $OUT/log.txt, the kernel tables of our step to $OUT/profiles.tar.gz (PART/ours-*.txt): three files
# to copy back from a remote machine. SUITE_SECONDS (default 540) bounds the whole suite: a part that would
# start with less than a minute left is skipped and says so.
#
# The comparisons with timm and HF train ViT-B/16 and L/16 without dropout, as the references do (b16-dropout: the
# recipe's 0.1).
set -u
OUT=${OUT:-gpu-suite}
PY=${PYTHON:-python3}
BENCH=/tmp/gpu-suite
mkdir -p "$OUT" "$BENCH"
deadline=$((SECONDS + ${SUITE_SECONDS:-540}))
parts=${*:-b16 h14 deepspeed fp32-residual b16-device decode float8 loss b16-dropout l16}

bench() {  # name, then the script and its arguments
    local name=$1 left=$((deadline - SECONDS))
    shift
    if ((left < 60)); then
        echo "{\"run\": \"skipped\", \"part\": \"$name\", \"seconds_left\": $left}" | tee -a "$OUT/results.jsonl"
        return
    fi
    echo "== $name: $*" >>"$OUT/log.txt"
    timeout "$left" "$PY" -u "$@" 2>>"$OUT/log.txt" | tee -a "$OUT/results.jsonl"
    echo "== $name: exit ${PIPESTATUS[0]} after $SECONDS s" | tee -a "$OUT/log.txt"
}

if [ ! -f "$BENCH/shards/manifest.json" ]; then
    rm -rf "$BENCH/shards" "$BENCH/images"
    "$PY" -c "import pathlib, sys; sys.path.insert(0, 'benchmarks'); import throughput
throughput.make_shards(pathlib.Path('$BENCH'), 4096, 14)" >>"$OUT/log.txt" 2>&1 || { echo "making the shards failed: see $OUT/log.txt"; exit 1; }
fi
T="benchmarks/throughput.py --shards $BENCH/shards --steps 40 --warmup 8"
B16="recipes/vit_b16_i21k.yaml data.batch_size=256"
H14="recipes/vit_h14_jft.yaml data.batch_size=64"
for part in $parts; do
    case $part in
        b16) bench b16 $T $B16 model.dropout=0 data.workers=14 --compare timm timm-compiled hf --profile "$BENCH/profiles/b16" ;;
        h14) bench h14 $T $H14 --data synthetic --compare timm --profile "$BENCH/profiles/h14" ;;
        deepspeed) bench deepspeed $T $B16 model.dropout=0 data.workers=14 backend=deepspeed deepspeed.zero_stage=1 --compare \
            --profile "$BENCH/profiles/deepspeed" ;;
        fp32-residual) bench fp32-residual $T $B16 model.dropout=0 model.bf16_residual=false data.workers=14 --compare ;;
        b16-device) bench b16-device $T $B16 model.dropout=0 data.decode=device data.workers=8 --data shards --compare \
            --profile "$BENCH/profiles/b16-device" ;;
        decode) bench decode benchmarks/decode_throughput.py --images 1024 ;;
        float8) bench float8 $T $H14 precision=float8 --data synthetic --compare --loss-check 200 \
            --profile "$BENCH/profiles/float8" ;;
        loss) bench loss $T $B16 data.workers=14 --data synthetic --compare --loss-check 200 ;;
        b16-dropout) bench b16-dropout $T $B16 data.workers=14 --data synthetic --compare ;;
        l16) bench l16 $T recipes/vit_l16_i21k.yaml data.batch_size=128 model.dropout=0 --data synthetic --compare timm ;;
        *) echo "unknown part $part (b16 h14 deepspeed fp32-residual b16-device decode float8 loss b16-dropout l16)"; exit 2 ;;
    esac
done
if [ -d "$BENCH/profiles" ]; then
    tar czf "$OUT/profiles.tar.gz" -C "$BENCH/profiles" .
fi
