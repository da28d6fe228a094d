"""``fabricflow ui``: the read-only live page of the jobs in a database (orchestrator/ui.py).

Like the read commands it never creates a database (a missing file is exit 3) and never
writes one. aiohttp and the page's module are imported inside the command.
"""

from __future__ import annotations

import click

from orchestrator.cli_common import global_options, run_async, settings_from
from orchestrator.listening import cannot_listen, url_host


@click.command()
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="Port to serve on (0: a free one, printed).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The page has no login: keep it on loopback, or put an "
                   "authenticating proxy in front of it.")
@global_options
@click.pass_context
def ui(ctx: click.Context, port: int, host: str) -> None:
    """Serve a live, read-only page of the jobs in the database until Ctrl-C.

    The page lists jobs by state (click a state, or type part of a name, to filter) and shows
    the selected job's steps on a timeline (requests and status waits), its resource IDs, its
    error and its last reply, all updated as the database changes (Server-Sent Events). Its
    JSON is under /ui/api/ (jobs?state=&name=, jobs/JOB). It only reads; nothing is written.

    \b
      fabricflow ui                          # then open http://127.0.0.1:8765/ui/
      fabricflow ui --db sqlite:///jobs.db --port 0
    \b
    A daemon serves the same page on its --metrics-port, beside /healthz and /metrics.
    """
    settings = settings_from(ctx, configure_logs=False)
    run_async(_serve(settings.db, host, port))


async def _serve(db_url: str, host: str, port: int) -> None:
    import asyncio
    import signal

    from aiohttp import web

    from orchestrator import ui

    app = ui.make_app(db_url)
    # One read before listening: a missing database (exit 3), an old schema or an unreachable
    # server is reported now, not on the page.
    try:
        await ui.read_jobs(app[ui.READER], state=None, name=None, limit=1)
    except BaseException:
        await app[ui.READER].close()
        raise
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except (OSError, UnicodeError) as exc:
            raise cannot_listen(exc, host, port, who="ui") from None
        bound = runner.addresses[0][1]
        click.echo(f"fabricflow ui on http://{url_host(host)}:{bound}{ui.PREFIX}/ ({_describe(db_url)}, "
                   "read-only); Ctrl-C to stop")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    finally:
        await runner.cleanup()


def _describe(db_url: str) -> str:
    from orchestrator.api import describe_database, sqlite_file

    path = sqlite_file(db_url)
    if path is not None:
        return str(path)
    return describe_database(db_url)  # a URL with a password: never printed


COMMANDS = (ui,)
