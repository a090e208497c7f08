"""fedcca ServerApp (``server.server_app:app``)."""
