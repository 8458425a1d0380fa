#!/usr/bin/env bash
# Two runs of the study at once, one per GPU (nvidia-h200-x2), each with its own --set
# values, then both result folders packed into one archive of < 16 MiB pieces under $OUT
# (the device returns at most 8 files and about 60 MB, so only the arm with the higher dense
# accuracy keeps its exported model). Usage, from the repository root:
#
#   bash benchmarks/fidelity/two_arms.sh "COMMON SETS" NAME_A "SETS A" NAME_B "SETS B"
#
# Unpack here with: cat arms.tar.part* | tar x   (gives NAME_A/ and NAME_B/)
set -u
common=$1; name_a=$2; sets_a=$3; name_b=$4; sets_b=$5
out=${OUT:?set OUT}
# shellcheck disable=SC2086  # the --set values are split into words on purpose
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/fidelity/run_study.py --preset full --out "/tmp/arms/$name_a" \
  --work "/tmp/work_$name_a" --set $common $sets_a >"/tmp/arms_$name_a.txt" 2>&1 &
pid_a=$!
sleep 20  # the two data stages compete for the same cores less
# shellcheck disable=SC2086
CUDA_VISIBLE_DEVICES=1 python3 benchmarks/fidelity/run_study.py --preset full --out "/tmp/arms/$name_b" \
  --work "/tmp/work_$name_b" --set $common $sets_b >"/tmp/arms_$name_b.txt" 2>&1 &
pid_b=$!
wait $pid_a; rc_a=$?
wait $pid_b; rc_b=$?
python3 - "$name_a" "$name_b" <<'PY'
import json, os, sys
def dense(name):
    try:
        with open(f"/tmp/arms/{name}/results.json") as handle:
            return json.load(handle)["results"]["dense"]["accuracy"]
    except (OSError, KeyError, ValueError):
        return -1.0
loser = min(sys.argv[1:], key=dense)
for part in os.listdir(f"/tmp/arms/{loser}"):
    if part.startswith("dense.tar.part"):
        os.remove(f"/tmp/arms/{loser}/{part}")
print("kept the exported model of", max(sys.argv[1:], key=dense))
PY
(cd /tmp/arms && tar cf - "$name_a" "$name_b" | split -b 15M -d - "$out/arms.tar.part")
for name in "$name_a" "$name_b"; do
  echo "== $name"; grep -E "time budget|done finetune|dense: |ERROR" "/tmp/arms/$name/study.log"
done
echo "exit codes: $name_a=$rc_a $name_b=$rc_b"
