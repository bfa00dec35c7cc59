"""The PARAM MONITOR tab: a TensorBoard dynamic plugin for the runs the monitor wrote.

``metadata`` holds the writer the monitor calls once per run (no TensorBoard server imports);
``plugin`` holds the ``TBPlugin``, its routes and the loader that pyproject's
``tensorboard_plugins`` entry point names; ``static/index.js`` is the tab's front end.
"""
