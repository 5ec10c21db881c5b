"""Passthrough file system: FUSE ops on a host directory (virtiofsd's src/passthrough split).

- fs.py          PassthroughFs: the ops (python values in, stat results / OSError out)
- filesystem.py  FileSystem contract with ENOSYS defaults, result types
- inodes.py      per-worker nodeid -> O_PATH fd cache, revalidated against the shared table
- handles.py     fh table (open files, dir streams) with owner-encoded fhs
- file_handle.py name_to_handle_at / open_by_handle_at, mount fds keyed by mnt_id
- creds.py       scoped euid/egid switch for creating ops
- names.py       name validation
- syscalls.py    the few syscalls os lacks (ctypes)
"""
