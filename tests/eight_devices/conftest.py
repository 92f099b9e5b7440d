"""Tests that need 8 devices: ``tests/test_eight_devices.py`` runs this folder in a subprocess
with 8 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8); with fewer
devices (the main test process) the folder is not collected."""

import jax

collect_ignore_glob = [] if jax.device_count() == 8 else ["test_*.py"]
