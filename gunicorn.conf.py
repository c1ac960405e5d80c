"""gunicorn reads this file from its working directory: settings that must come from config.py.

The Procfile's shell sees only the real environment, so a value in `.env` would never
reach a command-line flag. Here gunicorn gets the same WORKER_CONNECTIONS that the app
checks MAX_SUBSCRIBERS against, wherever it was set.
"""
from config import ConfigError, load_config

try:
    worker_connections = load_config().worker_connections
except ConfigError:
    pass  # the worker's wsgi_app() names the bad setting in one line and stops the server
