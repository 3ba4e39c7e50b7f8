"""What the CPU benchmarks record about the machine they ran on."""
import platform


def cpu_name() -> str:
    """The processor's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."): the CPU benchmarks' times
    depend on it (AVX2 or AVX-512 versions of the row loops, the BLAS's code path)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
