"""``tensorboard`` with the PARAM MONITOR tab, where the package's entry point is not installed.

``python tests/tensorboard_launcher.py --logdir DIR ...`` takes ``tensorboard``'s own flags. Once
``pip install -e .`` has registered the ``tensorboard_plugins`` entry point, the plain
``tensorboard`` command shows the tab and this launcher adds nothing (the plugin is not loaded twice).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's param_monitor

from tensorboard import default, program  # noqa: E402

from param_monitor.tensorboard_plugin.plugin import ParamMonitorPlugin  # noqa: E402


def main(argv: list[str]) -> int:
    plugins = default.get_plugins()
    if not any(getattr(p, "plugin_name", None) == ParamMonitorPlugin.plugin_name for p in plugins):
        plugins.append(ParamMonitorPlugin)
    board = program.TensorBoard(plugins=plugins)
    board.configure(argv=["tensorboard", *argv])
    return board.main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
