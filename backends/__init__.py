"""Storage backends behind one contract (``base.Backend``).

``BACKENDS`` lists every backend pyvol knows; ``available()`` says which this host can run.
The default is the first available in PREFERENCE: dm-thin where the kernel has it, else loop.
"""

from .base import Backend, BlockBackend, DirectoryBackend, VolumeSpec
from .devicemapper import DevicemapperBackend
from .ebs import EbsBackend
from .loop import LoopBackend
from .nfs import NfsBackend

BACKENDS: dict[str, type[Backend]] = {
    DevicemapperBackend.name: DevicemapperBackend,
    LoopBackend.name: LoopBackend,
    NfsBackend.name: NfsBackend,
    EbsBackend.name: EbsBackend,
}

PREFERENCE = ["devicemapper", "loop"]


def default_name() -> str | None:
    for name in PREFERENCE:
        cls = BACKENDS.get(name)
        if cls is not None and cls.unavailable_reason() is None:
            return name
    return None


__all__ = ["BACKENDS", "PREFERENCE", "Backend", "BlockBackend", "DirectoryBackend", "VolumeSpec",
           "default_name"]
