"""thox.web.security's sign-in limiter and the address it counts under."""

from __future__ import annotations

from thox.web.security import LOGIN_PER_CLIENT, LOGIN_STORM, LOGIN_WINDOW, LoginLimiter, client_key

from .clock import Clock


def test_defaults_are_five_per_address_and_thirty_overall_per_minute():
    assert (LOGIN_PER_CLIENT, LOGIN_STORM, LOGIN_WINDOW) == (5, 30, 60.0)
    lim = LoginLimiter()
    assert (lim.per_client, lim.storm, lim.window) == (5, 30, 60.0)


def test_client_key_folds_ipv4_mapped_and_zones():
    assert client_key("::ffff:192.168.1.5") == client_key("192.168.1.5") == "192.168.1.5"
    assert client_key("fe80::1%eth0") == "fe80::1"
    assert client_key("2001:DB8::0:1") == "2001:db8::1"
    assert client_key("unknown") == "unknown"


def test_ipv4_mapped_is_the_same_client():
    """A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: the same client."""
    lim = LoginLimiter(per_client=2, storm=100)
    lim.attempt("::ffff:192.168.1.5")
    lim.attempt("192.168.1.5")
    assert lim.retry_after("192.168.1.5") > 0 and lim.retry_after("::ffff:192.168.1.5") > 0
    assert lim.retry_after("2001:db8:1::5") == 0
    token = lim.attempt("2001:db8:1::5")
    lim.succeeded("2001:db8:1::5", token)
    lim.attempt("2001:db8:1::5")
    assert lim.retry_after("2001:db8:1::5") == 0


def test_per_client_window_slides():
    clock = Clock()
    lim = LoginLimiter(clock=clock)
    for _ in range(4):
        lim.attempt("10.0.0.1")
    assert lim.retry_after("10.0.0.1") == 0
    clock.advance(10)
    lim.attempt("10.0.0.1")
    assert lim.retry_after("10.0.0.1") == 50            # until the oldest of the five is a minute old
    assert lim.retry_after("10.0.0.2") == 0             # another address is not affected
    clock.advance(49.5)
    assert lim.retry_after("10.0.0.1") == 1             # rounded up, never 0 while it must wait
    clock.advance(0.5)
    assert lim.retry_after("10.0.0.1") == 0             # the four oldest aged out
    lim.attempt("10.0.0.1")
    assert lim.retry_after("10.0.0.1") == 0             # two in the window now


def test_right_password_takes_the_attempt_back():
    lim = LoginLimiter(clock=Clock())
    for _ in range(4):
        lim.attempt("10.0.0.1")
    token = lim.attempt("10.0.0.1")
    assert lim.retry_after("10.0.0.1") > 0              # counted from the start of the attempt
    lim.succeeded("10.0.0.1", token)
    assert lim.retry_after("10.0.0.1") == 0


def test_parallel_attempts_count_like_sequential_ones():
    lim = LoginLimiter(clock=Clock())
    tokens = [lim.attempt("10.0.0.1") for _ in range(LOGIN_PER_CLIENT)]
    assert lim.retry_after("10.0.0.1") > 0
    lim.succeeded("10.0.0.1", tokens[0])
    assert lim.retry_after("10.0.0.1") == 0


def test_storm_holds_addresses_that_failed_but_not_fresh_ones():
    clock = Clock()
    lim = LoginLimiter(per_client=5, storm=3, clock=clock)
    lim.attempt("10.0.0.1")
    clock.advance(1)
    lim.attempt("10.0.0.2")
    lim.attempt("10.0.0.2")
    # three failures overall: every address with a failure in the window waits
    assert lim.retry_after("10.0.0.1") == 59
    assert lim.retry_after("10.0.0.2") == 59            # until the storm's oldest failure ages out
    assert lim.retry_after("10.0.0.3") == 0             # a fresh address may always try
    clock.advance(59)
    assert lim.retry_after("10.0.0.1") == 0             # its only failure aged out
    assert lim.retry_after("10.0.0.2") == 0             # two failures overall: the storm is over


def test_least_recently_failed_address_is_forgotten_first():
    lim = LoginLimiter(per_client=1, storm=100, max_clients=2, clock=Clock())
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        lim.attempt(ip)
    assert lim.retry_after("10.0.0.1") == 0
    assert lim.retry_after("10.0.0.2") > 0 and lim.retry_after("10.0.0.3") > 0
    lim.attempt("10.0.0.2")                             # now the most recent: 10.0.0.3 goes next
    lim.attempt("10.0.0.4")
    assert lim.retry_after("10.0.0.3") == 0 and lim.retry_after("10.0.0.2") > 0
