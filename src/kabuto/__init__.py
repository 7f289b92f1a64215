"""Kabuto: containers in lightweight VMs, with the VMM chosen by configuration."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # lazy: the guest imports this package too and must not pull in the host runtime
    if name in ("Sandbox", "AsyncSandbox", "RunResult"):
        from kabuto import api

        return getattr(api, name)
    raise AttributeError(f"module 'kabuto' has no attribute {name!r}")
