"""Data: playing Procgen (collect), the sharded on-disk store, and the clip loader."""
