"""relayd: self-hosted secure relay and zero-trust access gateway."""

__version__ = "0.1.0"
