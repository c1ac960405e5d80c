"""Device keys for pushes and the optional viewer login, compared in constant time."""
import base64
import binascii
import hashlib
import hmac


def _digest(secret):
    # Comparing fixed-length digests keeps compare_digest from leaking a key's length.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class DeviceKeys:
    """Map a presented key to the device it belongs to."""

    def __init__(self, keys):
        self._keys = [(_digest(key), device) for key, device in keys.items()]

    def __bool__(self):
        return bool(self._keys)

    def device_for(self, key):
        """Return the device name for `key`, or None; every stored key is compared."""
        presented, found = _digest(key), None
        for digest, device in self._keys:
            if hmac.compare_digest(presented, digest):
                found = device
        return found


def presented_key(headers):
    """Return the key from `Authorization: Bearer` or `X-API-Key`, or None."""
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("X-API-Key", "").strip() or None


def basic_login(header):
    """Return (user, password) from an `Authorization: Basic` header, or None."""
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def same_login(user, password, want_user, want_password):
    """Return whether user and password are the ones wanted, compared in constant time."""
    user_ok = hmac.compare_digest(_digest(user), _digest(want_user))
    password_ok = hmac.compare_digest(_digest(password), _digest(want_password))
    return user_ok and password_ok


def viewer_allowed(header, user, password):
    """Return whether an `Authorization: Basic` header carries the viewer login."""
    login = basic_login(header)
    return login is not None and same_login(*login, user, password)
