import torch

from rmt_lightning.engine.padding import pad_left, pad_right


def test_pad_left_ends_every_sequence_at_the_last_column():
    ids, mask = pad_left([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_pad_right_starts_every_sequence_at_column_zero_with_a_minimum_width():
    ids, mask = pad_right([[5, 6], [7]], pad_id=9)
    assert ids.tolist() == [[5, 6], [7, 9]] and mask.tolist() == [[1, 1], [1, 0]]
    ids, mask = pad_right([[], []], pad_id=9, min_width=1)
    assert ids.tolist() == [[9], [9]] and mask.dtype == torch.long and mask.sum() == 0
