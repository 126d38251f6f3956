#!/bin/bash
for round in 1 2; do
 for h in 256 512 1024; do
  case $h in 256) s=100;; 512) s=60;; 1024) s=30;; esac
  for t in 1 2; do
    /tmp/omp/run2.sh size_h${h}_t${t}_r$round /work/main -- --max_steps $s --tiny_hidden $h --cpu_threads $t
  done
 done
done
