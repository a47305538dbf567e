"""kubectl, answering pretrain.submit as an API server would, from a cluster described in $KUBECTL_STATE/cluster.json
(no API server can run on the test machines: no containers, and kind or k3s cannot be fetched).

cluster.json: {"pvc": object, null or an error line; "job": [objects]; "pods": [[objects]]}. The n-th list of "job"
and "pods" answers once n pods' logs have been followed, so a test scripts a Job that starts again. Every call is
appended to calls.txt.
"""

import json
import os
import sys
from pathlib import Path

state = Path(os.environ["KUBECTL_STATE"])
args = sys.argv[1:]
with open(state / "calls.txt", "a") as calls:
    calls.write(" ".join(args) + "\n")
cluster = json.loads((state / "cluster.json").read_text())
followed = len(list(state.glob("followed-*")))


def answer(key: str):
    """The object for now: the n-th of a scripted list, or the last."""
    script = cluster.get(key)
    return script[min(followed, len(script) - 1)] if isinstance(script, list) else script


if args[0] == "logs":
    pod = next(a for a in args if a.startswith("pod/"))[len("pod/"):]
    print(f"[pod/{pod}/trainer] step 10 loss 2.30", flush=True)
    (state / f"followed-{pod}").touch()
elif args[:2] == ["get", "persistentvolumeclaim"]:
    pvc = answer("pvc")
    if isinstance(pvc, str):
        sys.exit(print(pvc, file=sys.stderr) or 1)
    print(json.dumps(pvc) if pvc else "")  # JSON is YAML; --ignore-not-found prints nothing for none
elif args[:2] == ["get", "job"]:
    job = answer("job")
    print(json.dumps(job) if job else "")
elif args[:2] == ["get", "pods"]:
    print(json.dumps({"items": answer("pods") or []}))
elif args[0] in ("apply", "delete"):
    print(f"{args[0]}: ok")
