#!/bin/bash
# The training pod's entry point (PID 1): `bash launch.sh COMMAND...`, where COMMAND is torchrun ...
# (GPU nodes) or python -m pretrain.run ... (one per TPU VM host). Shipped in the job's ConfigMap.
#
# Kubernetes signals only PID 1 when it preempts, evicts or drains a pod. This script passes SIGTERM
# on to the processes that write the checkpoint: torchrun's workers, or the trainer itself. torchrun
# is left alone: its own handler would kill its workers 30 s later, before a large checkpoint is done.
# The trainers stop together (they agree on it every step), write one checkpoint and exit 0.
#
# The pod succeeds only when the run is complete: its newest checkpoint is the last step. A run that stopped
# early, because this pod or a peer was preempted, exits 75; the Job's podFailurePolicy answers that
# by starting the pod again without counting a failure, and the new pods resume from the checkpoint.
set -u
: "${PRETRAIN_FINAL_CHECKPOINT:?set in the Job: the folder of the last checkpoint of the run}"

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

if ((status != 0)); then
    if ((termed && status == 128 + 15)); then  # ended by the SIGTERM before its handler was set: in its start-up
        echo "SIGTERM ended the trainer before it could write a checkpoint; exiting 75 to be started again" >&2
        exit 75
    fi
    exit "$status"
fi
# The run is complete when its newest checkpoint is the final one or later (a run resumed with fewer total steps).
newest=$(cat "${PRETRAIN_FINAL_CHECKPOINT%/*}/latest" 2>/dev/null || echo step_0)
if ((10#${newest#step_} < 10#${PRETRAIN_FINAL_CHECKPOINT##*/step_})); then
    echo "stopped before the end of the run, after writing a checkpoint; exiting 75 to be started again" >&2
    exit 75
fi
