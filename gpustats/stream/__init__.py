"""The live stream: the broadcaster's ring, the fan-out to caught-up viewers, SSE framing, and GET /gpu/stream."""
