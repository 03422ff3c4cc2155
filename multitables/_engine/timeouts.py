"""Every timeout of the engine, in seconds, in one place (internal).

Read them as ``timeouts.WAIT_SLICE`` where they are used, not copied by value at import, so that
a test or a user who changes one changes it everywhere. See NOTE [ Worker shutdown logic ] in
:mod:`multitables._engine.pool`.
"""

# Longest a wait sleeps before checking its peers.
WAIT_SLICE = 0.1
# Longest a consumer goes without checking its workers, even while results keep coming.
CHECK_INTERVAL = 0.5
# How long stopping waits for workers to finish on their own before killing them.
JOIN_TIMEOUT = 2.0
# How long a stop that does not wait (Reader.close(wait=False)) lets a worker end its read.
STOP_GRACE = 0.2
# An idle worker blocks on its channel (EOF tells it its parent is gone) and checks the parent's
# sentinel this often besides, for the rare process that kept a copy of the parent's end.
IDLE_CHECK = 1.0
