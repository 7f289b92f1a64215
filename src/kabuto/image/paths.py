"""Which kernel and root image a VM boots: the configuration's own, else the built image."""

from __future__ import annotations

from kabuto.config.model import HypervisorConfig
from kabuto.errors import ImageError
from kabuto.image.builder import installed_image


def boot_paths(table: HypervisorConfig | None = None) -> dict[str, str]:
    """``{"kernel": ..., "initrd": ...}`` or ``{"kernel": ..., "image": ...}``.

    A hypervisor table's ``kernel``, ``image`` or ``initrd`` wins over the built image; the
    built one fills only what the table leaves empty, and is needed only then.
    """
    kernel = table.kernel if table else ""
    image = table.image if table else ""
    initrd = table.initrd if table else ""
    if not kernel or not (image or initrd):
        built = installed_image()
        if built is None:
            raise ImageError("no guest image is built yet: run `kabuto image build` (or `make image`), "
                             "or set kernel and initrd/image in the hypervisor's configuration")
        kernel = kernel or str(built.kernel)
        if not (image or initrd):
            initrd = str(built.initrd)
    return {"kernel": kernel, "image": image} if image else {"kernel": kernel, "initrd": initrd}
