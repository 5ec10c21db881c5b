"""A full memory barrier for code that shares memory with another process or the guest.

CPython has no fence primitive. Taking and releasing an uncontended `threading.Lock` runs
`lock`-prefixed atomics (sem_trywait/sem_post CAS), which order store->load on x86 — the only
reordering x86 does, and the one the virtqueue and ring sleep protocols must prevent.
"""

import threading

_fence_lock = threading.Lock()


def full_fence() -> None:
    _fence_lock.acquire()
    _fence_lock.release()
