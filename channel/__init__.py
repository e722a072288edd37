"""Wireless channel emulator: fading models, modems, link budget, airtime and energy."""
