"""Pushes from agents: POST /push-sse, the checks every push passes, and the rate limits (in this process or in Redis)."""
