"""The sans-I/O core: bytes in, events and bytes out. No sockets, no clock."""
