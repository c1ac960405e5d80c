"""Credentials in a request's headers: a device's key, and the optional viewer login, compared in constant time."""
import base64
import binascii
import hashlib
import hmac


def _digest(secret):
    # Comparing fixed-length digests keeps compare_digest from leaking a name's or a password's length.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def presented_key(authorization, api_key):
    """Return the key from an `Authorization: Bearer` header's value, else from an `X-API-Key` header's, or None."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return api_key.strip() or None


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
