#!/usr/bin/env bash
# GPU check for a CUDA machine without network: install what is missing from ./wheels-gpu, run the
# `gpu`-marked tests and the kernel benchmarks, write JSON + markdown into OUT_DIR. Under 6 minutes:
# every step has its own timeout, so the script always finishes and reports what it got.
#
#   benchmarks/gpu_check.sh OUT_DIR [kernels|step|realistic|all]
#
# kernels (default, < 7 min): gpu tests + log-prob and attention benchmarks; step (< 5 min): the
# end-to-end step sweep of bench_step.py --preset gpu; realistic (about 8 min on an H200): the cells
# of issue 16's goals, each a bench_step.py run with its own timeout and result files (32 groups per
# optimizer step, every method at its largest micro-batch): Llama-3.2-1B LoRA P=1024 K=15; the
# paper's shape on Llama-2-7B LoRA, K = 1, 3, 15; the same 1B cell with full fine-tuning and a live
# reference; a one-group 1B LoRA step with and without CUDA graphs; the trainer against the benchmark's
# step (bench_trainer.py) at the 1B LoRA cell and, with CUDA graphs, at one group; then, with what is
# left, bench_lora_linear.py (fused LoRA layers against peft's) and bench_optim.py (--weight_update's
# memory and time, 1B shapes); all: kernels + step.
# DRY_RUN=1 runs every realistic cell on the CPU with tiny configs (checks the script, not the GPU).
#
# Wheels: copy /work/shared/wheels-gpu to ./wheels-gpu (git-ignored) before sending the tree over, plus
# a setuptools>=77 wheel (used only where the machine's setuptools is older).
# The device tool brings back at most 8 files: write OUT_DIR outside $OUT and tar it into $OUT.
#
# Narrower runs (environment): PYTEST_ARGS (default "tests"), LOGPROB_METHODS (bench_logprob --methods),
# STEP_ARGS (extra bench_step arguments, e.g. "--modes lora --prompt-lens 1024"), STEP_TIMEOUT_S,
# SKIP_STEPS (space-separated step names, e.g. "bench_logprob_compile bench_attention").
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [kernels|step|all]}
PARTS=${2:-kernels}
case "$PARTS" in kernels|step|realistic|all) ;; *) echo "unknown part $PARTS (kernels|step|realistic|all)" >&2; exit 2;; esac
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${SDPO_SITE:-/tmp/sdpo_site}
STATUS="$OUT/steps.tsv"
: > "$STATUS"
start=$(date +%s)

case "$PARTS" in kernels) default_budget=400;; step) default_budget=290;; realistic) default_budget=500;; all) default_budget=580;; esac
BUDGET_S=${GPU_CHECK_BUDGET_S:-$default_budget}  # whole script; each step's timeout is cut to what is left

step() {  # step NAME TIMEOUT_S CMD...: run, log to OUT/NAME.log, record exit code and seconds
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    local left=$(( BUDGET_S - (t0 - start) ))
    case " ${SKIP_STEPS:-} " in *" $name "*)
        printf '%s\tskipped (SKIP_STEPS)\t0\n' "$name" >> "$STATUS"
        return 0 ;;
    esac
    if [ "$left" -lt 15 ]; then
        printf '%s\tskipped (budget)\t0\n' "$name" >> "$STATUS"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STATUS"
    tail -n 5 "$OUT/$name.log"
    return 0
}

