"""2-process training (accelerate launch, gloo on CPU) equals 1 process with the same global batch."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from launching import accelerate_launch, run_script_here  # noqa: E402
from test_seqrec import write_successor_dataset  # noqa: E402

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from llmrec.seqrec.config import SeqRecConfig
    from llmrec.seqrec.run import run_seqrec

    data_dir, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    common = dict(dataset_dir=data_dir, max_history=10, hidden_size=16, n_layers=1, n_heads=2, inner_size=32,
                  dropout=0.0, attn_dropout=0.0, epochs=2, batch_size=6, eval_batch_size=8, lr=1e-2,
                  progress=False, resume=False)
    models = {
        "sasrec": {},
        "rearec-erl": {"reason_steps": 2},
        "rearec-prl": {"reason_steps": 2, "noise_std": 0.0},
        "lares": {"depth_sampling": "constant", "mean_recurrence": 2, "state_init": "zero",
                  "tla_weight": 0.0, "sla_weight": 0.0},
    }
    for name, extra in models.items():
        run_seqrec(SeqRecConfig(model=name, output_dir=f"{out}/{name}", **common, **extra))
    """
)


def test_two_processes_match_one_process(tmp_path):
    from safetensors.torch import load_file

    # 16 train windows in global batches of 6, 6 and 4: with 2 processes accelerate fills the last batch with 2
    # rows from the epoch's start (3 per process), which must carry no loss.
    data = write_successor_dataset(tmp_path / "d")
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    run_script_here(script, data, tmp_path / "one")  # 1 process: this one
    accelerate_launch(2, [script, data, tmp_path / "two"])
    for name in ("sasrec", "rearec-erl", "rearec-prl", "lares"):
        a, b = (load_file(str(_last_weights(tmp_path / run / name / "train"))) for run in ("one", "two"))
        assert a.keys() == b.keys()
        for k in a:
            # atol 3e-5: the key part of the qkv bias has no true gradient (softmax ignores it), and Adam turns
            # the float noise of its gradient (other summation order per layout) into steps of ~1e-5 there; the
            # rows the loader adds to a last batch, if trained on, move the weights by ~1e-2.
            assert torch.allclose(a[k], b[k], atol=3e-5, rtol=1e-4), (name, k, (a[k] - b[k]).abs().max())
        one = json.loads((tmp_path / "one" / name / "results.json").read_text())
        two = json.loads((tmp_path / "two" / name / "results.json").read_text())
        assert (one["timings"]["num_processes"], two["timings"]["num_processes"]) == (1, 2)
        assert one["timings"]["epochs"] == two["timings"]["epochs"] == 2
        # the same validation ranking (gathered across the 2 processes) from the same weights
        assert one["valid"] == pytest.approx(two["valid"], abs=1e-6)


def _last_weights(phase_dir: Path) -> Path:
    """The last epoch's weights: the checkpoint slot its state.json names."""
    return phase_dir / f"last-{json.loads((phase_dir / 'state.json').read_text())['slot']}.safetensors"
