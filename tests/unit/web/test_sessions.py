"""thox.web.sessions' in-memory session store."""

from __future__ import annotations

from thox.web.sessions import ABSOLUTE_TIMEOUT, IDLE_TIMEOUT, MAX_SESSIONS, Sessions

from .clock import Clock


def test_new_sessions_have_fresh_ids_and_csrf_tokens():
    store = Sessions(clock=Clock())
    a, b = store.new(), store.new(signed_in=True, pw_gen="salt")
    assert a.sid != b.sid and a.csrf != b.csrf and a.csrf != a.sid
    assert len(a.sid) == 43 and not a.signed_in
    assert b.signed_in and b.pw_gen == "salt" and not b.must_change
    assert store.get(a.sid) is a and store.get(b.sid) is b


def test_unknown_and_oversized_ids_find_nothing():
    store = Sessions(clock=Clock())
    s = store.new()
    for sid in (None, "", "nope", s.sid + "x", "a" * 129):
        assert store.get(sid) is None


def test_idle_timeout_and_use_keeps_it_alive():
    clock = Clock()
    store = Sessions(clock=clock)
    kept, idle = store.new(), store.new()
    clock.advance(IDLE_TIMEOUT - 1)
    assert store.get(kept.sid) is kept
    clock.advance(2)
    assert store.get(idle.sid) is None
    assert store.get(kept.sid) is kept                  # seen a second ago
    assert len(store) == 1


def test_absolute_timeout_even_when_used():
    clock = Clock()
    store = Sessions(clock=clock)
    s = store.new(signed_in=True)
    for _ in range(ABSOLUTE_TIMEOUT // (IDLE_TIMEOUT // 2)):
        clock.advance(IDLE_TIMEOUT // 2)
        assert store.get(s.sid) is s
    assert clock.t - s.created == ABSOLUTE_TIMEOUT      # 12 h: still valid
    clock.advance(1)
    assert store.get(s.sid) is None


def test_full_store_drops_expired_then_anonymous_then_oldest():
    clock = Clock()
    store = Sessions(clock=clock)
    old = [store.new(signed_in=True) for _ in range(10)]
    clock.advance(IDLE_TIMEOUT + 1)
    signed = [store.new(signed_in=True) for _ in range(10)]
    anon = []
    for _ in range(MAX_SESSIONS - 20):
        clock.advance(0.01)
        anon.append(store.new())
    assert len(store) == MAX_SESSIONS
    store.new()                                         # the expired ones make room
    assert len(store) == MAX_SESSIONS - 9
    assert all(store.get(s.sid) is None for s in old)
    for _ in range(9):
        store.new()
    assert len(store) == MAX_SESSIONS
    clock.advance(1)
    assert store.get(anon[0].sid) is anon[0]            # seen now: no longer the least recent
    store.new()
    assert len(store) == MAX_SESSIONS
    assert store.get(anon[1].sid) is None               # the least recently seen anonymous one went
    assert store.get(anon[0].sid) is anon[0]
    assert all(store.get(s.sid) is s for s in signed)   # signed-in sessions go last


def test_drop_and_drop_all_signed_in():
    store = Sessions(clock=Clock())
    a, b, c = store.new(signed_in=True), store.new(signed_in=True), store.new()
    store.drop(a.sid)
    store.drop("never issued")
    assert store.get(a.sid) is None and store.get(b.sid) is b
    store.drop_all_signed_in()
    assert store.get(b.sid) is None and store.get(c.sid) is c
