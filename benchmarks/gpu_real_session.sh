#!/usr/bin/env bash
# The real-weights session on the device machine: rebuild the GGUF files from chunks carried one call at a
# time (only the repository travels, 64 MiB a call; files on a warm machine survive between calls), train the
# two EAGLE heads, then run the real end-to-end benchmark. `bash benchmarks/gpu_real_session.sh STEP ARGS`:
#   setup                   gguf wheel (carried in .whl) into /tmp/site, shared-data subset from .carry/data
#   stash DIR               keep the carried chunks of .carry/DIR under /tmp/m/DIR
#   assemble DIR FILE SHA   concatenate /tmp/m/DIR/part* into /tmp/m/FILE and check its sha256
#   train NAME FILE ARGS..  `microspec train-drafter` in the background (setsid: it outlives the call)
#   wait SECONDS            until every training has exited (or SECONDS passed); log tails
#   collect                 trained heads and logs into $OUT (they come back with the call)
#   e2e NAME FILE ARGS..    benchmarks/real_e2e.py run (head: /tmp/m/eagle-NAME if trained here, else
#                           checkpoints/eagle-NAME), JSON + log into $OUT
# Chunks: `split -b 51m FILE .carry/DIR/part` here; .carry/ and .whl/ are git-ignored.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 MICROSPEC_SHARED_DATA=/tmp/m/data
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT" /tmp/m
step="$1"; shift
case "$step" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    cp -r .carry/data /tmp/m/data
    nvidia-smi --query-gpu=name,memory.used --format=csv,noheader ;;
  stash)
    mkdir -p "/tmp/m/$1" && cp ".carry/$1"/part* "/tmp/m/$1/" && ls -la "/tmp/m/$1" ;;
  assemble)
    cat "/tmp/m/$1"/part* > "/tmp/m/$2" && echo "$3  /tmp/m/$2" | sha256sum -c - && rm -r "/tmp/m/$1" ;;
  train)
    name="$1"; file="$2"; shift 2
    setsid nohup python3 -m microspec train-drafter --model "/tmp/m/$file" --out "/tmp/m/eagle-$name" \
      --state-dir "/tmp/m/state-$name" --no-progress "$@" > "/tmp/m/train-$name.log" 2>&1 < /dev/null &
    sleep 2; echo "started $name" ;;
  wait)
    deadline=$((SECONDS + $1))
    while pgrep -f "microspec train-drafter" > /dev/null && [ $SECONDS -lt $deadline ]; do sleep 5; done
    for f in /tmp/m/train-*.log; do echo "== $f"; grep -v "Convert\|Loading" "$f" | tail -12; done ;;
  collect)
    for d in /tmp/m/eagle-*; do [ -d "$d" ] && cp -r "$d" "$OUT/"; done
    cp /tmp/m/train-*.log "$OUT/" 2>/dev/null; ls -R "$OUT" | head -30 ;;
  e2e)   # the head trained in this session, else the committed one
    name="$1"; file="$2"; shift 2
    eagle="/tmp/m/eagle-$name"; [ -d "$eagle" ] || eagle="checkpoints/eagle-$name"
    python3 benchmarks/real_e2e.py run --model "/tmp/m/$file" --name "$name" --eagle "$eagle" \
      --out "$OUT" "$@" 2>&1 | grep -v "Convert\|Loading\|warn" | tee "$OUT/e2e-$name.log" | tail -40 ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
