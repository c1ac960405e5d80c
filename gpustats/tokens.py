"""Secrets the server hands out (device keys, API tokens, share links): how one is made, and how it is kept.

A secret is 192 random bits, URL-safe, shown once; the server keeps only its SHA-256 digest
and its first PREFIX_CHARS characters, to tell secrets apart in a list.
"""
import hashlib
import secrets

PREFIX_CHARS = 6


def new_secret():
    """Return a fresh secret: 192 random bits, URL-safe (what `python config.py --new-key` prints)."""
    return secrets.token_urlsafe(24)


def digest(secret):
    """Return how a secret is kept: its SHA-256, hex."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()
