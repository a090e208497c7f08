"""Code shared by this repository's own ClientApp (``clients/``) and ServerApp (``server/``):
the typed run config (:mod:`fedcca.app.task`) and data, model and seeding helpers
(:mod:`fedcca.app.federation`). A user's own Flower app does not need it."""
