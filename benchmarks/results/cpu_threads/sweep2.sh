#!/bin/bash
. /work/main/.venv/bin/activate
STEPS=${STEPS:-150}
for round in 1 2; do
 for comp in no yes; do
  for v in passive t1 spin default before; do
    rival=
    if [ $comp = yes ]; then python -c $'import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n' & rival=$!; sleep 2; fi
    label=s2_${v}_${comp}_r$round
    case $v in
      passive) /tmp/omp/run2.sh $label /work/main -- --max_steps $STEPS;;
      t1) /tmp/omp/run2.sh $label /work/main OMP_NUM_THREADS=1 -- --max_steps $STEPS;;
      spin) /tmp/omp/run2.sh $label /work/main GOMP_SPINCOUNT=3000 -- --max_steps $STEPS;;
      default) /tmp/omp/run2.sh $label /work/main GOMP_SPINCOUNT=300000 -- --max_steps $STEPS;;
      before) /tmp/omp/run2.sh $label /work/wt_before -- --max_steps $STEPS;;
    esac
    [ -n "$rival" ] && kill $rival && wait $rival 2>/dev/null
  done
 done
done
