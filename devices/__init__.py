"""Device profiles, FLOP counting, latency and energy models.

    profile = load_profile("jetson-agx-orin")
    profile.compute_latency_s(flops)          # flops / (peak × efficiency) + overhead
    profile.energy_j(flops, tx_airtime_s=0.2)  # compute + radio (+ idle) energy
"""

from meg.devices.flops import count_architecture_flops, count_flops
from meg.devices.profile import PROFILES_DIR, DeviceProfile, list_profiles, load_profile
from meg.devices.radio import dbm_to_w, radio_energy_j

__all__ = [
    "PROFILES_DIR",
    "DeviceProfile",
    "count_architecture_flops",
    "count_flops",
    "dbm_to_w",
    "list_profiles",
    "load_profile",
    "radio_energy_j",
]
