"""The prepared, time-boxed GPU session (gpu_session.sh), its model-path benchmark and what a bare GPU machine needs."""
