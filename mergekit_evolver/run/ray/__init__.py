"""The Ray executor: the driver's pool (pool.py, executor.py), its
predictions of what comes next (ahead.py) and the workers (worker.py)."""
