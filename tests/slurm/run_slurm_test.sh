#!/usr/bin/env bash
# run_slurm_test.sh: the Slurm job scripts in slurm/, run on a real one-node
# Slurm cluster on localhost (slurmctld + slurmd + munged, all started here from
# a configuration in a temporary directory, all stopped again by their PIDs).
#
#   run_slurm_test.sh [--hexamoe PATH] [--source-dir DIR] [--keep]
#
#   1. installs slurm-wlm and munge from Debian when they are missing (apt-get);
#   2. job "reference": hexamoe-cpu.sbatch, 2 tasks, inputs/quick.toml, run to
#      the end: exit code 0, summary.json written, the loss fell;
#   3. job "preempted": the same run; after a few steps the batch shell gets
#      USR1 (scancel --batch --signal=USR1, what --signal=B:USR1@120 sends);
#      hexamoe must checkpoint and stop, the script requeue the job, the rerun
#      resume from the checkpoint and finish, and every step's loss in its
#      metrics.jsonl equal the reference's;
#   4. job "gpu-script": hexamoe-gpu.sbatch on a node with 2 (fake) GPUs
#      declared to Slurm, one per task: it runs to the end.
# Every wait is bounded. Anything that stops the test from running (not root,
# no apt, no hexamoe train) is a failure with a message, never a skip.
# The sbatch/squeue/scontrol transcript is printed as it goes.
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

here="$(cd "$(dirname "$0")" && pwd)"
source_dir="$(cd "$here/../.." && pwd)"
hexamoe=""
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
  --hexamoe) hexamoe="$2"; shift 2 ;;
  --source-dir) source_dir="$2"; shift 2 ;;
  --keep) keep=1; shift ;;
  *) echo "usage: run_slurm_test.sh [--hexamoe PATH] [--source-dir DIR] [--keep]" >&2; exit 2 ;;
  esac
done
if [ -z "$hexamoe" ]; then
  for c in "$source_dir/build/app/hexamoe" "$(command -v hexamoe 2>/dev/null)"; do
    if [ -n "$c" ] && [ -x "$c" ]; then hexamoe="$c"; break; fi
  done
fi

T=""
pids=()       # daemons started here, in start order
jobs_seen=()  # job ids submitted here
t0=$(date +%s)

