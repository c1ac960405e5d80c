"""The one error that stops the server or a command: a value it cannot run with, named in one line.

config.py raises it for a bad setting, and the package for what a setting or an argument names
(a HISTORY_DB file it cannot open, a device name it refuses): here, below both, because the
package never imports config. app.py, gunicorn.conf.py and `python config.py` turn it into
`config error: ...` and an exit code.
"""


class ConfigError(ValueError):
    """A setting or an argument with a value the server cannot run with; the message names it."""
