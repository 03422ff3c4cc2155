"""The command line's tools (internal): info, bench and tune, their timing harness and advice."""
