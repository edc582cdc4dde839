#!/usr/bin/env bash
# The real-weights session on the device machine: rebuild the GGUF files from chunks carried one call at a
# time (only the repository travels, 64 MiB a call; files on a warm machine survive between calls), train the
# EAGLE heads, then run the real end-to-end benchmark. `bash benchmarks/gpu_real_session.sh STEP ARGS`:
#   setup                   gguf wheel (carried in .whl) into /tmp/site, shared-data subset from .carry/data,
#                           and a frozen copy of this tree in /tmp/code: every job below runs from it, so
#                           later calls (whose tree may differ) never change what a running job imports
#   stash DIR               keep the carried chunks of .carry/DIR under /tmp/m/DIR
#   assemble DIR FILE SHA   concatenate /tmp/m/DIR/part* into /tmp/m/FILE and check its sha256
#   train NAME FILE ARGS..  `microspec train-drafter` in the background (setsid: it outlives the call)
#   e2e NAME FILE ARGS..    benchmarks/real_e2e.py run in the background (head: /tmp/m/eagle-NAME if trained
#                           here, else checkpoints/eagle-NAME)
#   bg NAME COMMAND..       any command (from /tmp/code) in the background, log /tmp/m/NAME.log
#   wait SECONDS            until every background job has exited (or SECONDS passed); log tails
#   collect                 trained heads, logs and the jobs' results (/tmp/m/out) into $OUT
# FG=1 runs train, e2e and bg in the foreground of the call instead (log tail printed): a machine stays warm
# only ~30 s after a call, so a job left running between calls is lost with it when the next call is late.
# Background jobs write their results into /tmp/m/out (each call has its own $OUT; `collect` brings them).
# Chunks: `split -b 37000000 FILE .carry/DIR/part` here; .carry/ and .whl/ are git-ignored.
set -uo pipefail
cd "$(dirname "$0")/.."
CODE=/tmp/code RESULTS=/tmp/m/out
export PYTHONPATH="$CODE:/tmp/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 MICROSPEC_SHARED_DATA=/tmp/m/data
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT" "$RESULTS"
step="$1"; shift

background() {   # NAME COMMAND...: run COMMAND from $CODE, detached, logging to /tmp/m/NAME.log
  local name="$1"; shift
  if [ -n "${FG:-}" ]; then
    (cd "$CODE" && bash -c "$*") > "/tmp/m/$name.log" 2>&1; local rc=$?
    grep -v "Convert\|Loading\|UserWarning\|capture_end\|warn\|^$\|softmax\|important use\|split the" \
      "/tmp/m/$name.log" | tail -40; echo "$name exited $rc"; return "$rc"
  fi
  # the job writes its own pid: setsid forks (and its pid exits) when the caller runs with job control
  (cd "$CODE" && setsid nohup bash -c "echo \$\$ > /tmp/m/$name.pid; $*" > "/tmp/m/$name.log" 2>&1 < /dev/null &)
  sleep 1; echo "started $name: $*"
}

case "$step" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    cp -r .carry/data /tmp/m/data
    mkdir -p "$CODE" && tar -c --exclude=./.carry --exclude=./.whl --exclude=./.git . | tar -x -C "$CODE"
    nvidia-smi --query-gpu=name,memory.used --format=csv,noheader ;;
  stash)
    mkdir -p "/tmp/m/$1" && cp ".carry/$1"/part* "/tmp/m/$1/" && ls -la "/tmp/m/$1" ;;
  assemble)
    cat "/tmp/m/$1"/part* > "/tmp/m/$2" && echo "$3  /tmp/m/$2" | sha256sum -c - && rm -r "/tmp/m/$1" ;;
  train)
    name="$1"; file="$2"; shift 2
    background "train-$name" python3 -m microspec train-drafter --model "/tmp/m/$file" \
      --out "/tmp/m/eagle-$name" --state-dir "/tmp/m/state-$name" --no-progress "$@" ;;
  e2e)
    name="$1"; file="$2"; shift 2
    eagle="/tmp/m/eagle-$name"; [ -d "$eagle" ] || eagle="checkpoints/eagle-$name"
    background "e2e-$name-$(date +%H%M%S)" python3 benchmarks/real_e2e.py run --model "/tmp/m/$file" \
      --name "$name" --eagle "$eagle" --out "$RESULTS" "$@" ;;
  bg)
    name="$1"; shift
    background "$name" "$@" ;;
  wait)
    deadline=$((SECONDS + $1))
    alive() { for p in /tmp/m/*.pid; do [ -f "$p" ] && kill -0 "$(cat "$p")" 2>/dev/null && return 0; done; return 1; }
    while alive && [ $SECONDS -lt $deadline ]; do sleep 3; done
    alive && echo "still running" || echo "all done"
    for f in /tmp/m/*.log; do
      echo "== $f"; grep -v "Convert\|Loading\|UserWarning\|capture_end" "$f" | tail -14
    done ;;
  collect)
    for d in /tmp/m/eagle-*; do [ -d "$d" ] && cp -r "$d" "$OUT/"; done
    cp /tmp/m/*.log "$OUT/" 2>/dev/null; cp -r "$RESULTS"/. "$OUT/" 2>/dev/null; ls -R "$OUT" | head -40 ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
