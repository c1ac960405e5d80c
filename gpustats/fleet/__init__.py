"""Every device's latest state and status: in this process (memory.py), or shared through Redis (redis.py)."""
