"""The decode split count for batches of unequal rows (`balance_num_splits`); the kernel with splits is
tested in test_attention_decode.py, the balanced graphs in tests/test_gpu_engine.py."""
from fdpp.kernels.attention_decode import DECODE_MAX_SPLITS, balance_num_splits, choose_num_splits


def test_balanced_batches_keep_their_split_count():
    assert balance_num_splits([1024] * 32, 32, 132) is None  # equal rows
    assert balance_num_splits([16384], 32, 132) is None  # one row: choose_num_splits handles it
    assert balance_num_splits([1500] + [100] * 31, 32, 132) is None  # longest under 2048 keys
    assert balance_num_splits([4096, 3000, 3500, 2800], 8, 132) is None  # within 4x of the mean


def test_one_long_row_among_short_ones_gets_splits():
    ctx = [16400] + [1100] * 32  # the ITL scenario's steps after the 16k prompt's last chunk (H200)
    s = balance_num_splits(ctx, 32, 132)
    assert s == 8 and s > choose_num_splits(len(ctx), 32, max(ctx), 132)
    assert balance_num_splits(ctx, 8, 132) == 16  # GQA: fewer KV heads, less work per program
    # never beyond the cap, and never splits of under 128 keys of the longest row
    assert balance_num_splits([1 << 20] + [1] * 200, 1, 132) == DECODE_MAX_SPLITS
    assert balance_num_splits([2048] + [1] * 63, 1, 1000) <= 2048 // 128
