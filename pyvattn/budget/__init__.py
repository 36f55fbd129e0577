"""Memory budgets that several KV caches grow within together.

* :class:`MemoryBudget`: caches of one process (several models, or layer groups) share one limit.
* :class:`SharedBudget`: processes on one machine share one limit through a small ledger in
  ``/dev/shm``; a process that dies has its share recovered.

A cache takes a :class:`BudgetAccount` with ``budget.open_account(label)`` and charges it before it
creates physical pages, releases it when it frees them::

    budget = MemoryBudget("8GiB")
    account = budget.open_account("llama-8b")
    if account.try_charge(2 << 20):     # all or nothing
        ...                             # create the page
    account.release(2 << 20)
    account.close()                     # gives back whatever is still charged
"""

from .account import UNLIMITED, AccountRow, Budget, BudgetAccount
from .memory import MemoryBudget
from .shared import SharedBudget

__all__ = ["UNLIMITED", "AccountRow", "Budget", "BudgetAccount", "MemoryBudget", "SharedBudget"]
