"""``eval_mode(model)``: a forward pass in eval mode (statistics, tracing, calibration,
evaluation) that gives every module back the mode it had."""
from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn


@contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode inside the block; afterwards (after an exception too) each module has
    its own mode again, so a part that was frozen in eval mode stays so."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
