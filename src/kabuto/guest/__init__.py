"""Kabuto's guest agent: runs inside the VM, as PID 1, and serves AgentService over ttrpc.

Imports only the standard library, google.protobuf, kabuto.errors, kabuto.ttrpc,
kabuto.protos and this package, so the guest image carries just those.
"""
