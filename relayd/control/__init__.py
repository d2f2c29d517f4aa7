"""relayd's control plane: CA, join tokens, storage (pure Python, no event loop)."""
