"""The handshake vocabulary (events, actions) and the one driver that applies actions to a session."""
