"""Generated protobuf modules (see generate.py) and the names of the agent's ttrpc services.

The names are plain strings, so that naming a service does not import its messages (the guest
loads ContainerService's in the background while it already answers Check); a unit test holds
them to the .proto files' descriptors.
"""

AGENT_SERVICE = "kabuto.agent.v1.AgentService"
CONTAINER_SERVICE = "kabuto.agent.v1.ContainerService"
