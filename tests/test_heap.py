"""add-task returns what its heap holds unused to the system while it runs (cl_serve.base.heap.HeapTrimmer)."""
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, sys, time
    from cl_serve.base.heap import HeapTrimmer

    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    blocks = [libc.malloc(96 << 10) for _ in range(4000)]  # 375 MiB of 96-KiB blocks: heap, not mmap
    for b in blocks:
        libc.memset(b, 1, 96 << 10)
    for i, b in enumerate(blocks):
        if i % 50:  # free 98 %; every 50th block stays live, so the free space is not at the heap's top
            libc.free(b)
    held = rss_mib()
    if sys.argv[1] == "trim":
        with HeapTrimmer(interval_s=0.05) as trimmer:
            time.sleep(0.5)
            print(held, rss_mib(), trimmer.trims)
    else:  # glibc on its own
        time.sleep(0.5)
        print(held, rss_mib(), 0)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.parametrize("mode", ["trim", "none"])
def test_free_pages_inside_the_heap_go_back_to_the_system(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    held, after, trims = out.stdout.split()
    held, after = float(held), float(after)
    if mode == "trim":  # ~368 MiB freed inside the heap is returned within the interval
        assert held - after > 300 and int(trims) >= 2, out.stdout
    else:  # glibc alone keeps it (its own trim only releases the heap's top)
        assert held - after < 50, out.stdout


def test_the_trimmer_says_what_it_did():
    from cl_serve.base.heap import HeapTrimmer

    with HeapTrimmer(interval_s=60) as t:
        pass
    assert t.describe() == "malloc_trim every 60 s (1 so far)"  # the final trim on exit
    with pytest.raises(ValueError):
        HeapTrimmer(interval_s=0)
