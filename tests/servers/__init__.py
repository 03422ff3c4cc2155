"""Servers the tests start on 127.0.0.1: our HTTP range server and ``rclone serve s3``."""
