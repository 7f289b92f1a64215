"""Host-side client of the guest agent."""

from kabuto.agent.address import AgentAddress, parse_agent_address
from kabuto.agent.client import AgentClient, GuestDetails, wait_for_agent

__all__ = ["AgentAddress", "AgentClient", "GuestDetails", "parse_agent_address", "wait_for_agent"]
