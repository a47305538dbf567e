"""What the DataLoader workers' fork server imports before it forks the first one (its preload, and no other
process's): the stream and torchvision, so that a worker starts in milliseconds; then every object so far is frozen
out of the garbage collector. A worker's collections then leave the pages it shares with the server unwritten (the
fork advice of the gc module's documentation), and the server's exit leaves them to the operating system rather
than collecting them one by one, a second with torch loaded that kept the trainer's stdout and stderr open."""

import gc
import importlib
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)  # as the server does once it has loaded: Ctrl-C is the trainer's
for module in ("pretrain.data.stream", "torchvision.transforms", "torchvision.io"):  # torchvision: see transforms
    importlib.import_module(module)
gc.freeze()
