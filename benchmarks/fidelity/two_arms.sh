#!/usr/bin/env bash
# Two runs of the study at once, one per GPU (nvidia-h200-x2), each with its own --set
# values, then both result folders packed into one archive of < 16 MiB pieces under $OUT
# (the device returns at most 8 files and about 60 MB, so only the arm with the higher dense
# accuracy keeps its exported model). Usage, from the repository root:
#
#   bash benchmarks/fidelity/two_arms.sh "COMMON SETS" NAME_A "SETS A" NAME_B "SETS B"
#
# Unpack here with: cat arms.tar.part* | tar x   (gives NAME_A/ and NAME_B/)
# PRESET (default full) and SCRATCH (default /tmp) let the CPU test run it with the smoke preset.
set -u
common=$1; name_a=$2; sets_a=$3; name_b=$4; sets_b=$5
out=${OUT:?set OUT}
preset=${PRESET:-full}
scratch=${SCRATCH:-/tmp}
arms="$scratch/arms"
run_arm() {  # name, GPU, sets
  # shellcheck disable=SC2086  # the --set values are split into words on purpose
  CUDA_VISIBLE_DEVICES=$2 python3 benchmarks/fidelity/run_study.py --preset "$preset" --out "$arms/$1" \
    --work "$scratch/work_$1" --set $common $3 >"$scratch/arms_$1.txt" 2>&1
}
run_arm "$name_a" 0 "$sets_a" &
pid_a=$!
sleep "${STAGGER_S:-20}"  # the two data stages compete for the same cores less
run_arm "$name_b" 1 "$sets_b" &
pid_b=$!
wait $pid_a; rc_a=$?
wait $pid_b; rc_b=$?
python3 - "$arms" "$name_a" "$name_b" <<'PY'
import json, os, sys
arms, names = sys.argv[1], sys.argv[2:]
def dense(name):
    try:
        with open(os.path.join(arms, name, "results.json")) as handle:
            return json.load(handle)["results"]["dense"]["accuracy"]
    except (OSError, KeyError, ValueError):
        return -1.0
best = max(names, key=dense)
for name in names:
    if name != best and os.path.isdir(os.path.join(arms, name)):
        for part in os.listdir(os.path.join(arms, name)):
            if part.startswith("dense.tar.part"):
                os.remove(os.path.join(arms, name, part))
print("kept the exported model of", best)
PY
(cd "$arms" && tar cf - "$name_a" "$name_b" | split -b 15M -d - "$out/arms.tar.part")
for name in "$name_a" "$name_b"; do
  echo "== $name"; grep -E "time budget|done finetune|dense: |ERROR" "$arms/$name/study.log"
done
echo "exit codes: $name_a=$rc_a $name_b=$rc_b"
[ "$rc_a" = 0 ] && [ "$rc_b" = 0 ]
