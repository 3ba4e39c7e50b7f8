"""Process memory readings shared by the CPU benchmarks (Linux /proc; ru_maxrss elsewhere)."""
import resource
import sys


def proc_status_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM, VmSize, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the process's peak resident size (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def ru_maxrss_bytes() -> int:
    """Peak resident size over the process's life (cannot be reset)."""
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def return_freed_memory_to_os() -> None:
    """Make glibc malloc hand freed blocks back to the OS (and hand back what it holds now), so
    that a peak-RSS reading counts every byte a call allocates instead of reusing pages an
    earlier round left resident. It costs time (fresh pages fault in): time calls without it."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)  # fixed: also disables the dynamic threshold
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
