"""``mode: tcp``: forward bytes to the listener's cluster, untouched (``spec.py``, ``front.py``, ``options.py``)."""
