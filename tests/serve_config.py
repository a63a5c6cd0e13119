"""Serve a model with a `ServerConfig` given as JSON (tests: settings beyond the CLI, `kill -9`).

    python tests/serve_config.py MODEL DRAFTER PORT '{"state_path": "...", "api_keys": ["k"]}'
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def main() -> None:
    import aded
    from aded.server.app import ServerConfig, create_app
    from aded.server.run import serve

    model, drafter, port, fields = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fields.setdefault("model_name", Path(model).name)
    if fields.get("state_path"):
        fields["state_path"] = Path(fields["state_path"])
    for name in ("api_keys", "allowed_origins", "allowed_hosts"):
        if name in fields:
            fields[name] = tuple(fields[name])
    lm = aded.load(model, drafter=drafter, budget="typical")
    app = create_app(lm, ServerConfig(**fields))
    serve(app, "127.0.0.1", port, "warning")


if __name__ == "__main__":
    main()
