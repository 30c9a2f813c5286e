"""How ``max_associations`` and ``max_pending_connections`` are shared out among listener processes."""

from __future__ import annotations

import pytest

from pacs_bridge.listener_processes import process_share


@pytest.mark.parametrize(("total", "processes"), [(16, 2), (3, 2), (2, 2), (17, 4), (256, 3), (64, 64)])
def test_the_shares_add_up_to_the_limit_and_differ_by_at_most_one(total: int, processes: int) -> None:
    """Three associations on two processes: 2 and 1, so the bridge admits three and rejects the fourth."""
    shares = [process_share(total, processes, slot) for slot in range(processes)]

    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1


def test_a_limit_below_the_number_of_processes_gives_each_one() -> None:
    """Only max_pending_connections can be lower than the number of processes (listener_processes never exceeds
    max_associations): each process still takes one."""
    assert [process_share(1, 2, slot) for slot in range(2)] == [1, 1]
