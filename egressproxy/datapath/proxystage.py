"""The driver's first stage on a ``proxy_protocol`` listener: the PROXY header, read before admission.

The header's source becomes the peer, and only then is the client admitted
and the mode's machine started.  A connection without a valid header within
``HEADER_TIMEOUT`` is closed with flag ``DPE`` and counted as rejected for
reason ``proxy_protocol``.  With ``proxy_protocol_trusted``, a peer outside
that list is closed before a byte is read (``DPE``, reason
``proxy_protocol_untrusted``), so only the balancer can name a client.
Waiting connections are not counted per source (they have none yet);
``HEADER_TIMEOUT`` bounds how long each holds a descriptor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall

from egressproxy.addresses import format_peer, peer_ip, source_allowed
from egressproxy.datapath.proxyprotocol import HEADER_TIMEOUT, HeaderParser, InvalidProxyHeader

__all__ = ["ProxyStage"]


class ProxyStage:
    """A mixin of :class:`~egressproxy.datapath.driver.Driver`: its PROXY header stage."""

    session: Any
    listener: Any
    _other_timers: list[IDelayedCall]
    #: Set while the PROXY header is awaited; None before and after.
    _header: HeaderParser | None = None
    _header_timer: IDelayedCall | None = None

    @property
    def awaiting_header(self) -> bool:
        return self._header is not None

    def _admit(self) -> None:
        raise NotImplementedError

    def _proxy_header_sender_trusted(self) -> bool:
        """Whether the TCP peer may send a PROXY header (``proxy_protocol_trusted``; any without it)."""
        trusted = self.listener.config.proxy_protocol_trusted
        return trusted is None or source_allowed(peer_ip(self.session.peer_address), trusted)

    def _refuse_untrusted_sender(self, leg: Any) -> None:
        """A peer outside ``proxy_protocol_trusted``: close before reading a byte, flag DPE.

        Otherwise any client could name another source in a header and pass
        ``allow_sources``.  Nothing is read, so the peer's own address is logged.
        """
        leg.transport.pauseProducing()  # type: ignore[attr-defined]
        self.listener.count_unadmitted("proxy_protocol_untrusted")
        self.session.flag("DPE")
        self.listener.log.warn(
            "{listener}: refused {peer}: not a trusted PROXY protocol sender (proxy_protocol_trusted)",
            listener=self.listener.config.name,
            peer=format_peer(self.session.peer_address),
        )
        leg.close()

    def _await_proxy_header(self, leg: Any) -> None:
        """Read the header before admission; the leg keeps reading meanwhile (splice note 6)."""
        self._header = HeaderParser()
        self.listener.awaiting.add(self.session)
        self._header_timer = self.session.reactor.callLater(
            HEADER_TIMEOUT, self._refuse_proxy_header, f"no complete PROXY header within {HEADER_TIMEOUT:g}s"
        )
        self._other_timers.append(self._header_timer)
        leg.read_preamble(self._read_proxy_header, self._proxy_header_eof)

    def _read_proxy_header(self, data: bytes) -> None:
        """The leg's ``forward`` until the header is complete (or refused)."""
        parser = self._header
        if parser is None:
            return  # refused already: the leg is closing
        try:
            result = parser.feed(data)
        except InvalidProxyHeader as e:
            self._refuse_proxy_header(str(e))
            return
        if result is None:
            return
        header, rest = result
        self.stop_reading_header()
        if header.source is not None:
            self.session.peer_address = header.source
        leg = self.session.down
        assert leg is not None
        # The bytes after the header are the client's first: the machine reads them.
        leg.end_preamble(rest)
        self._admit()

    def _proxy_header_eof(self) -> None:
        if self._header is not None:
            self._refuse_proxy_header("EOF before a complete PROXY header")

    def stop_reading_header(self) -> None:
        """Stop waiting for the header (read, refused, or the client is gone)."""
        self._header = None
        self.listener.awaiting.discard(self.session)
        if self._header_timer is not None and self._header_timer.active():
            self._header_timer.cancel()
        self._header_timer = None

    def _refuse_proxy_header(self, why: str) -> None:
        """No valid header (bad bytes, EOF, timeout): close without dialling, flag DPE."""
        if self._header is None:
            return
        self.stop_reading_header()
        self.listener.count_unadmitted("proxy_protocol")
        self.session.flag("DPE")
        self.listener.log.warn(
            "{listener}: refused {peer}: {reason}",
            listener=self.listener.config.name,
            peer=format_peer(self.session.peer_address),
            reason=why,
        )
        self.session.close_downstream()
