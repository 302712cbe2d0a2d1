"""Training data (recompute_lab.model.data): the block-shared walk of the synthetic chain gives the
tokens a per-batch, per-position walk gives, for any order of access; text windows are the file's.

The reference below is the generator as it was before issue 29 (one torch indexing step per
position per batch): committed runs were trained on its tokens, so the faster walk must keep them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from recompute_lab.config import DataConfig, DataKind
from recompute_lab.model.data import SUCCESSORS, Batches, ByteText, SyntheticTokens


def reference_batch(cfg: DataConfig, vocab_size: int, step: int, micro: int) -> torch.Tensor:
    """One micro-batch's (B, T+1) rows, walked position by position in torch."""
    table = SyntheticTokens(vocab_size, cfg.seed).table
    g = torch.Generator().manual_seed(hash((cfg.seed, step, micro)) & 0x7FFF_FFFF_FFFF)
    b, length = cfg.batch_size, cfg.seq_len + 1
    choice = torch.randint(0, SUCCESSORS, (b, length), generator=g)
    out = torch.empty(b, length, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab_size, (b,), generator=g)
    for t in range(1, length):
        out[:, t] = table[out[:, t - 1], choice[:, t]]
    return out


@pytest.mark.parametrize(
    "batch_size,seq_len,vocab_size,seed",
    [(8, 64, 256, 1234), (1, 17, 4096, 0), (3, 300, 50257, 7), (2, 5000, 256, 1234)],
)
def test_synthetic_batches_are_the_per_position_walk(batch_size, seq_len, vocab_size, seed):
    cfg = DataConfig(batch_size=batch_size, seq_len=seq_len, seed=seed)
    data = Batches(cfg, vocab_size)
    k = data.block_steps
    # Out of order, across block boundaries, several micro-batches, a step met twice.
    for step, micro in [(0, 0), (k + 1, 0), (k - 1, 1), (0, 1), (2 * k, 2), (k + 1, 0), (5, 0)]:
        rows = reference_batch(cfg, vocab_size, step, micro)
        idx, targets = data.get(step, micro)
        assert torch.equal(idx, rows[:, :-1]) and torch.equal(targets, rows[:, 1:]), (step, micro)
        assert idx.dtype == torch.long and idx.shape == (batch_size, seq_len)
        # Storages of their own: the batch's bytes do not include the block it was cut from.
        assert idx.untyped_storage().nbytes() == idx.numel() * 8


def test_blocks_stay_small_for_long_sequences():
    data = Batches(DataConfig(batch_size=8, seq_len=8191), 256)
    assert data.block_steps * 8 * 8192 <= 1 << 20 and data.block_steps >= 1
    assert Batches(DataConfig(batch_size=1, seq_len=1 << 21), 256).block_steps == 1


def test_every_successor_is_one_of_the_tokens_four():
    data = Batches(DataConfig(batch_size=4, seq_len=128, seed=3), 512)
    idx, targets = data.get(9)
    table = data.source.table
    assert (table[idx] == targets[..., None]).any(-1).all()


def test_text_windows_are_slices_of_the_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(bytes(range(7, 250)) * 3)
    cfg = dataclasses.replace(DataConfig(batch_size=5, seq_len=40), kind=DataKind.text, path=path)
    data = Batches(cfg, 256)
    idx, targets = data.get(3, 1)
    tokens = ByteText(str(path)).tokens
    starts = torch.randint(0, len(tokens) - 41, (5,), generator=data.generator(3, 1))
    for row, trow, start in zip(idx, targets, starts.tolist()):
        window = tokens[start : start + 41]
        assert torch.equal(row, window[:-1]) and torch.equal(trow, window[1:])
