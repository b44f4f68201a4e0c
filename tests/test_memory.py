"""gyrfalcon.memory: the bound on oneDNN's primitive cache that `gyrfalcon serve` sets."""

from __future__ import annotations

from gyrfalcon.memory import cap_onednn_primitive_cache


def test_onednn_cache_cap_is_set_unless_the_user_chose_one(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    cap_onednn_primitive_cache(64)
    import os

    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    cap_onednn_primitive_cache(64)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"
