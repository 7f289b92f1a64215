"""containerd shim v2 for Kabuto: runtime type ``io.containerd.kabuto.v2``.

One shim process (and one VM) per pod: containerd starts ``containerd-shim-kabuto-v2 ... start``,
which answers with the ttrpc address of the pod's shim, spawning it first if the pod has none.
The shim serves ``containerd.task.v2.Task`` with kabuto.ttrpc and publishes task events back
to containerd over its ttrpc events service.
"""
