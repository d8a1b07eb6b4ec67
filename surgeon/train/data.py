"""Training data: the token stream of a corpus cut into windows, a held-out split, a seeded order, rank shards.

The corpus is streamed (`surgeon.sources.iter_token_windows`): windows are seq_len tokens with BOS in front, as
`surgeon eval` sees them. Window i of the stream (counting from 0) is held out when
`i % heldout_every == heldout_every − 1`; the eval set is the first `eval_windows` of those. The other windows
are the training windows, read in epochs; within an epoch, each run of `shuffle_windows` consecutive training
windows is permuted by a generator seeded with (seed, epoch, block), so the order depends on the seed alone and
memory is one block of windows, whatever the corpus size.

Position: the number of training windows consumed so far, over all ranks. A step consumes
world × batch_size × grad_accum windows; micro-batch m takes the windows m·world·B … (m+1)·world·B − 1 and rank r
the r-th B of them. Resuming re-streams the corpus and skips the consumed windows (tokenizing, not training,
them), so the order after a resume is the order the uninterrupted run would have seen. Every rank streams the
whole corpus and keeps its own share: simple and exactly reproducible; tokenizing is cheap next to a step.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import SurgeonError
from ..sources import iter_token_windows


class WindowStream:
    def __init__(self, paths: list[Path], tokenizer, seq_len: int, *, heldout_every: int, seed: int = 0,
                 shuffle_windows: int = 1024):
        self.paths, self.tokenizer, self.seq_len = list(paths), tokenizer, seq_len
        self.heldout_every, self.seed, self.shuffle_windows = heldout_every, seed, shuffle_windows

    def _windows(self) -> Iterator[tuple[bool, torch.Tensor]]:
        """(held_out, window) for every full window of the stream, in corpus order."""
        width = self.seq_len + (self.tokenizer.bos_token_id is not None)
        for i, batch in enumerate(iter_token_windows(self.paths, self.tokenizer, self.seq_len)):
            window = batch[0]
            if window.numel() != width:  # only a corpus shorter than one window gives a short one
                raise SurgeonError(f"the corpus holds less than one window of {self.seq_len} tokens: pass more "
                                   f"text or a smaller seq_len")
            yield i % self.heldout_every == self.heldout_every - 1, window

    def heldout(self, n: int, batch_size: int) -> list[torch.Tensor]:
        """The first `n` held-out windows as batches (fewer if the corpus has fewer; at least one is required)."""
        windows = []
        for held, window in self._windows():
            if held:
                windows.append(window)
                if len(windows) == n:
                    break
        if not windows:
            raise SurgeonError(f"the corpus is too short for a held-out split: it needs at least {self.heldout_every} "
                               f"windows of {self.seq_len} tokens (lower heldout_every or seq_len, or add text)")
        return [torch.stack(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]

    def _epoch(self, epoch: int) -> Iterator[torch.Tensor]:
        block: list[torch.Tensor] = []
        number = 0

        def shuffled(block, number):
            g = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_033 + number) % (1 << 63))
            return [block[j] for j in torch.randperm(len(block), generator=g).tolist()]

        for held, window in self._windows():
            if held:
                continue
            block.append(window)
            if len(block) == self.shuffle_windows:
                yield from shuffled(block, number)
                block, number = [], number + 1
        if block:
            yield from shuffled(block, number)

    def train_windows(self, start: int = 0) -> Iterator[torch.Tensor]:
        """The training windows in order, endlessly (epoch after epoch), from position `start`."""
        epoch, position = 0, 0
        while True:
            seen = 0
            for window in self._epoch(epoch):
                seen += 1
                if position >= start:
                    yield window
                position += 1
            if seen == 0:
                raise SurgeonError(f"the corpus has no training windows of {self.seq_len} tokens after the held-out "
                                   f"split: add text or lower seq_len")
            epoch += 1

    def batches(self, start: int, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        """This rank's micro-batches (batch_size × window) from global position `start`."""
        group: list[torch.Tensor] = []
        for window in self.train_windows(start):
            group.append(window)
            if len(group) == world * batch_size:
                yield torch.stack(group[rank * batch_size:(rank + 1) * batch_size])
                group = []
