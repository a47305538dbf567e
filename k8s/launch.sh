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

"$@" &
child=$!
termed=0

forward_term() {
    termed=1
    local targets=$child
    if [[ $(basename "$1") == torchrun ]]; then
        targets=$(cat /proc/"$child"/task/*/children)
    fi
    targets=${targets:-$child}  # torchrun has not started its workers yet
    echo "SIGTERM: asking the trainer (pids $targets) to write a checkpoint and stop" >&2
    kill -TERM $targets
}
trap 'forward_term "$1"' TERM

# A trap interrupts `wait`: wait again until the command has ended, then read its exit status.
while kill -0 "$child" 2>/dev/null; do wait "$child"; done
wait "$child"
status=$?

if [ -f "$PRETRAIN_PREEMPTED_FILE" ]; then
    echo "a signal stopped the trainer at $(cat "$PRETRAIN_PREEMPTED_FILE") before the end of the run (exit status" \
        "$status); exiting 75 to be started again, from its newest checkpoint" >&2
    rm -f "$PRETRAIN_PREEMPTED_FILE"
    exit 75
fi
if ((termed && status == 128 + 15)); then  # ended by the SIGTERM before the interpreter got to the trainer's first line
    echo "SIGTERM ended the trainer before it could write a checkpoint; exiting 75 to be started again" >&2
    exit 75
fi
exit "$status"
