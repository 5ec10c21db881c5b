"""The supervisor process: one class, `Supervisor`, assembled from one module per concern
(see `arbiter.py` for the loop and `state.py` for what the parts share)."""

from vfsd.supervisor.arbiter import Supervisor
from vfsd.supervisor.startup import StartupError

__all__ = ["StartupError", "Supervisor"]
