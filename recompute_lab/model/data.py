"""Training data: seeded synthetic token streams (default, nothing to download) or byte-level text.

Every batch is a pure function of (seed, step, micro-batch index), so a run is reproducible and a
resumed run
sees the same data as an uninterrupted one. Batches are (idx, targets), both (B, T) int64, targets =
idx
shifted by one token.

Layer: model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from recompute_lab.config import ConfigError, DataConfig, DataKind

SAMPLE_TEXT = Path(__file__).resolve().parents[1] / "assets" / "sample.txt"
SUCCESSORS = 4  # synthetic stream: each token is followed by one of 4 seeded successors


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

    def sample(self, batch: int, length: int, g: torch.Generator) -> Tensor:
        choice = torch.randint(0, SUCCESSORS, (batch, length), generator=g)
        out = torch.empty(batch, length, dtype=torch.long)
        out[:, 0] = torch.randint(0, self.vocab_size, (batch,), generator=g)
        for t in range(1, length):
            out[:, t] = self.table[out[:, t - 1], choice[:, t]]
        return out


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
        return torch.stack([self.tokens[s : s + length] for s in starts.tolist()])


class Batches:
    def __init__(self, cfg: DataConfig, vocab_size: int):
        self.cfg = cfg
        self.source = (
            SyntheticTokens(vocab_size, cfg.seed)
            if cfg.kind == DataKind.synthetic
            else ByteText(cfg.path)
        )

    def get(self, step: int, micro: int = 0) -> tuple[Tensor, Tensor]:
        """Micro-batch ``micro`` of optimizer step ``step``: (idx, targets), each (B, T)."""
        g = torch.Generator().manual_seed(hash((self.cfg.seed, step, micro)) & 0x7FFF_FFFF_FFFF)
        seq = self.source.sample(self.cfg.batch_size, self.cfg.seq_len + 1, g)  # (B, T+1)
        # Two copies with storages of their own (B x T int64 each), whatever B: a contiguous slice
        # would share the
        # (B, T+1) storage when B = 1 and make the batch's bytes depend on the batch size's shape.
        return seq[:, :-1].clone(), seq[:, 1:].clone()
