"""Creates the platform's service account (an Admin) in Superset's metadata, run once per
installation with Superset's own Python (bi/local.py). The password comes from the environment
(SUPERSET_SERVICE_PASSWORD): on `superset fab create-admin`'s command line any local user could
read it in the process list."""

import os
import sys

from superset.app import create_app

app = create_app()
with app.app_context():
    from superset import security_manager

    username = os.environ["SUPERSET_SERVICE_USER"]
    if security_manager.find_user(username=username) is None:
        role = security_manager.find_role(app.config["AUTH_ROLE_ADMIN"])
        created = security_manager.add_user(username, "Platform", "Service", f"{username}@localhost", role,
                                            password=os.environ["SUPERSET_SERVICE_PASSWORD"])
        if not created:
            sys.exit(f"could not create the Superset user {username}")
