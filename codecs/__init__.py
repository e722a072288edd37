"""Tensor codecs and wire framing: pure tensor functions, no I/O."""
