"""The engine (internal): worker processes, shared memory, the ring of slots, and the error box."""
