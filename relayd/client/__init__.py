"""Clients of relayd's services that are not the agent: hybrid connections (hybrid)."""
