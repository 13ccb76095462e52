"""Fine-tuning wiring in the loop: the job model's log lines and eval at step 0, every N, end."""

from __future__ import annotations

import math
import re

from tests.trainer_low_mem.test_loop import _config
from trainer_low_mem import loop


def test_eval_runs_at_step_zero_every_n_and_at_the_end(tmp_path, make_dataset, capsys):
    out = tmp_path / "out"
    train, held_out = make_dataset(300), make_dataset(40, seed=1)
    cfg = _config(train, out, "--eval_data", str(held_out), "--eval_every", "3", steps=4)
    result = loop.train(cfg)
    assert result.exit_code == 0
    text = capsys.readouterr()
    text = text.out + text.err
    assert "trainable parameters:" in text
    # The log line names lr, the gradient norm, elapsed time and ETA.
    assert re.search(r"step: 4/4, loss: [0-9.]+, lr: \S+, grad norm: [0-9.e+-]+, elapsed: ", text)
    evals = re.findall(r"step: (\d+)/4, eval_loss: ([0-9.]+)", text)
    assert [int(s) for s, _ in evals] == [0, 3, 4]
    losses = [float(v) for _, v in evals]
    assert all(math.isfinite(v) for v in losses)