say() { echo "[slurm-test +$(($(date +%s) - t0))s] $*"; }
# Print a command like a terminal transcript, run it, print its output.
show() {
  echo "\$ $*"
  "$@" 2>&1
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$T" ] && [ -f "$T/slurm.conf" ] && [ ${#pids[@]} -gt 0 ]; then
    export SLURM_CONF="$T/slurm.conf"
    for j in "${jobs_seen[@]}"; do scancel "$j" >/dev/null 2>&1; done
    # Let the jobs' slurmstepd processes finish before slurmd goes.
    local i
    for ((i = 0; i < 60; i++)); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  # Stop the daemons by the PIDs started here, newest first.
  local k p
  for ((k = ${#pids[@]} - 1; k >= 0; k--)); do
    p="${pids[$k]}"
    kill -TERM "$p" 2>/dev/null || continue
    for ((i = 0; i < 50; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  if [ -n "$T" ] && [ -d "$T" ]; then
    if [ "$keep" -eq 1 ]; then
      say "kept $T (daemons stopped)"
    else
      rm -rf "$T"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

dump_logs() {
  [ -n "$T" ] || return 0
  local f
  for f in "$T"/jobs/*.out "$T"/log/slurmctld.log "$T"/log/slurmd.log "$T"/munge/private/munged.log; do
    [ -f "$f" ] || continue
    echo "----- $f (last 40 lines)"
    tail -n 40 "$f"
  done
}
fail() {
  echo "FAIL: $*" >&2
  dump_logs >&2
  echo "0 passed, 1 failed"
  exit 1
}

# --- preconditions -----------------------------------------------------------
[ "$(id -u)" -eq 0 ] || fail "the Slurm test must run as root (it installs slurm-wlm and munge and starts slurmctld, slurmd and munged); run it as root, or leave it out with ctest -LE slurm"
[ -n "$hexamoe" ] && [ -x "$hexamoe" ] || fail "no hexamoe binary (give --hexamoe PATH)"
hexamoe="$(cd "$(dirname "$hexamoe")" && pwd)/$(basename "$hexamoe")"
timeout 60 "$hexamoe" train --help >/dev/null 2>&1 || fail "$hexamoe has no working 'train' command"
for f in slurm/hexamoe-cpu.sbatch slurm/hexamoe-gpu.sbatch inputs/quick.toml; do
  [ -f "$source_dir/$f" ] || fail "$source_dir/$f is missing"
done

# The job scripts refuse what would break their restart logic (no Slurm needed).
for script in hexamoe-cpu.sbatch hexamoe-gpu.sbatch; do
  for bad in "--set run.output_dir=elsewhere" "--restart latest"; do
    # shellcheck disable=SC2086 # split on purpose
    msg="$(env -u SLURM_JOB_ID bash "$source_dir/slurm/$script" deck.toml $bad 2>&1)"
    rc=$?
    [ "$rc" -eq 2 ] && [[ "$msg" == *"do not"* ]] || fail "$script accepted '$bad' (exit $rc: $msg)"
  done
  msg="$(env -u SLURM_JOB_ID bash "$source_dir/slurm/$script" 2>&1)"
  [ $? -eq 2 ] && [[ "$msg" == usage:* ]] || fail "$script without a deck: $msg"
done

missing=0
for b in slurmctld slurmd sbatch squeue scontrol scancel munged setpriv; do
  command -v "$b" >/dev/null 2>&1 || missing=1
done
if [ "$missing" -eq 1 ]; then
  say "installing slurm-wlm and munge from Debian"
  command -v apt-get >/dev/null || fail "slurm-wlm/munge are missing and there is no apt-get to install them"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq >/dev/null || fail "apt-get update failed"
  timeout 900 apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null ||
    fail "apt-get install slurm-wlm munge failed"
fi
for b in slurmctld slurmd sbatch squeue scontrol scancel munged setpriv; do
  command -v "$b" >/dev/null 2>&1 || fail "$b not found after installing slurm-wlm and munge"
done
id munge >/dev/null 2>&1 || fail "no munge user (the munge package creates it)"
say "$(slurmctld -V), $(munged -V 2>&1 | head -1)"

# --- a private munge -----------------------------------------------------------
T="$(mktemp -d "${TMPDIR:-/tmp}/hexamoe-slurm.XXXXXX")" || fail "mktemp failed"
chmod 755 "$T"
mkdir -p "$T/munge/private" "$T/state" "$T/spool" "$T/log" "$T/tmp" "$T/jobs" "$T/runs"
chmod 755 "$T/munge"
chmod 700 "$T/munge/private"
# Our own key and socket: nothing of a system munge is used or touched.
dd if=/dev/urandom of="$T/munge/private/munge.key" bs=1024 count=1 status=none
chmod 600 "$T/munge/private/munge.key"
chown -R munge:munge "$T/munge"
sock="$T/munge/munge.socket"
setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground --socket="$sock" \
  --key-file="$T/munge/private/munge.key" --log-file="$T/munge/private/munged.log" \
  --pid-file="$T/munge/private/munged.pid" --seed-file="$T/munge/private/munged.seed" \
  >"$T/log/munged.out" 2>&1 &
pids+=($!)
for ((i = 0; i < 50; i++)); do [ -S "$sock" ] && break; sleep 0.2; done
[ -S "$sock" ] || fail "munged did not start: $(cat "$T/log/munged.out")"
munge -S "$sock" -n | unmunge -S "$sock" >/dev/null || fail "munge credential round trip failed"

# --- a one-node Slurm ----------------------------------------------------------
free_port() {
  local p
  for p in $(shuf -i 20000-60000 -n 50); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
  done
  return 1
}
ctld_port="$(free_port)" || fail "no free TCP port"
slurmd_port="$(free_port)" || fail "no free TCP port"
[ "$ctld_port" != "$slurmd_port" ] || slurmd_port=$((ctld_port + 1))
cpus="$(nproc)"
[ "$cpus" -ge 2 ] || cpus=2
mem="$(free -m | awk '/^Mem:/ {print $2}')"
cat >"$T/slurm.conf" <<EOF
# A one-node cluster on localhost for hexamoe's Slurm test (no cgroups, no accounting).
ClusterName=hexamoetest
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$sock
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=pmix
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$T/log/jobcomp.txt
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
TmpFS=$T/tmp
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/log/slurmctld.log
SlurmdLogFile=$T/log/slurmd.log
SlurmdParameters=config_overrides
MailProg=/bin/true
MinJobAge=3600
ReturnToService=2
SchedulerParameters=sched_min_interval=100000
GresTypes=gpu
NodeName=localhost CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
# Two GPUs that are not there: enough for Slurm to hand one to each task.
printf 'NodeName=localhost Name=gpu File=/dev/null\nNodeName=localhost Name=gpu File=/dev/zero\n' >"$T/gres.conf"
export SLURM_CONF="$T/slurm.conf"

/usr/sbin/slurmctld -D -f "$SLURM_CONF" >"$T/log/slurmctld.out" 2>&1 &
pids+=($!)
/usr/sbin/slurmd -D -N localhost -f "$SLURM_CONF" >"$T/log/slurmd.out" 2>&1 &
pids+=($!)
state=""
for ((i = 0; i < 60; i++)); do
  state="$(sinfo -h -n localhost -o %t 2>/dev/null)"
  [ "$state" = idle ] && break
  sleep 0.5
done
[ "$state" = idle ] || fail "the node did not become idle (state '$state')"
say "one-node cluster up (slurmctld pid ${pids[1]}, slurmd pid ${pids[2]}, munged pid ${pids[0]})"
show sinfo

# --- helpers -----------------------------------------------------------------
# submit ARGS...: sbatch --parsable ARGS, transcript printed; the job id in $jid.
jid=""
submit() {
  echo "\$ sbatch --parsable $*"
  local out
  out="$(sbatch --parsable "$@" 2>&1)"
  echo "$out"
  jid="$(echo "$out" | tail -1)"
  [[ "$jid" =~ ^[0-9]+$ ]] || fail "sbatch did not return a job id: $out"
  jobs_seen+=("$jid")
}
job_field() { scontrol show job "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1; }
# wait_for JOB SECONDS STATE...: until the job is in one of the states.
wait_for() {
  local job="$1" secs="$2" s
  shift 2
  local deadline=$(($(date +%s) + secs))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    s="$(job_field "$job" JobState)"
    for want in "$@"; do [ "$s" = "$want" ] && return 0; done
    sleep 0.5
  done
  return 1
}
finished_states=(COMPLETED FAILED CANCELLED TIMEOUT NODE_FAIL OUT_OF_MEMORY BOOT_FAIL DEADLINE PREEMPTED)
# step_losses FILE: "step loss" per training record of a metrics.jsonl, last record of a step wins.
step_losses() {
  sed -n 's/^{"step": \([0-9]*\), "epoch": [0-9]*, "loss": \([^,]*\),.*/\1 \2/p' "$1" |
    awk '{loss[$1] = $2} END {for (s in loss) print s, loss[s]}' | sort -n
}

cd "$T/jobs" || fail "cd $T/jobs"
export HEXAMOE="$hexamoe" HEXAMOE_RUNS_DIR="$T/runs"
deck="$source_dir/inputs/quick.toml"
# Enough steps that the signal lands mid-run; a loss record every step.
nsteps="${HEXAMOE_SLURM_TEST_STEPS:-300}"
# The MoE plan pinned: with parallel.mode = "auto" it is measured at start-up,
# and two runs (or a run and its restart) may split the work differently,
# which changes the rounding of the losses.
train_opts=(--set train.max_steps="$nsteps" --set train.epochs=100 --set train.log_every=1
  --set checkpoint.every=0 --set output.progress=off
  --set parallel.mode=data --set "parallel.proportions=[0.5, 0.5]")
cpu_sbatch=(--nodes=1 --ntasks=2 --ntasks-per-node=2 --cpus-per-task=1 --time=15)

# --- job 1: reference run ------------------------------------------------------
submit --job-name=reference "${cpu_sbatch[@]}" "$source_dir/slurm/hexamoe-cpu.sbatch" "$deck" "${train_opts[@]}"
ref="$jid"
show squeue
wait_for "$ref" 300 "${finished_states[@]}" || fail "reference job $ref did not finish within 300 s"
show scontrol show job "$ref" | grep -E "^\\$|JobId|JobState|ExitCode|Restarts|RunTime"
[ "$(job_field "$ref" JobState)" = COMPLETED ] || fail "reference job $ref ended $(job_field "$ref" JobState)"
[ "$(job_field "$ref" ExitCode)" = 0:0 ] || fail "reference job $ref exit code $(job_field "$ref" ExitCode)"
ref_dir="$T/runs/reference-$ref"
[ -f "$ref_dir/summary.json" ] || fail "reference run wrote no $ref_dir/summary.json"
step_losses "$ref_dir/metrics.jsonl" >"$T/ref.losses"
[ "$(wc -l <"$T/ref.losses")" -eq "$nsteps" ] || fail "reference metrics.jsonl has $(wc -l <"$T/ref.losses") step records, expected $nsteps"
first="$(head -1 "$T/ref.losses" | cut -d' ' -f2)"
last10="$(tail -10 "$T/ref.losses" | awk '{s += $2} END {printf "%.6f", s / NR}')"
awk -v a="$first" -v b="$last10" 'BEGIN {exit !(b < a)}' ||
  fail "the loss did not fall: step 1 $first, mean of the last 10 steps $last10"
say "reference: $nsteps steps, loss $first at step 1 -> $last10 (mean of the last 10)"

# --- job 2: preempted, requeued, resumed -----------------------------------------
submit --job-name=preempted "${cpu_sbatch[@]}" "$source_dir/slurm/hexamoe-cpu.sbatch" "$deck" "${train_opts[@]}"
pre="$jid"
pre_dir="$T/runs/preempted-$pre"
# Signal once it has run a few steps.
deadline=$(($(date +%s) + 120))
while :; do
  n=0
  [ -f "$pre_dir/metrics.jsonl" ] && n="$(grep -c '"loss"' "$pre_dir/metrics.jsonl")"
  [ "$n" -ge 10 ] && break
  [ "$(date +%s)" -lt "$deadline" ] || fail "job $pre did not reach 10 steps within 120 s"
  s="$(job_field "$pre" JobState)"
  for f in "${finished_states[@]}"; do [ "$s" = "$f" ] && fail "job $pre ended ($s) before it could be signalled"; done
  sleep 0.2
done
show squeue
show scancel --batch --signal=USR1 "$pre"
# The script forwards USR1, hexamoe checkpoints and exits 0, the script requeues.
wait_for "$pre" 120 PENDING "${finished_states[@]}" || fail "job $pre was not requeued within 120 s of the signal"
show squeue
show scontrol show job "$pre" | grep -E "^\\$|JobId|JobState|Reason|Restarts|ExitCode"
[ "$(job_field "$pre" JobState)" = PENDING ] ||
  fail "job $pre was not requeued: it ended $(job_field "$pre" JobState) (did training finish before the signal? raise HEXAMOE_SLURM_TEST_STEPS)"
[ "$(job_field "$pre" Restarts)" = 1 ] || fail "job $pre: Restarts=$(job_field "$pre" Restarts), expected 1"
out="$T/jobs/preempted-$pre.out"
grep -q "preempted at step [0-9]*, checkpoint written" "$out" || fail "hexamoe did not report 'preempted at step N, checkpoint written'"
k="$(sed -n 's/.*preempted at step \([0-9]*\), checkpoint written.*/\1/p' "$out" | head -1)"
[ "$k" -lt "$nsteps" ] || fail "preempted at step $k, not before the end ($nsteps)"
[ -e "$pre_dir/checkpoints/latest" ] || fail "no checkpoints/latest in $pre_dir after the preemption"
[ ! -f "$pre_dir/summary.json" ] || fail "a preempted run must not write summary.json"
say "job $pre preempted at step $k and requeued; releasing it (requeued jobs wait about 2 minutes otherwise)"
# Slurm revokes the credential of the run that ended; a rerun launched within
# the same second is refused ("Job credential revoked"). Let the node settle.
for ((i = 0; i < 60; i++)); do [ "$(sinfo -h -n localhost -o %t)" = idle ] && break; sleep 0.5; done
sleep 3
show scontrol update JobId="$pre" StartTime=now
wait_for "$pre" 300 "${finished_states[@]}" || fail "requeued job $pre did not finish within 300 s"
show scontrol show job "$pre" | grep -E "^\\$|JobId|JobState|ExitCode|Restarts|RunTime"
[ "$(job_field "$pre" JobState)" = COMPLETED ] || fail "requeued job $pre ended $(job_field "$pre" JobState)"
[ "$(job_field "$pre" ExitCode)" = 0:0 ] || fail "requeued job $pre exit code $(job_field "$pre" ExitCode)"
grep -q "resuming from .*checkpoints/latest" "$out" || fail "the requeued run did not resume from the checkpoint"
grep -q "restarted from .* at step $k" "$out" || fail "hexamoe did not restart at step $k"
[ -f "$pre_dir/summary.json" ] || fail "the resumed run wrote no summary.json"
# Each step trained exactly once, with the reference's loss.
dups="$(sed -n 's/^{"step": \([0-9]*\), "epoch".*/\1/p' "$pre_dir/metrics.jsonl" | sort | uniq -d | head -3)"
[ -z "$dups" ] || fail "steps logged twice after the restart: $dups"
step_losses "$pre_dir/metrics.jsonl" >"$T/pre.losses"
if ! diff "$T/ref.losses" "$T/pre.losses" >"$T/losses.diff"; then
  head -20 "$T/losses.diff"
  fail "the preempted-and-resumed run's losses differ from the uninterrupted run's"
fi
say "preempted run: steps 1-$k before the signal, $((k + 1))-$nsteps after the requeue; all $nsteps losses equal the reference's"

# --- job 3: the GPU job script, one (fake) GPU per task ---------------------------
submit --job-name=gpu-script --nodes=1 --ntasks-per-node=2 --gpus-per-node=2 --cpus-per-task=1 --time=10 \
  "$source_dir/slurm/hexamoe-gpu.sbatch" "$deck" --set train.max_steps=5 --set output.progress=off
gpu="$jid"
wait_for "$gpu" 300 "${finished_states[@]}" || fail "GPU-script job $gpu did not finish within 300 s"
show scontrol show job "$gpu" | grep -E "^\\$|JobId|JobState|ExitCode|TresPerNode"
scontrol show job "$gpu" | grep -q "TresPerNode=gres:gpu:2" || fail "the GPU-script job was not given 2 GPUs"
[ "$(job_field "$gpu" JobState)" = COMPLETED ] || fail "GPU-script job $gpu ended $(job_field "$gpu" JobState)"
[ "$(job_field "$gpu" ExitCode)" = 0:0 ] || fail "GPU-script job $gpu exit code $(job_field "$gpu" ExitCode)"
[ -f "$T/runs/gpu-script-$gpu/summary.json" ] || fail "the GPU-script job wrote no summary.json"

say "all Slurm checks passed"
echo "3 passed, 0 failed"
