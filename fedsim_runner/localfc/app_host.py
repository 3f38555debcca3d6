"""Serve one FeatureCloud app (app-template layout) as a plain process; run by the apps' Python, not FedSim's.

`python app_host.py APP_DIR PORT ENGINE_WAITS_JSON`: the app's folder goes on sys.path, its `states` module registers
the states, the engine's module constants named in ENGINE_WAITS_JSON are overridden (the `fast` timing), and the
engine's API is served at /api (and its web page at /web) on 127.0.0.1:PORT, as nginx publishes it in the image.
This file must not import fedsim_runner: FeatureCloud's pins clash with FedSim's environment.
"""

import importlib
import json
import os
import sys


def main() -> None:
    app_dir, port, waits = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    os.chdir(app_dir)
    sys.path.insert(0, app_dir)
    import FeatureCloud.app.engine.app as engine
    from bottle import Bottle
    from FeatureCloud.app.api.http_ctrl import api_server
    from FeatureCloud.app.api.http_web import web_server

    for name, value in waits.items():
        setattr(engine, name, value)
    importlib.import_module("states")
    engine.app.register()
    server = Bottle()
    server.mount("/api", api_server)
    server.mount("/web", web_server)
    server.run(host="127.0.0.1", port=port, quiet=True)


if __name__ == "__main__":
    main()
