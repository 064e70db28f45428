"""``python -m egressproxy.tunnel`` and the single-file ``egressproxy-tunnel`` executable's entry.

PyInstaller builds the executable from this file (see the Dockerfile's
``tunnel-build`` stage and ``tests/integration/test_tunnel_binary.py``), so
it imports absolutely and does nothing but call
:func:`egressproxy.tunnel.command.main`.
"""

import sys

from egressproxy.tunnel.command import main

if __name__ == "__main__":
    sys.exit(main())
