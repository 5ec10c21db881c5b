"""The tests' FUSE request builder and client: the one in `vfsd.frontend.fuse_client`
(shared with `vfsd bench`), re-exported under the name the tests have always used."""

from vfsd.frontend.fuse_client import (
    INIT_FLAGS2_61,
    INIT_FLAGS_61,
    Dirent,
    FuseClient,
    Reply,
    attr,
    buffers,
    build,
    chunks,
    entry,
    joined,
    open_fh,
    parse_dirents,
    secctx_ext,
)

__all__ = [
    "INIT_FLAGS2_61", "INIT_FLAGS_61", "Dirent", "FuseClient", "Reply", "attr", "buffers",
    "build", "chunks", "entry", "joined", "open_fh", "parse_dirents", "secctx_ext",
]
