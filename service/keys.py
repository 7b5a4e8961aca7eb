"""API keys: created once in plaintext, stored as a sha256 hash, revocable."""

from __future__ import annotations

import hashlib
import secrets
import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import KeyNotFound
from service.models import ApiKey, utcnow

KEY_SCHEME = "glr_"
PREFIX_LENGTH = 12  # "glr_" + 8 characters: enough to tell keys apart in a listing


def hash_key(plaintext: str) -> str:
    """The sha256 hex digest stored for a key."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def create_key(session: Session, *, owner: str) -> tuple[str, ApiKey]:
    """Create a key for `owner`; returns the plaintext (shown once) and the stored row."""
    owner = owner.strip()
    if not owner or len(owner) > 128:
        raise ValueError("owner must be 1 to 128 characters")
    plaintext = KEY_SCHEME + secrets.token_urlsafe(32)
    key = ApiKey(owner=owner, prefix=plaintext[:PREFIX_LENGTH], key_hash=hash_key(plaintext))
    session.add(key)
    session.flush()
    return plaintext, key


def authenticate(session: Session, plaintext: str) -> ApiKey | None:
    """The active key matching `plaintext`, or None (unknown or revoked)."""
    if not plaintext or len(plaintext) > 256:
        return None
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext)))
    if key is None or key.revoked_at is not None:
        return None
    return key


def list_keys(session: Session, *, owner: str | None = None) -> list[ApiKey]:
    """Keys, oldest first, optionally only one owner's."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if owner is not None:
        query = query.where(ApiKey.owner == owner)
    return list(session.scalars(query))


def revoke_key(session: Session, *, key_id: uuid.UUID | str | None = None,
               prefix: str | None = None) -> ApiKey:
    """Revoke one key by id or by its prefix; a revoked key stops working at once."""
    if (key_id is None) == (prefix is None):
        raise ValueError("give exactly one of key_id or prefix")
    if key_id is not None:
        try:
            wanted = key_id if isinstance(key_id, uuid.UUID) else uuid.UUID(str(key_id))
        except ValueError as exc:
            raise KeyNotFound(f"no API key with id {key_id!r}") from exc
        matches = list(session.scalars(select(ApiKey).where(ApiKey.id == wanted)))
    else:
        matches = list(session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)))
    if not matches:
        raise KeyNotFound(f"no API key matches {key_id or prefix!r}")
    if len(matches) > 1:
        raise KeyNotFound(f"prefix {prefix!r} matches {len(matches)} keys; revoke by id")
    key = matches[0]
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key
