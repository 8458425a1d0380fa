#!/usr/bin/env bash
# Two runs of the study at once, one per GPU (nvidia-h200-x2), each with its own --set
# values, then both result folders packed into one archive of < 16 MiB pieces under $OUT
# (the device returns at most 8 files and about 60 MB, so only the arm with the higher dense
# accuracy keeps its exported model: run_study.keep_best_export). Usage, from the repository root:
#
#   bash benchmarks/fidelity/two_arms.sh "COMMON SETS" NAME_A "SETS A" NAME_B "SETS B"
#
# Unpack here with: cat arms.tar.part* | tar x   (gives NAME_A/ and NAME_B/)
# PYTHON (default python3), PRESET (default full), SCRATCH (default /tmp) and STAGGER_S
# (default 20) let the CPU test run it with the smoke preset.
set -u -o pipefail
usage='usage: two_arms.sh "COMMON SETS" NAME_A "SETS A" NAME_B "SETS B"'
[ $# -eq 5 ] || { echo "two_arms.sh: expected 5 arguments, got $#; $usage" >&2; exit 2; }
common=$1; name_a=$2; sets_a=$3; name_b=$4; sets_b=$5
for name in "$name_a" "$name_b"; do
  [[ $name =~ ^[A-Za-z0-9_-]+$ ]] || { echo "two_arms.sh: arm name '$name': expected letters, digits, _ or -" >&2; exit 2; }
done
[ "$name_a" != "$name_b" ] || { echo "two_arms.sh: NAME_A and NAME_B are both '$name_a': expected two names" >&2; exit 2; }
out=${OUT:?set OUT}
python=${PYTHON:-python3}
preset=${PRESET:-full}
scratch=${SCRATCH:-/tmp}
arms="$scratch/arms"
run_arm() {  # name, GPU, sets
  rm -rf "${arms:?}/$1" "$scratch/work_$1"  # upstream's trainer would resume from an old checkpoint
  # shellcheck disable=SC2086  # the --set values are split into words on purpose
  CUDA_VISIBLE_DEVICES=$2 "$python" benchmarks/fidelity/run_study.py --preset "$preset" --out "$arms/$1" \
    --work "$scratch/work_$1" --set $common $3 >"$scratch/arms_$1.txt" 2>&1
}
run_arm "$name_a" 0 "$sets_a" &
pid_a=$!
sleep "${STAGGER_S:-20}"  # the two data stages compete for the same cores less
run_arm "$name_b" 1 "$sets_b" &
pid_b=$!
wait $pid_a; rc_a=$?
wait $pid_b; rc_b=$?
"$python" -c 'import sys; sys.path.insert(0, "benchmarks/fidelity"); import run_study
print("kept the exported model of", run_study.keep_best_export(sys.argv[1], sys.argv[2:]))' "$arms" "$name_a" "$name_b"
(cd "$arms" && tar cf - "$name_a" "$name_b" | split -b 15M -d - "$out/arms.tar.part") || {
  echo "two_arms.sh: packing $arms into $out/arms.tar.part* failed" >&2; exit 1; }
for name in "$name_a" "$name_b"; do
  echo "== $name"; grep -E "time budget|done finetune|dense: |ERROR" "$arms/$name/study.log"
done
echo "exit codes: $name_a=$rc_a $name_b=$rc_b"
[ "$rc_a" = 0 ] && [ "$rc_b" = 0 ]
