"""Tests for egressproxy.upstream.breaker: the pending and active limits, in plain numbers."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from egressproxy.upstream.breaker import CircuitBreaker


def fill_pending(breaker: CircuitBreaker, n: int) -> list[bool]:
    return [breaker.try_acquire_pending() for _ in range(n)]


class CircuitBreakerTests(SynchronousTestCase):
    """CircuitBreaker: max_pending and max_connections."""

    def test_new_breaker_is_closed(self) -> None:
        """A new breaker has nothing counted and admits a connect."""
        breaker = CircuitBreaker(max_connections=3, max_pending=2)
        self.assertEqual((breaker.pending, breaker.active, breaker.overflows, breaker.open), (0, 0, 0, False))

    def test_acquire_counts_pending(self) -> None:
        """Each admitted connect counts one pending."""
        breaker = CircuitBreaker(max_connections=10, max_pending=5)
        self.assertEqual(fill_pending(breaker, 2), [True, True])
        self.assertEqual(breaker.pending, 2)

    def test_pending_limit(self) -> None:
        """Past max_pending connects in progress, a new one is refused."""
        breaker = CircuitBreaker(max_connections=10, max_pending=2)
        self.assertEqual(fill_pending(breaker, 3), [True, True, False])
        self.assertEqual(breaker.pending, 2)

    def test_active_limit(self) -> None:
        """With max_connections established, a new connect is refused."""
        breaker = CircuitBreaker(max_connections=2, max_pending=5)
        for _ in range(2):
            breaker.try_acquire_pending()
            breaker.connected()
        self.assertEqual((breaker.pending, breaker.active), (0, 2))
        self.assertFalse(breaker.try_acquire_pending())

    def test_pending_counts_against_max_connections(self) -> None:
        """Pending connects plus active ones may not exceed max_connections."""
        breaker = CircuitBreaker(max_connections=3, max_pending=5)
        breaker.try_acquire_pending()
        breaker.connected()
        self.assertEqual(fill_pending(breaker, 3), [True, True, False])
        self.assertEqual((breaker.pending, breaker.active), (2, 1))

    def test_connected_moves_pending_to_active(self) -> None:
        """A successful connect turns one pending into one active."""
        breaker = CircuitBreaker(max_connections=3, max_pending=2)
        fill_pending(breaker, 2)
        breaker.connected()
        self.assertEqual((breaker.pending, breaker.active), (1, 1))

    def test_connected_frees_a_pending_slot(self) -> None:
        """Once a pending connect lands, another connect may start under max_pending."""
        breaker = CircuitBreaker(max_connections=10, max_pending=1)
        breaker.try_acquire_pending()
        breaker.connected()
        self.assertTrue(breaker.try_acquire_pending())

    def test_connect_failed_frees_slot(self) -> None:
        """A failed connect frees its pending slot for the next one."""
        breaker = CircuitBreaker(max_connections=10, max_pending=1)
        breaker.try_acquire_pending()
        self.assertFalse(breaker.try_acquire_pending())
        breaker.connect_failed()
        self.assertEqual((breaker.pending, breaker.active), (0, 0))
        self.assertTrue(breaker.try_acquire_pending())

    def test_released_frees_slot(self) -> None:
        """A closed active connection frees its slot under max_connections."""
        breaker = CircuitBreaker(max_connections=1, max_pending=1)
        breaker.try_acquire_pending()
        breaker.connected()
        self.assertFalse(breaker.try_acquire_pending())
        breaker.released()
        self.assertEqual(breaker.active, 0)
        self.assertTrue(breaker.try_acquire_pending())

    def test_overflows_counted(self) -> None:
        """Each refusal counts one overflow; admissions count none."""
        breaker = CircuitBreaker(max_connections=10, max_pending=1)
        fill_pending(breaker, 4)
        self.assertEqual(breaker.overflows, 3)

    def test_overflows_counted_for_active_limit(self) -> None:
        """A refusal because of max_connections counts an overflow too."""
        breaker = CircuitBreaker(max_connections=1, max_pending=5)
        breaker.try_acquire_pending()
        breaker.connected()
        breaker.try_acquire_pending()
        self.assertEqual(breaker.overflows, 1)

    def test_open_at_pending_limit(self) -> None:
        """The breaker is open while pending connects are at max_pending."""
        breaker = CircuitBreaker(max_connections=10, max_pending=2)
        breaker.try_acquire_pending()
        self.assertFalse(breaker.open)
        breaker.try_acquire_pending()
        self.assertTrue(breaker.open)

    def test_open_at_connection_limit(self) -> None:
        """The breaker is open while pending plus active reach max_connections."""
        breaker = CircuitBreaker(max_connections=2, max_pending=5)
        breaker.try_acquire_pending()
        breaker.connected()
        self.assertFalse(breaker.open)
        breaker.try_acquire_pending()
        self.assertTrue(breaker.open)

    def test_closes_again_after_release(self) -> None:
        """The breaker closes once a connection is released below the limit."""
        breaker = CircuitBreaker(max_connections=1, max_pending=1)
        breaker.try_acquire_pending()
        breaker.connected()
        self.assertTrue(breaker.open)
        breaker.released()
        self.assertFalse(breaker.open)

    def test_open_matches_refusal(self) -> None:
        """Whenever open is true the next connect is refused, and whenever false it is admitted."""
        breaker = CircuitBreaker(max_connections=3, max_pending=2)
        observed = []
        for step in ["acquire", "acquire", "connected", "acquire", "acquire", "released", "acquire"]:
            if step == "acquire":
                was_open = breaker.open
                observed.append((was_open, breaker.try_acquire_pending()))
            elif step == "connected":
                breaker.connected()
            else:
                breaker.released()
        self.assertEqual(observed, [(False, True), (False, True), (False, True), (True, False), (True, False)])
