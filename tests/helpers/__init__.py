"""The tests' one support layer.

- ``events.py``: what was really written, read back with TensorBoard's own reader;
- ``trainers.py``: the one Trainer factory (``make_trainer``, ``fit``);
- ``processes.py``: free ports, spawned workers (retried once if gloo kills one), counted collectives;
- ``modules.py``: LightningModules that record their own oracles (gradients, per-use contributions);
- ``uses.py``: a tracked forward/backward and its per-use oracle, for the tracker's tests.
"""
