"""Peak memory of a region of code: resident set size on Linux CPU, allocator peak on CUDA."""
from __future__ import annotations

from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_mib`` and ``m.base_mib`` (the usage on entry);
    both None where they cannot be measured.

    CPU: the process's peak resident set during the region (the kernel's high-water mark is reset on
    entry through /proc/self/clear_refs), which includes what the process already held. CUDA: the
    allocator's peak during the region.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.source = "cuda" if torch.device(device).type == "cuda" else "rss"  # None: cannot be measured here
        self.peak_mib: float | None = None
        self.base_mib: float | None = None

    def __enter__(self) -> "PeakMemory":
        if self.source == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_mib = torch.cuda.memory_allocated() / 2**20
        else:
            try:
                _CLEAR_REFS.write_text("5")  # resets VmHWM to the current VmRSS
                self.base_mib = _status_kib("VmRSS") / 1024
            except OSError:  # not Linux, or not permitted
                self.source = None
        return self

    def __exit__(self, *exc) -> None:
        if self.source == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        elif self.source == "rss":
            self.peak_mib = _status_kib("VmHWM") / 1024
