#!/bin/bash
# usage: run2.sh LABEL ROOT [ENV=VAL ...] -- extra train args
. /work/main/.venv/bin/activate
label=$1; root=$2; shift 2
envs=()
while [ "$1" != "--" ] && [ -n "$1" ]; do envs+=("$1"); shift; done; shift
cd $root
rm -rf /tmp/omp/out_$label
env PYTHONPATH=$root "${envs[@]}" /usr/bin/time -f "%e wall %U user %S sys %w vcs" python train.py --output_dir /tmp/omp/out_$label --stage sft --max_steps 300 --eval none --no_eval_untrained "$@" > /tmp/omp/$label.log 2>&1
python - /tmp/omp/out_$label/metrics.jsonl $label "$(tail -1 /tmp/omp/$label.log)" "$(uptime | sed 's/.*average: //')" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][5:]
print(sys.argv[2], "median tok/s", round(statistics.median(tps)), "n", len(tps), "|", sys.argv[3], "| load", sys.argv[4], flush=True)
PY
