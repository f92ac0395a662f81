"""pytest: the locustfile is for Locust only (importing it monkey-patches the process)."""

collect_ignore = ["locustfile.py"]
