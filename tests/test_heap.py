"""add-task fixes glibc's mmap threshold so that freed batch buffers go back to the system (cl_serve.base.heap)."""
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, sys
    from cl_serve.base.heap import map_large_blocks

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "fixed":
        print(map_large_blocks(), file=sys.stderr)
    libc.free(libc.malloc(8 << 20))  # glibc raises its threshold to 8 MiB here, unless it is fixed
    before = libc.mallinfo2().hblks  # blocks that have their own mapping
    p = libc.malloc(2 << 20)
    print(libc.mallinfo2().hblks - before)
    libc.free(p)
""")


def _mapped_blocks(mode: str, env=None) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_batches_are_returned_not_kept_in_the_heap():
    # glibc's default: after an 8 MiB block is freed, a 2 MiB batch comes from the heap (and stays there)
    assert _mapped_blocks("default") == 0
    # fixed at 1 MiB: the 2 MiB batch has its own mapping, unmapped when freed
    assert _mapped_blocks("fixed") == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_users_own_setting_is_kept(monkeypatch):
    import os

    from cl_serve.base.heap import map_large_blocks

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(64 << 20))
    assert map_large_blocks() == f"MALLOC_MMAP_THRESHOLD_={64 << 20} (environment)"
    env = {**os.environ}
    assert _mapped_blocks("fixed", env) == 0  # 64 MiB from the environment: the 2 MiB batch stays in the heap
