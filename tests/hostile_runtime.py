"""Preloaded by the hostile SuperExec's fork server (``tests/hostile.py superexec``): every ClientApp
forked from it answers with ``HostileApp`` instead of the app of the run's FAB. Imported as a
top-level module from ``tests/`` (on the fork server's ``PYTHONPATH``), never by the test suite."""

import flwr.supernode.runtime.run_clientapp as runtime
from hostile import HostileApp

runtime.get_load_client_app_fn = lambda *args, **kwargs: lambda *fab: HostileApp()
