"""Device profiles, FLOP counting, latency and energy models."""
