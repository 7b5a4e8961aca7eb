"""API keys: shown once, stored as a hash, revocable, found by hash only."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import KeyNotFound
from service.keys import (
    KEY_SCHEME,
    PREFIX_LENGTH,
    authenticate,
    create_key,
    hash_key,
    list_keys,
    revoke_key,
)
from service.models import ApiKey


def owner() -> str:
    return f"keys-{uuid.uuid4().hex[:10]}"


def test_key_is_stored_as_a_hash_with_a_prefix(db_session: Session) -> None:
    plaintext, row = create_key(db_session, owner="  alice-team  ")
    db_session.commit()

    assert plaintext.startswith(KEY_SCHEME) and len(plaintext) > 40
    assert row.owner == "alice-team"
    assert row.prefix == plaintext[:PREFIX_LENGTH]
    assert row.key_hash == hashlib.sha256(plaintext.encode()).hexdigest()
    stored = db_session.scalar(select(ApiKey).where(ApiKey.id == row.id))
    assert stored is not None
    assert plaintext not in {stored.owner, stored.prefix, stored.key_hash}


def test_authenticate_accepts_only_the_exact_active_key(db_session: Session) -> None:
    plaintext, row = create_key(db_session, owner=owner())
    db_session.commit()

    found = authenticate(db_session, plaintext)
    assert found is not None and found.id == row.id
    for wrong in ("", plaintext[:-1], plaintext + "x", plaintext.upper(), row.key_hash,
                  row.prefix, "x" * 10_000):
        assert authenticate(db_session, wrong) is None


def test_revoked_key_stops_working(db_session: Session) -> None:
    plaintext, row = create_key(db_session, owner=owner())
    db_session.commit()

    revoked = revoke_key(db_session, key_id=row.id)
    db_session.commit()
    first_revocation = revoked.revoked_at
    again = revoke_key(db_session, prefix=row.prefix)  # revoking twice changes nothing

    assert first_revocation is not None and again.revoked_at == first_revocation
    assert authenticate(db_session, plaintext) is None


def test_revoke_by_id_string_and_by_prefix(db_session: Session) -> None:
    by_id_key, by_id = create_key(db_session, owner=owner())
    by_prefix_key, by_prefix = create_key(db_session, owner=owner())

    revoke_key(db_session, key_id=str(by_id.id))
    revoke_key(db_session, prefix=by_prefix.prefix)
    db_session.commit()

    assert authenticate(db_session, by_id_key) is None
    assert authenticate(db_session, by_prefix_key) is None


@pytest.mark.parametrize("target", [{"key_id": str(uuid.uuid4())}, {"key_id": "not-a-uuid"},
                                    {"prefix": "glr_nothing1"}])
def test_revoking_an_unknown_key_is_key_not_found(db_session: Session,
                                                  target: dict[str, str]) -> None:
    with pytest.raises(KeyNotFound) as info:
        revoke_key(db_session, **target)  # type: ignore[arg-type]
    assert info.value.code == "key_not_found"


def test_ambiguous_prefix_is_refused(db_session: Session) -> None:
    shared = f"glr_{uuid.uuid4().hex[:8]}"
    rows = [ApiKey(owner=owner(), prefix=shared, key_hash=hash_key(f"{shared}-{i}"))
            for i in range(2)]
    db_session.add_all(rows)
    db_session.commit()

    with pytest.raises(KeyNotFound, match="matches 2 keys"):
        revoke_key(db_session, prefix=shared)
    assert all(row.revoked_at is None for row in rows)


def test_revoke_needs_exactly_one_target(db_session: Session) -> None:
    with pytest.raises(ValueError):
        revoke_key(db_session)
    with pytest.raises(ValueError):
        revoke_key(db_session, key_id=uuid.uuid4(), prefix="glr_x")


@pytest.mark.parametrize("bad_owner", ["", "   ", "o" * 129])
def test_owner_must_be_1_to_128_characters(db_session: Session, bad_owner: str) -> None:
    with pytest.raises(ValueError, match="owner"):
        create_key(db_session, owner=bad_owner)


def test_list_keys_oldest_first_and_by_owner(db_session: Session) -> None:
    mine, theirs = owner(), owner()
    first = create_key(db_session, owner=mine)[1]
    second = create_key(db_session, owner=mine)[1]
    create_key(db_session, owner=theirs)
    db_session.commit()

    listed = list_keys(db_session, owner=mine)

    assert [key.id for key in listed] == [first.id, second.id]
    assert {key.owner for key in list_keys(db_session)} >= {mine, theirs}


def test_keys_are_unique(db_session: Session) -> None:
    name = owner()
    plaintexts = {create_key(db_session, owner=name)[0] for _ in range(200)}
    db_session.commit()
    assert len(plaintexts) == 200
    assert len({key.prefix for key in list_keys(db_session, owner=name)}) == 200
