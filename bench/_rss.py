"""Peak resident memory of a call, for the benchmarks that report peak memory (Linux /proc).

Run the measured process with a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_=131072):
with the default dynamic one, freed tensor buffers stay in the heap and the RSS overstates live
memory by tens of MB at random.
"""
from __future__ import annotations

import gc
import resource
import threading


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_growth(fn, period_s: float = 0.005):
    """(fn(), peak RSS above the RSS before it, in bytes), the RSS sampled every period_s."""
    gc.collect()
    before = current_rss()
    peak, done = [before], threading.Event()

    def sample():
        while not done.wait(period_s):
            peak[0] = max(peak[0], current_rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return result, max(peak[0], current_rss()) - before
