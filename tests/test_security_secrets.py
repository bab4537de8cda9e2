"""Envelope-encrypted secrets: per-secret data keys wrapped by a KEK, KEK rotation, no plaintext
anywhere in the file, errors or reprs, and the log filter that masks tokens and keys."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from security.secrets import KEK_ENV, Kek, MaskingFilter, SecretError, SecretStore, load_kek, mask

PLANTED = "sk-cloudru-PLANTED-secret-0001"


def test_put_get_survives_a_reload_and_the_file_holds_no_plaintext(tmp_path) -> None:
    kek = Kek.generate()
    store = SecretStore(tmp_path / "secrets.json", kek=kek)
    store.put("cloudru_api_key", PLANTED)
    text = (tmp_path / "secrets.json").read_text()
    assert PLANTED not in text and kek.encoded() not in text
    assert stat.S_IMODE(os.stat(tmp_path / "secrets.json").st_mode) == 0o600
    reloaded = SecretStore(tmp_path / "secrets.json", kek=kek)
    assert reloaded.get("cloudru_api_key") == PLANTED and reloaded.names() == ["cloudru_api_key"]
    assert PLANTED not in repr(reloaded) and kek.encoded() not in repr(kek)


def test_a_wrong_kek_tampering_or_a_moved_ciphertext_does_not_decrypt(tmp_path) -> None:
    kek = Kek.generate()
    store = SecretStore(tmp_path / "s.json", kek=kek)
    store.put("a", "alpha-value")
    store.put("b", "bravo-value")
    with pytest.raises(SecretError, match="wrapped by KEK"):
        SecretStore(tmp_path / "s.json", kek=Kek.generate()).get("a")
    document = json.loads((tmp_path / "s.json").read_text())
    document["secrets"]["b"]["ciphertext"] = document["secrets"]["a"]["ciphertext"]     # moved to another name
    (tmp_path / "s.json").write_text(json.dumps(document))
    with pytest.raises(SecretError, match="does not decrypt") as failure:
        SecretStore(tmp_path / "s.json", kek=kek).get("b")
    assert "alpha-value" not in str(failure.value)


def test_rotation_rewraps_every_data_key_and_leaves_ciphertexts(tmp_path) -> None:
    old, new = Kek.generate(), Kek.generate()
    store = SecretStore(tmp_path / "s.json", kek=old)
    for i in range(5):
        store.put(f"k{i}", f"value-{i}")
    before = json.loads((tmp_path / "s.json").read_text())["secrets"]
    assert store.rotate(new) == 5
    after = json.loads((tmp_path / "s.json").read_text())["secrets"]
    assert all(after[n]["ciphertext"] == before[n]["ciphertext"] and after[n]["wrapped_key"] != before[n]["wrapped_key"]
               for n in before)
    assert [SecretStore(tmp_path / "s.json", kek=new).get(f"k{i}") for i in range(5)] == [f"value-{i}" for i in range(5)]
    with pytest.raises(SecretError, match="wrapped by KEK"):
        SecretStore(tmp_path / "s.json", kek=old).get("k0")


def test_bad_input_names_the_field_and_the_limit(tmp_path) -> None:
    store = SecretStore(tmp_path / "s.json", kek=Kek.generate())
    with pytest.raises(SecretError, match="name: 1..128 chars"):
        store.put("../etc", "x")
    with pytest.raises(SecretError, match="SECRET_BYTES_MAX"):
        store.put("big", "x" * (64 * 1024 + 1))
    with pytest.raises(SecretError, match="not in the store"):
        store.get("missing")
    with pytest.raises(SecretError, match=f"set {KEK_ENV}"):
        load_kek(env={})
    with pytest.raises(SecretError, match="base64 of 32 bytes"):
        load_kek(env={KEK_ENV: base64.b64encode(b"short").decode()})
    kek = Kek.generate()
    assert load_kek(env={KEK_ENV: kek.encoded()}) == kek
    (tmp_path / "kek").write_text(kek.encoded() + "\n")
    assert load_kek(kek_file=tmp_path / "kek") == kek


@settings(max_examples=50, deadline=None)
@given(value=st.text(min_size=1, max_size=200).filter(lambda v: "\x00" not in v))
def test_any_value_round_trips(tmp_path_factory, value) -> None:
    store = SecretStore(tmp_path_factory.mktemp("s") / "s.json", kek=Kek.generate())
    store.put("v", value)
    assert store.get("v") == value


def test_the_log_filter_masks_tokens_and_keys(caplog) -> None:
    jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ3MSJ9.c2lnbmF0dXJlLWhlcmU"
    assert PLANTED not in mask(f"calling with {PLANTED}")
    assert mask(f"Authorization: Bearer {jwt}") == "Authorization: Bearer ***"
    assert mask("api_key=abcdef123456 and token: zzzzzzzz") == "api_key=*** and token: ***"
    assert mask("task t-1 completed in 3 ms") == "task t-1 completed in 3 ms"     # ordinary text untouched
    logger = logging.getLogger("test.masking")
    handler = logging.StreamHandler()
    handler.addFilter(MaskingFilter())
    logger.addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="test.masking"):
            caplog.handler.addFilter(MaskingFilter())
            logger.info("retrying with key %s", PLANTED)
        assert PLANTED not in caplog.text and "***" in caplog.text
    finally:
        logger.removeHandler(handler)
