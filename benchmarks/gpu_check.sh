#!/usr/bin/env bash
# langcell's GPU measurements in one command, for a bare GPU machine (no anndata, no ontology package,
# no ../shared, no network): cell-encoder throughput of small and base against the release-shaped
# baseline (fp32, bf16 autocast, packed vs masked cell encoder), then pretraining throughput of base
# (cell and joint stage, the pad-to-longest loop against langcell's token-budget stream in bf16), then
# `langcell pretrain` itself on the device (base, cell stage, bf16, 30 steps).
#
#   python benchmarks/gpu_bundle.py              # first, on a CPU machine with the package installed
#   bash benchmarks/gpu_check.sh                 # then on the GPU machine, with .gpu/ carried along
#
# Writes machine.txt, encode.log, pretrain.log, cli_pretrain.log and cli_pretrain_log.csv into $OUT
# (default /tmp/langcell_gpu). A step that fails or runs past its time limit is reported and the next
# one still runs; the exit status is that of the last failure. Settings (environment): DEVICE (cuda), BUNDLE (.gpu), ENCODE_CELLS (5590: the 559
# cells ten times), ENCODE_PRESETS ("small base"), PRETRAIN_SIZE (base), PRETRAIN_CELLS (1024),
# CLI_MAX_STEPS (the recipe's 30), STEP_TIMEOUT (240 s per step).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/langcell_gpu}
DEVICE=${DEVICE:-cuda}
BUNDLE=${BUNDLE:-.gpu}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ ! -f "$BUNDLE/immune/cells.npz" ]; then
    echo "no bundle at $BUNDLE: run 'python benchmarks/gpu_bundle.py' on a machine with langcell installed" >&2
    exit 2
fi
python3 - > "$OUT/machine.txt" 2>&1 <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
EOF
command -v nvidia-smi > /dev/null && nvidia-smi >> "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

status=0
step() {  # step NAME COMMAND...: run with a time limit, keep its output, remember a failure
    local name=$1
    shift
    echo "== $name: $*"
    timeout "$STEP_TIMEOUT" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "== $name failed (exit $rc; 124 = past ${STEP_TIMEOUT} s)"
        status=$rc
    fi
}
# shellcheck disable=SC2086  # ENCODE_PRESETS is a list of words
step encode python3 benchmarks/encode.py --device "$DEVICE" --bf16 --pack --bundle "$BUNDLE" \
    --cells "${ENCODE_CELLS:-5590}" --presets ${ENCODE_PRESETS:-small base}
step pretrain python3 benchmarks/pretrain.py --device "$DEVICE" --bundle "$BUNDLE" \
    --size "${PRETRAIN_SIZE:-base}" --cells "${PRETRAIN_CELLS:-1024}"
# The training command itself on the device: base, cell stage, bf16, 30 steps, checkpoint and model saved.
rm -rf /tmp/langcell_cell_stage
step cli_pretrain python3 -m langcell pretrain --config "$BUNDLE/cell_stage_recipe.json" \
    --corpus "$BUNDLE/corpora/immune" --out /tmp/langcell_cell_stage --device "$DEVICE" \
    ${CLI_MAX_STEPS:+--max-steps "$CLI_MAX_STEPS"}
cp /tmp/langcell_cell_stage/log.csv "$OUT/cli_pretrain_log.csv" 2> /dev/null
exit $status
