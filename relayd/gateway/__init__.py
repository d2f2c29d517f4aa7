"""The node's gateway: which agents are connected (``registry``) and the one
place every way in opens a stream to one of them (``streams``)."""
