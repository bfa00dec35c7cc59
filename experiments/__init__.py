"""The shared-MLP FashionMNIST experiment (D2L 6.2 exercises) that exercises ``param_monitor``."""
