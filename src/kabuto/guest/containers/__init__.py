"""ContainerService: OCI containers inside the guest (namespaces, pivot_root, stdio).

Imports only the standard library, google.protobuf, kabuto.ttrpc and kabuto.protos, like
the rest of the guest agent.
"""

from kabuto.guest.containers.service import ContainerService

__all__ = ["ContainerService"]
