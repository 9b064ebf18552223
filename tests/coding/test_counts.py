"""DeviceCount: host ints and device tensors added in any mix read back as their exact sum."""

from __future__ import annotations

import torch

from tl_sparsity.coding.counts import DeviceCount


def test_a_count_of_host_ints_and_tensors_is_their_sum_across_folds():
    c, want = DeviceCount(5), 5
    for i in range(3 * DeviceCount.FOLD + 7):  # several folds, then a partial one
        part = torch.tensor(i % 4) if i % 3 else torch.tensor([i % 5])[0]
        c.add(part)
        want += int(part)
        if i % 50 == 0:
            c.add(2)
            want += 2
        if i % 97 == 0:
            assert int(c) == want  # reading folds what is pending and keeps counting after
    assert int(c) == want and c == DeviceCount(want)
