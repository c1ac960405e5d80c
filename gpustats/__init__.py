"""The GPU Stats Dashboard server's parts, a folder per capability; app.py puts them together (docs/ARCHITECTURE.md)."""
