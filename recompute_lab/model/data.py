"""Training data: seeded synthetic token streams (default, nothing to download) or byte-level text.

Every batch is a pure function of (seed, step, micro-batch index), so a run is reproducible and a
resumed run
sees the same data as an uninterrupted one. Batches are (idx, targets), both (B, T) int64, targets =
idx
shifted by one token.

The synthetic stream is a Markov chain: each position depends on the one before, so it cannot be
drawn all at once. ``Batches`` walks the chains of a block of consecutive steps together (one
Python iteration per position for up to 64 batches' rows, in numpy) and keeps the block: a
per-batch walk in torch cost ~20 us per position (21 ms at b8 s1024, issue 29), the shared walk
costs well under 1 us per position and batch. The tokens are the ones a per-batch walk gives
(tests/unit/test_data.py holds the two equal).

Layer: model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recompute_lab.config import ConfigError, DataConfig, DataKind

SAMPLE_TEXT = Path(__file__).resolve().parents[1] / "assets" / "sample.txt"
SUCCESSORS = 4  # synthetic stream: each token is followed by one of 4 seeded successors
# Tokens of one block of synthetic batches (8 MB of int64): enough steps per walk to share its
# per-position cost, few enough that a long-sequence run does not hold much memory for data.
BLOCK_TOKENS = 1 << 20
MAX_BLOCK_STEPS = 64


class SyntheticTokens:
    """A seeded random Markov chain over the vocabulary: random-looking tokens that a model can
    still learn.

    Each token has ``SUCCESSORS`` possible next tokens drawn once from the seed; sequences start at
    a random
    token and pick a successor uniformly at each position, so the best achievable loss is ln(4) ~
    1.386 nats
    while an untrained model starts near ln(vocab_size).
    """

    def __init__(self, vocab_size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.table = torch.randint(0, vocab_size, (vocab_size, SUCCESSORS), generator=g)  # (V, k)
        self.flat = self.table.numpy().reshape(-1)  # successor c of token v at v * k + c

    def draw(self, batch: int, length: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random draws of ``batch`` sequences: (first tokens (B,), successor choices (B, L))."""
        choice = torch.randint(0, SUCCESSORS, (batch, length), generator=g)
        first = torch.randint(0, self.vocab_size, (batch,), generator=g)
        return first, choice

    def walk(self, first: Tensor, choice: Tensor) -> Tensor:
        """The chains (R, L) from their draws: token t is ``table[token t-1, choice[:, t]]``
        (choice[:, 0] unused). One numpy step per position over all R rows at once. A transposed
        view: each batch's copy gathers its own rows (one whole transpose: 3-6 ms at R512 L1025)."""
        flat = self.flat
        steps = np.ascontiguousarray(choice.numpy().T)  # (L, R): one contiguous row per position
        out = np.empty_like(steps)
        prev = out[0] = first.numpy()
        for t in range(1, len(steps)):
            prev = out[t] = flat[prev * SUCCESSORS + steps[t]]
        return torch.from_numpy(out).T


class ByteText:
    """UTF-8 text as byte tokens (vocab 256); batches are random windows of the file."""

    def __init__(self, path: str | None):
        file = Path(path).expanduser() if path else SAMPLE_TEXT
        if not file.is_file():
            raise ConfigError(
                f"data.path={path!r}: no such file (give a UTF-8 text file, or leave data.path "
                f"unset to use the bundled sample {SAMPLE_TEXT.name})"
            )
        self.tokens = torch.tensor(list(file.read_bytes()), dtype=torch.long)
        self.source = str(file)

    def sample(self, batch: int, length: int, g: torch.Generator) -> Tensor:
        if len(self.tokens) < length + 1:
            raise ConfigError(
                f"{self.source} has {len(self.tokens)} bytes, fewer than data.seq_len + 1 = "
                f"{length + 1}"
            )
        starts = torch.randint(0, len(self.tokens) - length, (batch,), generator=g)
        return self.tokens[starts[:, None] + torch.arange(length)]  # (B, L): one window per row


class Batches:
    """The run's micro-batches, by (step, micro-batch index)."""

    def __init__(self, cfg: DataConfig, vocab_size: int):
        self.cfg = cfg
        self.source = (
            SyntheticTokens(vocab_size, cfg.seed)
            if cfg.kind == DataKind.synthetic
            else ByteText(cfg.path)
        )
        rows = cfg.batch_size * (cfg.seq_len + 1)
        self.block_steps = max(1, min(MAX_BLOCK_STEPS, BLOCK_TOKENS // rows))
        self.blocks: dict[int, tuple[int, Tensor]] = {}  # micro -> (first step, (K*B, T+1))

    def generator(self, step: int, micro: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.cfg.seed, step, micro)) & 0x7FFF_FFFF_FFFF)

    def sequences(self, step: int, micro: int) -> Tensor:
        """The (B, T+1) token rows of one micro-batch."""
        b, length = self.cfg.batch_size, self.cfg.seq_len + 1
        if not isinstance(self.source, SyntheticTokens):
            return self.source.sample(b, length, self.generator(step, micro))
        first = step - step % self.block_steps
        held = self.blocks.get(micro)
        if held is None or held[0] != first:
            # Each batch keeps its own seeded draws; only the walk is shared by the block.
            draws = [
                self.source.draw(b, length, self.generator(s, micro))
                for s in range(first, first + self.block_steps)
            ]
            walked = self.source.walk(
                torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
            )
            held = self.blocks[micro] = (first, walked)
        row = (step - first) * b
        return held[1][row : row + b]

    def get(self, step: int, micro: int = 0) -> tuple[Tensor, Tensor]:
        """Micro-batch ``micro`` of optimizer step ``step``: (idx, targets), each (B, T)."""
        seq = self.sequences(step, micro)  # (B, T+1)
        # Two contiguous copies with storages of their own (B x T int64 each), whatever B: a slice
        # would share the block's storage and make the batch's bytes depend on how it was made.
        dense = torch.contiguous_format
        return seq[:, :-1].clone(memory_format=dense), seq[:, 1:].clone(memory_format=dense)