# 1. Missing packages from the local wheels (never touching the machine's torch/triton).
missing=()
if [ -d wheels-gpu ]; then
    for whl in wheels-gpu/*.whl; do
        mod=$(basename "$whl" | cut -d- -f1)
        "$PY" -c "import $mod" 2>/dev/null || missing+=("$whl")
    done
    # pyproject's SPDX license string needs setuptools >= 77 to build the editable install
    for whl in wheels-gpu/setuptools-*.whl; do
        [ -e "$whl" ] || continue
        "$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" || missing+=("$whl")
    done
fi
if [ ${#missing[@]} -gt 0 ]; then
    step install_wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${missing[@]}"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$SITE"

# 2. The package itself, installed (editable) so that the scripts under benchmarks/ import it from any
# directory; checked from / because the repository root's sdpo_fast/ imports from here without one.
# The native extension is the CPU path: without this its first import compiles it (about a minute of
# device time, seen on the H200 run of 2026-11-27).
export SDPO_FAST_NO_EXT=1
if [ "${DRY_RUN:-0}" != 1 ] && ! (cd / && "$PY" -c "import sdpo_fast.kernels.logprobs.triton") 2>/dev/null; then
    step install_sdpo_fast 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
"$PY" - > "$OUT/env.json" <<'EOF'
import json, torch, triton, sdpo_fast
from sdpo_fast import backends
print(json.dumps(dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
                      torch=torch.__version__, triton=triton.__version__,
                      logprobs_backends=backends.available("logprobs"),
                      attention_backends=backends.available("attention")), indent=1))
EOF
cat "$OUT/env.json"

if [ "$PARTS" = kernels ] || [ "$PARTS" = all ]; then
    # 3. gpu-marked tests (all test files; CPU-only tests are deselected).
    # shellcheck disable=SC2086
    step pytest_gpu 150 "$PY" -m pytest -q -m gpu ${PYTEST_ARGS:-tests} -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml"

    # 4. Kernel benchmarks: one line per kernel family, each writes its JSON + markdown into $OUT.
    step bench_logprob 105 "$PY" benchmarks/bench_logprob.py --out "$OUT" --rep-ms 30 \
        --methods "${LOGPROB_METHODS:-cublas,cublas_loss,cublas_loss_1g,triton,triton_loss,triton_loss_recompute,torch,torch_loss,eager,liger,cce}"
    step bench_logprob_compile 30 "$PY" benchmarks/bench_logprob.py --out "$OUT" --rep-ms 30 \
        --shapes 16384x4096x128256 --methods compile_chunked --tag compile
    step bench_attention 100 "$PY" benchmarks/bench_attention.py --out "$OUT" --prompts 2048 --ks 3 15 63
fi
if [ "$PARTS" = realistic ]; then
    # One bench_step run per goal cell; each writes OUT/<name>.json + .md, partial rows survive a cut.
    if [ "${DRY_RUN:-0}" = 1 ]; then
        TINY="--device cpu --layers 1 --hidden 32 --intermediate 64 --heads 4 --kv-heads 2 --vocab 257 --dtype float32 --threads 1"
        B1=tiny-1b; B7=tiny-7b; GPS=2; P=7x3; G=""; M=3  # a shared 2-core CPU: three times the time limits
        BUDGET_S=$(( BUDGET_S * M ))
    else
        TINY=""; B1=llama3.2-1b; B7=llama2-7b; GPS=32; P=1024x16; G="--cuda-graphs"; M=1
    fi
    common="--preset gpu --methods a c --repeats 3 --warmup 1 --no-plot --out $OUT $TINY ${STEP_ARGS:-}"
    if [ "${DRY_RUN:-0}" != 1 ]; then
        # first: a captured graph replays another layout of its bucket exactly (tests/test_graphs.py)
        step pytest_graphs 120 "$PY" -m pytest -q -m gpu tests/test_graphs.py -p no:cacheprovider \
            --junitxml="$OUT/pytest_graphs.xml"
    fi
    # the cheap one-group cells first (with and without graphs), so that a cut budget keeps them
    # shellcheck disable=SC2086
    step step_1b_lora_1group $(( 40 * M )) "$PY" benchmarks/bench_step.py $common --name step_1b_lora_1group \
        --runs $B1:lora --shapes $P --ks 15 --groups-per-step 1 --refs precomputed --methods c
    if [ -n "$G" ]; then
        # shellcheck disable=SC2086
        step step_1b_lora_1group_graphs $(( 40 * M )) "$PY" benchmarks/bench_step.py $common --name step_1b_lora_1group_graphs \
            --runs $B1:lora --shapes $P --ks 15 --groups-per-step 1 --refs precomputed --methods c $G
    fi
    # shellcheck disable=SC2086
    step step_1b_lora_p1024 $(( 150 * M )) "$PY" benchmarks/bench_step.py $common --name step_1b_lora_p1024 \
        --runs $B1:lora --shapes $P --ks 15 --groups-per-step $GPS --refs precomputed
    # shellcheck disable=SC2086
    step step_7b_lora_paper $(( 170 * M )) "$PY" benchmarks/bench_step.py $common --name step_7b_lora_paper \
        --runs $B7:lora --shapes paper --ks 1 3 15 --groups-per-step $GPS --refs precomputed
    # The trainer (run_stage, new data every step) against the benchmark's (c) step at one shape.
    tcommon="--steps 5 --warmup 2 --rounds 2 --out $OUT $TINY"
    # shellcheck disable=SC2086
    step trainer_1b_lora_p1024 $(( 45 * M )) "$PY" benchmarks/bench_trainer.py $tcommon --name trainer_1b_lora_p1024 \
        --run $B1:lora --shape $P --k 15 --groups 8
    if [ -n "$G" ]; then
        # shellcheck disable=SC2086
        step trainer_1b_lora_1group_graphs $(( 40 * M )) "$PY" benchmarks/bench_trainer.py $tcommon \
            --name trainer_1b_lora_1group_graphs --run $B1:lora --shape $P --k 15 --groups 1 --cuda-graphs
    fi
    # shellcheck disable=SC2086
    step step_1b_full_live $(( 80 * M )) "$PY" benchmarks/bench_step.py $common --name step_1b_full_live \
        --runs $B1:full --shapes $P --ks 15 --groups-per-step $GPS --refs live
    if [ "${DRY_RUN:-0}" != 1 ]; then
        # last, with what is left: the trainer's own gpu tests (graphed vs eager train.py runs, resume on CUDA)
        step pytest_trainer 90 "$PY" -m pytest -q -m gpu tests/test_train_graphs.py -p no:cacheprovider \
            --junitxml="$OUT/pytest_trainer.xml"
    fi
    # then, if time is left: LoRA projections fused against peft's layers (ops and step time), 1B widths
    if [ "${DRY_RUN:-0}" = 1 ]; then LL="--device cpu --cells 32x1 --layers 2 --rounds 2 --steps 1"; else LL="--cells 2048x1 2048x8 --rounds 4"; fi
    # shellcheck disable=SC2086
    step bench_lora_linear $(( 60 * M )) "$PY" benchmarks/bench_lora_linear.py $LL --out "$OUT" --name bench_lora_linear
    # then, if time is left: --weight_update's memory and step time (fp32 masters, stochastic rounding,
    # bf16 AdamW) over Llama-3.2-1B's parameter shapes
    if [ "${DRY_RUN:-0}" = 1 ]; then OPT="--device cpu --shapes tiny"; else OPT="--device cuda --shapes llama-1b"; fi
    # shellcheck disable=SC2086
    step bench_optim $(( 45 * M )) "$PY" benchmarks/bench_optim.py $OPT --rounds 1 --steps 4 --out "$OUT/bench_optim"
fi
if [ "$PARTS" = step ] || [ "$PARTS" = all ]; then
    # shellcheck disable=SC2086
    step bench_step "${STEP_TIMEOUT_S:-240}" "$PY" benchmarks/bench_step.py --preset gpu --out "$OUT" ${STEP_ARGS:-}  # partial rows survive a cut
fi

# 5. Summary.
{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - start )) s"
    echo
    echo '```'; cat "$OUT/env.json"; echo '```'
    echo
    echo "| step | exit | seconds |"; echo "|---|---|---|"
    awk -F'\t' '{printf "| %s | %s | %s |\n", $1, $2, $3}' "$STATUS"
    echo
    tail -n 3 "$OUT/pytest_gpu.log" 2>/dev/null
    for md in "$OUT"/*.md; do
        case "$md" in */summary.md) continue ;; esac
        echo; cat "$md"
    done
} > "$OUT/summary.md"
"$PY" - "$STATUS" "$OUT/summary.json" <<'EOF'
import json, sys
steps = [dict(zip(("step", "exit", "seconds"), l.rstrip("\n").split("\t"))) for l in open(sys.argv[1]) if l.strip()]
json.dump(dict(steps=steps), open(sys.argv[2], "w"), indent=1)
EOF
cat "$OUT/summary.md" | tail -n 60
