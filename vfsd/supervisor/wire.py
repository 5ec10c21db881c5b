"""What several parts of the supervisor read of the wire: the hiprio queue's index, the
head of a request, and how kick fds are watched."""

import select
import struct

from vfsd.fuse import abi

HIPRIO = 0
IN_SIZE = abi.IN_HEADER_38.size  # 40: where the body (and an fh-carrying op's fh) starts
IN_PREFIX = struct.Struct("<IIQQ")  # len, opcode, unique, nodeid: the head of the header
# Edge-triggered eventfds are never read: a u64 counter bumped by 1 per write cannot overflow.
EDGE = select.EPOLLIN | select.EPOLLET
