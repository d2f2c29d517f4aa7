"""The relay node: its composition root (``node``), the agent registry
(``registry``), the one place every way in opens a stream to an agent
(``streams``), and one module per way in (``agents``, ``tcp``; HTTP requests
come through the HTTPS front door in relayd.net)."""
