"""The Reader's internals: requests, their stages and futures, dataset proxies and lent results."""
