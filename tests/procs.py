"""The living (not zombie) processes of this machine, from /proc: for tests that check what outlives what."""

from __future__ import annotations

from pathlib import Path


def living(*, parent: int | None = None, session: int | None = None) -> list[int]:
    """The pids of living processes whose parent is ``parent`` and / or whose session is ``session``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, _, sid = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except OSError:  # gone meanwhile
            continue
        if state != "Z" and parent in (None, int(ppid)) and session in (None, int(sid)):
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
