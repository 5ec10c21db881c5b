"""Wire layouts of vhost-user and of the split virtqueue, declared once.

Sources (see ../shared/PROTOCOLS.md A.1-A.4, B.1, B.4): QEMU `docs/interop/vhost-user.rst`
and `hw/virtio/vhost-user.c` (7.2), rust-vmm `vhost/src/vhost_user/message.rs`, Linux
`include/uapi/linux/virtio_ring.h`. vhost-user uses host byte order (LE on x86-64); virtio 1.x
rings are LE. No format string appears anywhere else in the transport layer.
"""

from __future__ import annotations

import struct
from enum import IntEnum


class VhostUserRequest(IntEnum):
    """Front-end -> back-end request ids (QEMU 7.2 `enum VhostUserRequest`)."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_SLAVE_REQ_FD = 21  # a.k.a. SET_BACKEND_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


# -- header (A.1) ----------------------------------------------------------------------------
HEADER = struct.Struct("<III")  # request, flags, size
HEADER_SIZE = HEADER.size  # 12

FLAG_VERSION = 0x1  # bits 0-1: protocol version, always 1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4  # set on every back-end reply
FLAG_NEED_REPLY = 0x8  # front-end asks for an ack (meaningful with REPLY_ACK only)
FLAGS_KNOWN = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY
REPLY_FLAGS = FLAG_VERSION | FLAG_REPLY  # QEMU 7.2 accepts exactly 0x5 on replies

# Largest payload we accept (rust-vmm MAX_MSG_SIZE); a memory table with 8 regions is 264.
MAX_PAYLOAD_SIZE = 0x1000
# fds per message: SET_MEM_TABLE carries up to VHOST_MEMORY_BASELINE_NREGIONS.
MAX_FDS = 8
MAX_MEM_TABLE_REGIONS = 8

# -- payloads (A.2) --------------------------------------------------------------------------
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
# index, flags, desc_user_addr, used_user_addr, avail_user_addr, log_guest_addr (desc, USED, avail)
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_TABLE_HEADER = struct.Struct("<II")  # nregions, padding
MEM_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
SINGLE_MEM_REGION = struct.Struct("<QQQQQ")  # padding, then one MEM_REGION
VHOST_LOG = struct.Struct("<QQ")  # mmap_size, mmap_offset

VRING_IDX_MASK = 0xFF  # vring-file payload bits 0-7: queue index
VRING_NOFD_MASK = 0x100  # bit 8: no fd attached (kick: poll; call: don't signal)
VRING_FILE_KNOWN = VRING_IDX_MASK | VRING_NOFD_MASK

VHOST_VRING_F_LOG = 0x1  # SET_VRING_ADDR flags bit 0: log used-ring writes (migration)

# -- virtio feature bits (B.4, A.3) ----------------------------------------------------------
VIRTIO_F_NOTIFY_ON_EMPTY = 1 << 24
VIRTIO_F_ANY_LAYOUT = 1 << 27
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_ACCESS_PLATFORM = 1 << 33
VIRTIO_F_RING_PACKED = 1 << 34
VIRTIO_F_IN_ORDER = 1 << 35
VIRTIO_F_ORDER_PLATFORM = 1 << 36
VIRTIO_F_SR_IOV = 1 << 37
VIRTIO_F_NOTIFICATION_DATA = 1 << 38
VIRTIO_F_RING_RESET = 1 << 40
VHOST_F_LOG_ALL = 1 << 26

# -- vhost-user protocol feature bits (A.3) --------------------------------------------------
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_LOG_SHMFD = 1 << 1
PROTOCOL_F_RARP = 1 << 2
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_MTU = 1 << 4
PROTOCOL_F_SLAVE_REQ = 1 << 5
PROTOCOL_F_CROSS_ENDIAN = 1 << 6
PROTOCOL_F_CRYPTO_SESSION = 1 << 7
PROTOCOL_F_PAGEFAULT = 1 << 8
PROTOCOL_F_CONFIG = 1 << 9
PROTOCOL_F_SLAVE_SEND_FD = 1 << 10
PROTOCOL_F_HOST_NOTIFIER = 1 << 11
PROTOCOL_F_INFLIGHT_SHMFD = 1 << 12
PROTOCOL_F_RESET_DEVICE = 1 << 13
PROTOCOL_F_INBAND_NOTIFICATIONS = 1 << 14
PROTOCOL_F_CONFIGURE_MEM_SLOTS = 1 << 15
PROTOCOL_F_STATUS = 1 << 16
PROTOCOL_FEATURES_QEMU72_MASK = (1 << 17) - 1  # QEMU 7.2 knows bits 0-16

# -- split virtqueue (B.1) -------------------------------------------------------------------
DESC = struct.Struct("<QIHH")  # addr (guest-physical), len, flags, next
DESC_SIZE = DESC.size  # 16
USED_ELEM = struct.Struct("<II")  # id (head), len (bytes written)

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
MAX_QUEUE_SIZE = 32768  # spec limit; QEMU allows <= 1024 (VIRTQUEUE_MAX_SIZE)


def desc_table_size(queue_size: int) -> int:
    return DESC_SIZE * queue_size


def avail_ring_size(queue_size: int) -> int:
    """flags, idx, ring[queue_size], used_event (always counted: harmless without EVENT_IDX)."""
    return 6 + 2 * queue_size


def used_ring_size(queue_size: int) -> int:
    """flags, idx, ring[queue_size] of (id, len), avail_event."""
    return 6 + 8 * queue_size
