#!/usr/bin/env bash
# langcell's GPU measurements (issue 20), for a bare GPU machine (no anndata, no ontology package, no
# ../shared, no network), in two parts that each fit one device call of at most 10 minutes:
#
#   inference  cell embeddings of `base` against the release-shaped baseline (HF BertModel eager fp32,
#              batches of 32), ours in fp32 and bf16, and the cell encoder on every attention path
#              (packed, masked, nested, varlen) in fp32, bf16 autocast and bf16 weights; then zero-shot
#              fast and official against the release-shaped loop at K = 8 and K = 100, fp32 and bf16.
#   training   pretraining throughput of `base` (cell and joint stage) against the pad-to-longest fp32
#              loop, with model FLOPs and MFU, the tuning rows (fused AdamW, attention paths, a larger
#              token budget, torch.compile) and the first losses of bf16 against fp32; then
#              `langcell pretrain` itself on the device (base, cell stage, bf16, checkpoint and model saved).
#
#   python benchmarks/gpu_bundle.py              # first, on a CPU machine with the package installed
#   bash benchmarks/gpu_check.sh inference       # then on the GPU machine, with .gpu/ carried along
#   bash benchmarks/gpu_check.sh training        # (a second call; "all" runs both)
#
# Writes machine.txt and one log per step into $OUT (default /tmp/langcell_gpu). A step that fails or runs
# past its time limit is reported and the next one still runs; the exit status is that of the last
# failure. Settings (environment): DEVICE (cuda), BUNDLE (.gpu), ENCODE_CELLS (2236: the 559 cells four
# times), ZERO_SHOT_CELLS (512), PRETRAIN_CELLS (1024), CLI_MAX_STEPS (10), STEP_TIMEOUT (scales every
# step's own limit, in percent; default 100). A CPU smoke run of the whole script: DEVICE=cpu SMOKE=1.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
case "$PART" in inference|training|all) ;; *) echo "usage: $0 inference|training|all" >&2; exit 2;; esac
OUT=${OUT:-/tmp/langcell_gpu}
DEVICE=${DEVICE:-cuda}
BUNDLE=${BUNDLE:-.gpu}
SCALE=${STEP_TIMEOUT:-100}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ ! -f "$BUNDLE/immune/cells.npz" ]; then
    echo "no bundle at $BUNDLE: run 'python benchmarks/gpu_bundle.py' on a machine with langcell installed" >&2
    exit 2
fi
python3 - > "$OUT/machine.txt" 2>&1 <<'EOF'
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__)
try:
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    print("torch.nn.attention.varlen: available")
except ImportError as error:
    print("torch.nn.attention.varlen: missing:", error)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
EOF
command -v nvidia-smi > /dev/null && nvidia-smi >> "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, remember a failure
    local name=$1 limit=$(( $2 * SCALE / 100 ))
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $(( SECONDS - start )) s"
    if [ "$rc" -ne 0 ]; then
        echo "== $name failed (exit $rc; 124 = past ${limit} s)"
        status=$rc
    fi
}

if [ "$SMOKE" = 1 ]; then  # a quick run of every command on a CPU, to catch mistakes before GPU time
    PRESET=small; ENCODE=${ENCODE_CELLS:-16}; ZS=${ZERO_SHOT_CELLS:-4}; ZS_BASE="2 1"
    PRETRAIN=(--size tiny --max-length 128 --cells "${PRETRAIN_CELLS:-16}"); PATHS="packed masked varlen"
else
    PRESET=base; ENCODE=${ENCODE_CELLS:-2236}; ZS=${ZERO_SHOT_CELLS:-512}; ZS_BASE="32 32"
    # The recipe's token budget (65,536 tokens, at most 64 cells: --batch-size 16 caps ours at 4 x 16);
    # the baseline pads batches of 16.
    PRETRAIN=(--size base --cells "${PRETRAIN_CELLS:-1024}" --max-tokens 65536 --batch-size 16)
    PATHS="packed masked nested varlen"
fi

if [ "$PART" != training ]; then
    # shellcheck disable=SC2086  # PATHS is a list of words
    step encode 200 python3 benchmarks/encode.py --device "$DEVICE" --bundle "$BUNDLE" --presets "$PRESET" \
        --cells "$ENCODE" --bf16 --attention $PATHS
    for precision in bf16 fp32; do
        # shellcheck disable=SC2086  # ZS_BASE is two numbers
        step "zero_shot_$precision" 120 python3 benchmarks/zero_shot.py --device "$DEVICE" --bundle "$BUNDLE" \
            --size "$PRESET" --cells "$ZS" --baseline-cells $ZS_BASE --batched --precision "$precision"
    done
fi

if [ "$PART" != inference ]; then
    # Cell stage: the baseline, ours as shipped (bf16 on CUDA), with FLOPs counted, and the tuning rows.
    step pretrain_cell 330 python3 benchmarks/pretrain.py --device "$DEVICE" --bundle "$BUNDLE" "${PRETRAIN[@]}" \
        --stages cell --count-flops --loss-steps 10 --variant precision=fp32 --variant adamw=fused \
        --variant attention=varlen,attention_dropout=0 \
        --variant max_tokens=131072 --variant compile=1
    step pretrain_joint 150 python3 benchmarks/pretrain.py --device "$DEVICE" --bundle "$BUNDLE" "${PRETRAIN[@]}" \
        --stages joint --count-flops --loss-steps 10 --variant precision=fp32
    # The training command itself on the device: base, cell stage, bf16, checkpoint and model saved.
    RECIPE="$BUNDLE/cell_stage_recipe.json"
    if [ "$SMOKE" = 1 ]; then  # base does not fit a small CPU machine's memory: a 2 x 64 cell encoder
        RECIPE=/tmp/langcell_smoke_recipe.json
        python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); c = r["model"]["cell"]
c.update(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)
r["model"]["text"]["encoder_width"] = 64; r["max_tokens"] = 4096
json.dump(r, open(sys.argv[2], "w"))' "$BUNDLE/cell_stage_recipe.json" "$RECIPE"
    fi
    rm -rf /tmp/langcell_cell_stage
    step cli_pretrain 90 python3 -m langcell pretrain --config "$RECIPE" \
        --corpus "$BUNDLE/corpora/immune" --out /tmp/langcell_cell_stage --device "$DEVICE" \
        --max-steps "${CLI_MAX_STEPS:-$([ "$SMOKE" = 1 ] && echo 2 || echo 10)}"
    cp /tmp/langcell_cell_stage/log.csv "$OUT/cli_pretrain_log.csv" 2> /dev/null
fi
exit $status
