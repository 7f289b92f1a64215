"""Dragonball: Kata's in-process VMM. Plugin and binding seam; no binding exists yet."""

from kabuto.hypervisor.dragonball.binding import DragonballBinding, register_binding
from kabuto.hypervisor.dragonball.plugin import CAPABILITIES, DragonballPlugin, plugin

__all__ = ["CAPABILITIES", "DragonballBinding", "DragonballPlugin", "plugin", "register_binding"]
