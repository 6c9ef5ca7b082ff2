"""Does this machine match its device profile? Warnings, not errors: a device still trains.

A profile's budget assumes a GPU generation, a CUDA and JetPack release and a power mode; on a
mismatch the device runs slower, or on the CPU instead, and the operator should hear why.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from shared.profiles import DeviceProfile

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
# L4T major release -> JetPack major (R35: JetPack 5, R36: JetPack 6, R38: JetPack 7).
L4T_TO_JETPACK = {"32": "4", "35": "5", "36": "6", "38": "7"}


def _gpu() -> tuple[str, str] | None:
    """(compute capability, CUDA version) torch sees, or None without a usable CUDA GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}", str(torch.version.cuda or "")


def _jetpack_major() -> str | None:
    if not TEGRA_RELEASE.exists():
        return None
    m = re.search(r"R(\d+)", TEGRA_RELEASE.read_text(errors="replace"))
    return L4T_TO_JETPACK.get(m.group(1)) if m else None


def _power_mode() -> str | None:
    exe = shutil.which("nvpmodel")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"NV Power Mode:\s*(\S+)", out)
    return m.group(1) if m else None


def check(profile: DeviceProfile, gpu: tuple[str, str] | None | bool = True, jetpack: str | None | bool = True,
          power: str | None | bool = True) -> list[str]:
    """One line per mismatch between the profile and this machine (arguments: for tests)."""
    gpu = _gpu() if gpu is True else gpu or None
    jetpack = _jetpack_major() if jetpack is True else jetpack or None
    power = _power_mode() if power is True else power or None
    out: list[str] = []
    # A profile's GPU that torch does not see is the device policy's line (fl_lm.device.resolve:
    # one warning, then the CPU), said where the student is placed, not twice.
    if profile.compute_capability and gpu is not None:
        cc, cuda = gpu
        if cc != profile.compute_capability:
            out.append(f"profile {profile.name} is for compute capability {profile.compute_capability}, this GPU is {cc}")
        if cuda and cuda.split(".")[:2] != profile.cuda.split(".")[:2]:
            out.append(f"profile {profile.name} expects CUDA {profile.cuda}; torch was built for CUDA {cuda}")
    elif not profile.compute_capability and gpu is not None:
        out.append(f"profile {profile.name} plans for the CPU, but this machine has a CUDA GPU ({gpu[0]}): "
                   "pick the profile of this device")
    if profile.jetpack and jetpack is not None and jetpack != profile.jetpack.split(".")[0]:
        out.append(f"profile {profile.name} is for JetPack {profile.jetpack}; this Jetson runs JetPack {jetpack}.x")
    if profile.jetpack and power is not None and profile.power_mode and profile.power_mode.lower() not in power.lower():
        out.append(f"profile {profile.name} assumes power mode {profile.power_mode}; nvpmodel reports {power}: "
                   "rounds will take longer than planned")
    return out
