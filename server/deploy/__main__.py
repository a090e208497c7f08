"""``python -m server.deploy``: the deployment steps' command line."""

import sys

from server.deploy.cli import main

sys.exit(main())
