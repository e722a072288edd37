"""FLOP counting with `torch.utils.flop_counter`.

The counter sees matmuls, convolutions and attention (the ops that dominate a diffusion
model); element-wise ops, norms and activations are not counted, so the numbers are the
usual "model FLOPs" (2 per multiply-accumulate) and a device's efficiency factor absorbs
the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["count_flops"]


def _sdpa_cpu_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], object]) -> int:
    """Run ``fn()`` once under a FLOP counter (no autograd) and return the FLOPs it did.

    torch's formula table knows the CUDA attention kernels but not the CPU kernel that
    ``scaled_dot_product_attention`` dispatches to; it is added here, or every transformer
    block's attention would count as zero on CPU.

    Args:
        fn: a zero-argument callable, e.g. ``lambda: unet(x, t, encoder_hidden_states=e)``.

    Returns:
        Total floating-point operations (an int; 2 per multiply-accumulate).
    """
    # Imported here so that loading device profiles does not import torch.
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    with torch.no_grad(), counter:
        fn()
    return int(counter.get_total_flops())
