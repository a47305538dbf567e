"""Steps whose update was skipped for a non-finite loss or gradient, counted without waiting for the device."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UserError


class Skips:
    """Steps whose update was skipped for a non-finite gradient: in all, and in a row (the run stops at a limit).

    ``Backend.step`` says whether it updated as a bool, checked at once, or as a device tensor (xla): then
    the counts stay on the device and ``check`` runs at log and checkpoint steps, so the loop never waits.
    """

    def __init__(self, total: int, limit: int, precision: str, counter: Callable[[float], torch.Tensor]):
        """``counter``: ``Backend.counter``, which puts the counts on the device."""
        self.total, self.streak, self.longest, self.limit, self.precision = total, 0, 0, limit, precision
        self.counter = counter

    def add(self, updated: bool | torch.Tensor, step: int) -> None:
        on_device = isinstance(updated, torch.Tensor)
        if on_device and not isinstance(self.total, torch.Tensor):
            self.total, self.streak, self.longest = map(self.counter, (self.total, self.streak, self.longest))
        skipped = ~updated if on_device else not updated
        self.total = self.total + skipped
        self.streak = (self.streak + 1) * skipped
        # the longest streak since the last check: one that ended between two checks counts too
        if on_device:
            self.longest = torch.maximum(self.streak, self.longest)
        else:
            self.longest = max(self.longest, self.streak)
        if not on_device:
            self.check(step)

    def check(self, step: int) -> int:
        """The total, after stopping the run if a streak reached the limit since the last check."""
        if int(self.longest) >= self.limit:
            fp32 = "" if self.precision == "fp32" else " or use precision=fp32"
            raise UserError(f"{int(self.longest)} steps in a row had a non-finite loss or gradient (by step {step}); "
                            f"lower optim.lr{',' if fp32 else ' or'} raise schedule.warmup_steps{fp32}")
        # a streak going on goes on in self.streak, which the next add compares
        self.longest = self.counter(0) if isinstance(self.longest, torch.Tensor) else 0
        return int(self.total)
