"""The Streamer's internals: the stream's plan and the workers' job."""
