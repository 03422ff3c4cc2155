"""The Loader's internals: the epoch's order, the consumer's reads and the workers' job."""
