"""Fair shares of decoding across tenants: which tenants' rows take the next step.

Admission alone (free rows to the tenant with the fewest, guest rows for a tenant with none) lets a tenant's short
request into a batch full of another tenant's long ones, but then it decodes in a big batch, and on a CPU a step of
ten rows costs about twice a step of one. So each tenant has a clock: the tokens its rows were given in this running
batch. A step goes only to the tenants within `window` tokens of the slowest clock; the others' rows wait with their
KV cache (`Generation.focus`, no compute, no change to their text). Tenants given as many tokens step together, in
one batch, as before.

A tenant that starts (no row running or waiting) sets its clock to at most `credit` tokens behind the slowest
running tenant, as a process waking in a fair scheduler does: a light tenant's short request then runs alone at
once, for up to `credit - window` tokens, while a tenant that has had its share cannot bank more than `credit`. Over
time every busy tenant gets the same number of tokens, whatever the number of rows it sends.
"""
from __future__ import annotations

from typing import Iterable


class FairShare:
    def __init__(self, window: int, credit: int):
        if window < 0 or credit < window:
            raise ValueError("window must be >= 0 and credit >= window")
        self.window, self.credit = window, credit
        self.clock: dict[str, int] = {}

    @classmethod
    def off(cls) -> "FairShare":
        """Every tenant always steps (rows wait for nobody)."""
        return cls(window=1 << 62, credit=1 << 62)

    def reset(self) -> None:
        """A new running batch: nobody is behind anybody."""
        self.clock.clear()

    def starting(self, tenant: str, running: Iterable[str]) -> None:
        """`tenant` gets its first row while `running` tenants have rows."""
        running = set(running)
        if tenant in running:
            return
        others = [self.clock.get(t, 0) for t in running]
        mine = self.clock.get(tenant, 0)
        self.clock[tenant] = max(mine, min(others) - self.credit) if others else mine

    def stepping(self, tenants: Iterable[str]) -> set[str]:
        """Of the tenants with rows, those whose rows take the next step."""
        tenants = set(tenants)
        if len(tenants) < 2:
            return tenants
        slowest = min(self.clock.get(t, 0) for t in tenants)
        return {t for t in tenants if self.clock.get(t, 0) <= slowest + self.window}

    def stepped(self, tenants: Iterable[str]) -> None:
        """One token to each row of these tenants (one entry per row)."""
        for t in tenants:
            self.clock[t] = self.clock.get(t, 0) + 1
