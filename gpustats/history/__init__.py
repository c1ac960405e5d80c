"""History: the tiers kept and how pushes become buckets (tiers.py), the SQLite and Redis stores, GET /api/history."""
