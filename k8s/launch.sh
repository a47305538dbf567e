#!/bin/bash
# The training pod's entry point (PID 1): `bash launch.sh COMMAND...`, where COMMAND is torchrun ...
# (GPU nodes) or python -m pretrain.run ... (one per TPU VM host). Shipped in the job's ConfigMap.
#
# Kubernetes signals only PID 1 when it preempts, evicts or drains a pod. This script passes SIGTERM
# on to the processes that write the checkpoint: torchrun's workers, or the trainer itself. torchrun
# is left alone: its own handler would kill its workers 30 s later, before a large checkpoint is done.
# The trainers stop together (they agree on it every step), write one checkpoint and exit 0.
#
# The pod succeeds only when the run is complete. Trainers that a signal stopped with the run unfinished, because
# this pod or a peer was preempted, write PRETRAIN_PREEMPTED_FILE (pretrain.train.loop.Preemption) and this script
# exits 75; the Job's podFailurePolicy answers that by starting the pod again without counting a failure, and the
# new pods resume from the checkpoint.
set -u
PRETRAIN_PREEMPTED_FILE=$(mktemp -u "${TMPDIR:-/tmp}/pretrain-preempted.XXXXXX")
export PRETRAIN_PREEMPTED_FILE

torchrun=0
[[ $(basename "$1") == torchrun ]] && torchrun=1
termed=0
forward_term() {
    termed=1
    local targets=${child:-}
    if ((torchrun)); then
        targets=$(cat /proc/"$child"/task/*/children 2>/dev/null)
    fi
    targets=${targets:-${child:-}}  # torchrun has not started its workers yet
    echo "SIGTERM: asking the trainer (pids $targets) to write a checkpoint and stop" >&2
    [[ -n $targets ]] && kill -TERM $targets 2>/dev/null
}
trap 'forward_term' TERM

# torchrun's rendezvous is held by the first pod's agent: stopped (preempted, evicted) while the others wait for the
# rest, it fails them too, before they start a trainer. Those join the rendezvous again, until its timeout, rather
# than fail (a failure each, counted against the Job's backoffLimit). The first pod's own failures are failures.
rendezvous_s=0
first_pod=0
for arg in "$@"; do
    [[ $arg == --rdzv-conf=timeout=* ]] && rendezvous_s=${arg#--rdzv-conf=timeout=}
    [[ $arg == --node-rank=0 ]] && first_pod=1
done
while :; do
    "$@" &
    child=$!
    spawned=0
    # A trap interrupts `wait`: wait again until the command has ended, then read its exit status. Polled, to see
    # whether torchrun started its workers.
    while kill -0 "$child" 2>/dev/null; do
        [[ -n $(cat /proc/"$child"/task/*/children 2>/dev/null) ]] && spawned=1
        sleep 1 &
        wait $!
    done
    wait "$child"
    status=$?
    ((torchrun && !first_pod && status != 0 && !spawned && !termed && SECONDS < rendezvous_s)) || break
    echo "torchrun failed (exit status $status) before it started the trainers: the rendezvous was lost, as when" \
        "the first pod is stopped; joining it again" >&2
    sleep 5 &
    wait $!
    ((termed)) && break
done

if [ -f "$PRETRAIN_PREEMPTED_FILE" ]; then
    echo "a signal stopped the trainer at $(cat "$PRETRAIN_PREEMPTED_FILE") before the end of the run (exit status" \
        "$status); exiting 75 to be started again, from its newest checkpoint" >&2
    rm -f "$PRETRAIN_PREEMPTED_FILE"
    exit 75
fi
# Ended by the SIGTERM before the interpreter got to the trainer's first line: the trainer's own status is 143,
# torchrun's 1 (a worker that a signal ended), as it is for a trainer's error after the signal: that error comes
# again at the next start, which is counted.
if ((termed && (status == 128 + 15 || torchrun && status != 0))); then
    echo "SIGTERM ended the trainer before it could write a checkpoint (exit status $status); exiting 75 to be" \
        "started again" >&2
    exit 75
fi
exit "$status"
