"""Duet flows."""

import os

# Prefect reads its settings from the environment when it is first imported, so
# these are set here, before any flow module imports prefect.
# Prefect's local API server runs a telemetry service that writes a session row at
# start-up (racing the server's own start-up writes on SQLite: "database is
# locked", logged as an ERROR) and then phones Prefect's analytics endpoint, which
# these machines cannot reach. Off unless the user turned it on. Set before the
# first flow call starts the server, which reads it from the environment.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A fresh Prefect home migrates its database on the first start; on a busy 2-core
# machine that overruns the 20 s default and the flow dies before it begins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
