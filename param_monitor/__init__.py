"""param_monitor: watch weights, gradients and shared-parameter gradient contributions."""
