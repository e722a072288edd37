"""FLOP counting with `torch.utils.flop_counter`.

The counter sees matmuls, convolutions and attention (the ops that dominate a diffusion
model); element-wise ops, norms and activations are not counted, so the numbers are the
usual "model FLOPs" (2 per multiply-accumulate) and a device's efficiency factor absorbs
the rest.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["count_flops"]


def count_flops(fn: Callable[[], object]) -> int:
    """Run ``fn()`` once under a FLOP counter (no autograd) and return the FLOPs it did.

    Args:
        fn: a zero-argument callable, e.g. ``lambda: unet(x, t, encoder_hidden_states=e)``.

    Returns:
        Total floating-point operations (an int; 2 per multiply-accumulate).
    """
    # Imported here so that loading device profiles does not import torch.
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return int(counter.get_total_flops())
