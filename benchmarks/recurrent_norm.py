"""What the per-step gradient norm costs a recurrent model's unlogged step (issue 22 point 3).

`Diagnostics(grad_norm_every_step=None)` measures the global gradient norm at every step when the model
has an `nn.RNNBase` inside. This times pytorch/examples' word_language_model at its default size (a
2-layer LSTM, 200 units, 10,000 words, bptt 35, batch 20, clipping at 0.25) with the default against
`grad_norm_every_step=False`, the two copies interleaved block by block in one process, and prints the
ratio of the median unlogged steps (logged steps and the first block left out).

    python benchmarks/recurrent_norm.py [--rounds 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from tb_diag_logger import Diagnostics

VOCAB, WIDTH, BPTT, BATCH, EVERY, BLOCK = 10_000, 200, 35, 20, 20, 10


class WordLM(nn.Module):
    """word_language_model's RNNModel (LSTM), default sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.encoder = nn.Embedding(VOCAB, WIDTH)
        self.rnn = nn.LSTM(WIDTH, WIDTH, 2, dropout=0.2)
        self.decoder = nn.Linear(WIDTH, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.drop(self.rnn(self.drop(self.encoder(x)))[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(2)
    arms = {}
    for key, measure in (("off", False), ("default", None)):
        torch.manual_seed(0)
        model = WordLM()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        diag = Diagnostics(model, logdir=tempfile.mkdtemp(), every=EVERY, optimizer=opt,
                           grad_norm_every_step=measure)
        arms[key] = (model, opt, diag, [], [0])
    data = torch.randint(0, VOCAB, (BPTT + 1, BATCH))
    for r in range(args.rounds):
        for key in (("off", "default") if r % 2 else ("default", "off")):
            model, opt, diag, times, step = arms[key]
            for _ in range(BLOCK):
                t0 = time.perf_counter()
                opt.zero_grad()
                loss = F.cross_entropy(model(data[:-1]).view(-1, VOCAB), data[1:].reshape(-1))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
                diag.step(step[0], loss=loss)
                opt.step()
                if r and step[0] % EVERY:
                    times.append(time.perf_counter() - t0)
                step[0] += 1
    off, on = statistics.median(arms["off"][3]), statistics.median(arms["default"][3])
    print(f"unlogged step, median of {len(arms['off'][3])}: per-step norm off {off * 1e3:.1f} ms, "
          f"default (on for this LSTM) {on * 1e3:.1f} ms, ratio {on / off:.3f}")
    for _, _, diag, _, _ in arms.values():
        diag.close()


if __name__ == "__main__":
    main()
