"""What the console line and the MFU show: figures without exponents, a TPU's peak from its accelerator type."""

from __future__ import annotations

import pytest
import torch

from pretrain.metrics import PEAK_BF16, Metrics, shown, tpu_generation


@pytest.mark.parametrize("accelerator, generation", [
    ("v4-256", "TPU v4"), ("v5litepod-16", "TPU v5e"), ("v5p-128", "TPU v5p"), ("v6e", "TPU v6e"), ("v3-8", ""),
    ("", "")])
def test_a_tpus_accelerator_type_names_its_peak(accelerator, generation):
    assert tpu_generation(accelerator) == generation
    assert not generation or generation in PEAK_BF16


def test_the_console_line_shows_figures_without_an_exponent_and_the_data_wait_as_a_share(tmp_path):
    metrics = Metrics(tmp_path, enabled=False, start_step=0, total_steps=312000, train_flops_per_image=0,
                      device=torch.device("cpu"))
    line = metrics._line(150000, {"loss": 7.12345, "lr": 0.000512, "img_per_s": 27763.4, "samples": 50000.0,
                                  "bad_samples": 0.0, "data_wait": 0.0123}, "eval")
    assert line == ("eval step 150000/312000 | loss 7.123 | lr 0.000512 | img_per_s 27763 | samples 50000 | "
                    "bad_samples 0 | data_wait 1.2%")
    assert [shown(v) for v in (1e-5, 2.5, 12345.6, 3.0)] == ["1e-05", "2.5", "12346", "3"]
