"""fit_shapes: a micro-batch whose rows differ much in length runs as one micro-step per row (of each
device), and as one micro-step otherwise; nothing is lost or moved between devices."""

import numpy as np

from jsft.data.batch import WeightedRows, fit_shapes


def micro_batch(used: list[int], length: int = 64) -> WeightedRows:
    """Rows holding one sample each of these lengths (targets everywhere after its first token)."""
    rows = len(used)
    ids, seg, pos = (np.zeros((rows, length), np.int32) for _ in range(3))
    weight = np.zeros((rows, length), np.float32)
    for r, n in enumerate(used):
        ids[r, :n] = np.arange(n) + 100 * (r + 1)
        seg[r, :n] = 1
        pos[r, :n] = np.arange(n)
        weight[r, 1:n] = 1.0 + r
    return WeightedRows(ids, seg, pos, weight)


def shapes(out):
    return [(mb.input_ids.shape, mb.target_pos.shape) for mb in out]


def test_a_short_row_next_to_a_full_one_runs_as_its_own_micro_step():
    # buckets of 16 columns: together 2 x 64 = 128 columns, apart 64 + 16 = 80 (<= 85%): split
    out = fit_shapes([micro_batch([60, 10])], buckets=4, rows_per_device=2)
    assert shapes(out) == [((1, 64), (1, 64)), ((1, 16), (1, 12))]  # target capacity: 9 -> 12 (of 16 / 4)
    np.testing.assert_array_equal(out[1].input_ids[0, :10], np.arange(10) + 200)
    # every target kept, with its weight: row 0 has 59 of weight 1, row 1 nine of weight 2
    assert [float(mb.target_weight.sum()) for mb in out] == [59.0, 18.0]


def test_rows_of_similar_length_stay_one_micro_step():
    out = fit_shapes([micro_batch([60, 50])], buckets=4, rows_per_device=2)  # apart 128 of 128: no gain
    assert shapes(out) == [((2, 64), (2, 64))]
    one = fit_shapes([micro_batch([60, 10])], buckets=4)  # rows_per_device=1: the rows are on two devices
    assert shapes(one) == [((2, 64), (2, 64))]


def test_each_device_keeps_its_own_rows_when_split():
    # 2 devices x 2 rows: device 0 holds rows 0, 1 and device 1 rows 2, 3; part m is row m of each device
    out = fit_shapes([micro_batch([60, 12, 58, 8])], buckets=4, rows_per_device=2)
    assert shapes(out) == [((2, 64), (2, 64)), ((2, 16), (2, 12))]
    np.testing.assert_array_equal(out[0].input_ids[:, 0], [100, 300])
    np.testing.assert_array_equal(out[1].input_ids[:, 0], [200, 400])
