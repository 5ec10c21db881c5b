"""vhost-user front-end (the role of QEMU + the guest's virtio driver), for tests and bench."""

from vfsd.frontend.vhost_client import (
    Completion,
    DriverQueue,
    FrontendError,
    GuestRam,
    VhostUserClient,
)

__all__ = ["Completion", "DriverQueue", "FrontendError", "GuestRam", "VhostUserClient"]
