"""fedcca ClientApp (``clients.client_app:app``) and the task code it shares with the ServerApp."""
