"""`python config.py --add-user NAME --role R`, `--add-token NAME --role R`, `--list-users`: on the server's store."""
import sys

from gpustats.access.accounts import AccountError, Hasher, check_name, check_password, check_role
from gpustats.access.redis import RedisAccounts
from gpustats.access.sqlite import SqliteAccounts
from gpustats.command_line import open_store, option
from gpustats.errors import ConfigError
from gpustats.tokens import PREFIX_CHARS, digest, new_secret


def _read_password(name, stdin=sys.stdin):
    """Ask for a new password twice at a terminal (never on the command line), or read one line from a pipe."""
    if not stdin.isatty():
        return stdin.readline().rstrip("\n")
    import getpass
    first = getpass.getpass(f"Password for {name} (12 characters or more): ")
    if getpass.getpass("Again: ") != first:
        raise ConfigError("the two passwords differ")
    return first


def accounts_command(argv, config, out=sys.stdout):
    """Run --add-user NAME --role R, --add-token NAME --role R, or --list-users against the server's store."""
    store = open_store(config, "accounts", RedisAccounts, SqliteAccounts)
    try:
        if "--list-users" in argv:
            for user in store.users():
                print(f"user   {user['name']:<24} {user['role']}", file=out)
            for kind in ("token", "share"):
                for found in store.credentials(kind):
                    last = "never used" if not found["lastUsedAt"] else f"last used {int(found['lastUsedAt'])}"
                    what = found["role"] if kind == "token" else ",".join(found["devices"] or ["every device"])
                    print(f"{kind:<6} {found['name']:<24} {what} {found['prefix']}... id {found['id']}, {last}",
                          file=out)
            return 0
        flag = "--add-user" if "--add-user" in argv else "--add-token"
        name, role = check_name(option(argv, flag)), check_role(option(argv, "--role", "viewer"))
        if flag == "--add-user":
            store.add_user(name, role, Hasher().hash(check_password(_read_password(name))))
            print(f"Added the user {name} ({role}); the running server knows it within a second.", file=out)
        else:
            secret = new_secret()
            store.add_credential("token", name, role, digest(secret), secret[:PREFIX_CHARS])
            print(f"API token {name} ({role}), shown this once: {secret}", file=out)
        return 0
    except AccountError as problem:
        raise ConfigError(str(problem)) from None
