"""``tensorboard`` with the PARAM MONITOR tab, where the package's entry point is not installed.

``python tests/tensorboard_launcher.py --logdir DIR ...`` takes ``tensorboard``'s own flags; it is
``python -m param_monitor.tensorboard_plugin.testing`` for this checkout's package (the browser tests
start it as a script). Once ``pip install -e .`` has registered the ``tensorboard_plugins`` entry
point, the plain ``tensorboard`` command shows the tab and this launcher adds nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's param_monitor

from param_monitor.tensorboard_plugin.testing import serve  # noqa: E402

if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
