"""Reading many files at once. Object stores answer each request slowly (tens of milliseconds)
but many in parallel, so a process reads `READERS` files at a time, and a job with more files
than one process reads quickly spreads them over Ray tasks, each reading its group of files."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

Item = TypeVar("Item")
Read = TypeVar("Read")

READERS = 16  # files one process reads at a time
# Reading tasks: at most this many, each with at least this much to read (a task costs a worker
# and a filesystem client).
READING_TASKS = 64
ROWS_PER_READING_TASK = 1_000_000  # input rows
FILES_PER_READING_TASK = 256  # committed part files, of a batch each


def in_parallel(read: Callable[[Item], Read], items: list[Item]) -> list[Read]:
    """`read` of each item, `READERS` at a time, in the items' order."""
    if len(items) <= 1:
        return [read(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(READERS, len(items))) as pool:
        return list(pool.map(read, items))


def in_groups(items: list[Item], work: int, work_per_task: int) -> list[list[Item]]:
    """`items` in consecutive groups, one per reading task (none when there are no items)."""
    if not items:
        return []
    tasks = max(1, min(READING_TASKS, len(items), -(-work // work_per_task)))
    size = -(-len(items) // tasks)
    return [items[start:start + size] for start in range(0, len(items), size)]
