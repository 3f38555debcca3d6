"""The program a site runs for the orchestrator: one Dask worker named after the site.

`python -m fedsim_runner.site_worker --scheduler tcp://GATEWAY:PORT --host SITE_ADDRESS`

It runs AS the site (the provider starts it inside the site's namespaces and as its user, or the fedsim_dask role starts
it on a VM), loads the site's own dotfile (DESIGN §10) into its OWN environment, and only then starts the worker, so
site tasks read the credentials with `os.getenv` while the orchestrator never holds them. The worker's name is the
dotfile's `FEDSIM_SITE`: a worker can only claim the site whose credentials it holds.

No nanny: one process per site, so the orchestrator stops exactly the PID it started, and a crashed worker shows up as
a missing site instead of being restarted behind the orchestrator's back.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

from distributed import Worker

from fedsim_runner.site_env import load_site_env

# Site tasks mostly wait on HTTP (login, upload, polling a project); a few threads let a site serve a long wait and a
# short call side by side.
DEFAULT_THREADS = 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedsim_runner.site_worker", description=__doc__.splitlines()[0])
    p.add_argument("--scheduler", required=True, help="scheduler address as the site reaches it, tcp://HOST:PORT")
    p.add_argument("--host", required=True, help="address this site listens on (its veth address, or 127.0.0.1)")
    p.add_argument("--nthreads", type=int, default=DEFAULT_THREADS)
    p.add_argument("--connect-timeout", type=float, default=60.0, help="seconds to reach the scheduler before giving up")
    return p


async def serve(scheduler: str, host: str, name: str, nthreads: int, connect_timeout: float) -> None:
    scratch = Path.home() / ".fedsim" / "dask-worker"
    scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
    worker = Worker(
        scheduler,
        name=name,
        host=host,
        nthreads=nthreads,
        local_directory=str(scratch),
        death_timeout=connect_timeout,
        dashboard=False,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: asyncio.ensure_future(worker.close(executor_wait=False, reason=f"signal-{s}")))
    await worker
    await worker.finished()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    os.environ.update(load_site_env())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(args.scheduler, args.host, os.environ["FEDSIM_SITE"], args.nthreads, args.connect_timeout))
    # A task thread stuck in a long wait must not keep a stopped site alive: leave without joining it.
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
