"""Keys (internal): numpy-style keys translated into plain read plans, and chains of keys."""
