"""Which kernel and root image a VM boots: the configuration's own, else the built image."""

from __future__ import annotations

from kabuto.config.model import HypervisorConfig
from kabuto.errors import ImageError
from kabuto.image.cache import installed_image


def boot_paths(table: HypervisorConfig | None = None) -> dict[str, str]:
    """``{"kernel": ..., "initrd": ...}`` (or ``"image"``) of what a VM boots.

    As in the hypervisor plugins' ``adjust``: a table that names any of ``kernel``, ``initrd``
    or ``image`` boots exactly those; only a table naming none boots the built image.
    """
    if table is not None and (table.kernel or table.initrd or table.image):
        named = {"kernel": table.kernel, "initrd": table.initrd, "image": table.image}
        return {"kernel": table.kernel} | {name: value for name, value in named.items() if value}
    built = installed_image()
    if built is None:
        raise ImageError("no guest image is built yet: run `kabuto image build` (or `make image`), "
                         "or set kernel and initrd (or image) in the hypervisor's configuration")
    return {"kernel": str(built.kernel), "initrd": str(built.initrd)}
