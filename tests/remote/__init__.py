"""Front doors and tools on files in object stores (HTTP, S3)."""
