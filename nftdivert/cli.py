"""Command line. Exit status: 0 success, 1 drift or failure, 2 bad input."""

from __future__ import annotations

import os
import sys

import click

from nftdivert import config as config_mod
from nftdivert import __version__, errors
from nftdivert.ruleset import engine, owner
from nftdivert.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ConfigError, DriftFound, NftDivertError
from nftdivert.ruleset.kernel import Nft, check_table_name, is_root

CONFIG_HELP = ("TOML config file (at most 1 MiB). Without it, the safe embedded default: gateway mode, "
               "built-in echo listeners on TCP and UDP 1337, fail-closed, containment on.")


def _config(path: str | None, *, kernel: bool = True, defaults=None) -> config_mod.Config:
    """The config, its table name checked; kernel=False: without libnftables (render)."""
    cfg = config_mod.load(path, defaults)
    check_table_name(cfg.table, parser=kernel)
    return cfg


def _table_option(_ctx, _param, value: str) -> str:
    check_table_name(value)  # the one check every table name from the user passes
    return value


TABLE_OPTION = click.option("-t", "--table", default=config_mod.Config.table, show_default=True,
                            callback=_table_option, help="Table name (checked like the config's `table`).")
TABLE_CONFIG_OPTION = click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
                                   help="Take the table name from this config.")


DIVERT_PATH_OPTION = click.option(
    "--divert-path", type=click.Choice(config_mod.DIVERT_PATHS),
    help="Override the config's divert_path. queue: the worker rewrites each packet's port (before conntrack, "
         "at raw priority, on the way back); kernel: the dstnat rule redirects to the listener's port itself, "
         "and no packet reaches userspace (faster; docs/concepts.md).")


def _with_divert_path(cfg: config_mod.Config, divert_path: str | None) -> config_mod.Config:
    from dataclasses import replace

    return replace(cfg, divert_path=divert_path) if divert_path else cfg


def _table_name(table: str, config_path: str | None) -> str:
    return _config(config_path).table if config_path else table


def _root_nft(action: str) -> Nft:
    if not is_root():
        raise NftDivertError(f"`nftdivert {action}` changes or reads the kernel's rules: run it as root")
    return Nft()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="nftdivert")
def cli() -> None:
    """Answer for any IP address and any port, the nftables way.

    nftdivert renders one nftables table from a config (NAT redirect at
    dstnat, a queue for unbound ports after NAT, and a reply fix-up at raw
    priority below conntrack), loads it atomically, and runs the queue worker
    that rewrites ports so every conversation reaches a local listener.

    \b
    Typical use:
      nftdivert render > ruleset.nft     review or commit the exact ruleset
      nftdivert check                    validate it against this kernel
      nftdivert apply                    load it (replaces only its own table)
      nftdivert diff                     exit 1 if the live table drifted
      nftdivert remove                   take it all away again

    Exit status: 0 success, 1 drift or failure, 2 bad input (nothing applied).
    """


@cli.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--backend", type=click.Choice(config_mod.QUEUE_BACKENDS),
              help="Render for this queue backend. Default: the config's; `auto` renders the native nft form.")
@DIVERT_PATH_OPTION
@click.option("--after-stop", is_flag=True,
              help="Render what a clean stop of `nftdivert run` leaves loaded: the containment chain alone.")
def render(config_path: str | None, backend: str | None, divert_path: str | None, after_stop: bool) -> None:
    """Print the full ruleset on stdout, byte-for-byte deterministic.

    Nothing is asked of the kernel, so the output depends only on the config:
    commit it and diff it in CI. `nft -f` loads it as one transaction that
    replaces nftdivert's table and nothing else. With --after-stop: the table
    a clean stop leaves (containment_after_stop = "keep"), or a comment
    saying nothing stays.
    """
    from nftdivert.ruleset import model, render as render_mod

    cfg = _with_divert_path(_config(config_path, kernel=False), divert_path)
    if not after_stop:
        click.echo(render_mod.render_for(cfg, backend), nl=False)
        return
    text = render_mod.render_after_stop(model.build(cfg, config_mod.NATIVE_QUEUE))
    click.echo(text or "# nftdivert after a clean stop: nothing stays loaded "
                       "(no containment, or containment_after_stop = \"remove\")\n", nl=False)


@cli.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.argument("ruleset", required=False, type=click.Path(dir_okay=False, exists=True))
def check(config_path: str | None, ruleset: str | None) -> None:
    """Validate a config's ruleset (or a RULESET.nft file) against the running kernel.

    A dry run through libnftables: the kernel checks every rule, nothing
    changes. As root it checks in this network namespace; otherwise in a user
    and network namespace of its own, where the system allows that. Also says
    which queue backend `auto` would pick. A RULESET must be UTF-8 text of at
    most 1 MiB, with no `include` (nftdivert checks only the text it is given).
    """
    if config_path and ruleset:
        raise ConfigError("RULESET", ruleset, "give a config or a ruleset file, not both")
    if ruleset:
        text = config_mod.read_input(ruleset, "RULESET")
        notes = engine.check_text(text, Nft() if is_root() else None, source=ruleset)
        click.echo(f"{ruleset}: accepted by the kernel (dry run, nothing changed)")
        for note in notes:
            click.echo(note)
        return
    cfg = _config(config_path)
    nft = Nft() if is_root() else None
    backend, reason, notes = engine.check(cfg, nft)
    where = "dry run" if nft else "dry run in a user namespace"
    click.echo(f"queue backend: {backend} ({reason})")
    click.echo(f"{config_path or 'default config'}: accepted by the kernel ({where}, nothing changed)")
    for note in notes:
        click.echo(note)
    if cfg.mode != "local":
        _say_bridges(cfg)


def _say_bridges(cfg: config_mod.Config) -> None:
    """Gateway mode: what the bridge table does with this namespace's client-side bridges."""
    from nftdivert.ruleset import bridges

    found = bridges.read(cfg.interfaces)
    for line in bridges.describe(found, cfg.table):
        click.echo(line)
    if not found:
        click.echo("bridges: none on the client side now (`run` follows any that appears)")


@cli.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def apply(config_path: str | None) -> None:
    """Load the ruleset into the kernel as one atomic transaction.

    Replaces only nftdivert's own table (other tables, Docker's and
    firewalld's included, stay untouched). If the kernel rejects the new
    ruleset, the previous one stays in force and the error names the line.
    If a step after the commit fails (the xt backend's iptables rules), what
    this apply added is taken back: the previous table returns, or ours goes.
    Without a running worker, diverted packets are dropped (fail-closed) or
    passed (fail-open); `nftdivert run` applies and runs the worker in one go.
    A table that a running `nftdivert run` owns is only loaded again with
    that run's own ruleset (to undo drift); another one is refused (exit 1).
    """
    cfg = _config(config_path)
    done = engine.apply(cfg, _root_nft("apply"))
    click.echo(f"applied table inet {done.table}; queue backend: {done.backend} ({done.reason})")


@cli.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--after-stop", is_flag=True,
              help="Compare with what a clean stop of `nftdivert run` leaves (the containment chain alone).")
def diff(config_path: str | None, after_stop: bool) -> None:
    """Compare the live table with what the config renders; print a unified diff.

    Both sides are in nft's own normal form (the rendered text is loaded into
    a scratch network namespace and listed back), so priority names, queue
    syntax and set ordering cause no false drift. The bound-port sets change
    at run time and are not compared.

    Exit 0: same. Exit 1: drift (or nothing loaded). Exit 2: bad input.
    """
    cfg = _config(config_path)
    nft = _root_nft("diff")
    drift = engine.diff(cfg, nft, after_stop=after_stop)
    if drift.same:
        click.echo(f"table inet {cfg.table} matches the config" + (" (after a stop)" if after_stop else ""), err=True)
        return
    if drift.missing_table:
        click.echo(f"table inet {cfg.table} is not loaded", err=True)
    elif not after_stop and engine.status(cfg.table, nft).contained:
        click.echo(f"table inet {cfg.table} holds only containment, as a clean stop leaves it: "
                   "compare with --after-stop", err=True)
    click.echo(drift.diff, nl=False)
    raise DriftFound("drift")


@cli.command()
@TABLE_OPTION
@TABLE_CONFIG_OPTION
def remove(table: str, config_path: str | None) -> None:
    """Take nftdivert's table and its xt queue rules away. Idempotent: exit 0 when there was nothing.

    This is also how the containment a clean stop of `nftdivert run` leaves
    in place goes away.
    """
    table = _table_name(table, config_path)
    gone = engine.remove(table, _root_nft("remove"))
    from nftdivert.services import active  # the listeners' module: only here

    if active.remove_stale():
        gone.append("active FTP's port-20 routing rule, left by a killed run")
    running = owner.owner_of(table)
    if running is None and _remove_state_files(table):
        gone.append("the state files a killed run left (its counters, ownership lock, analyses' socket)")
    click.echo(f"removed {', '.join(gone)}" if gone else f"nothing to remove for table {table}")
    if gone and running is not None:
        click.echo(f"nftdivert: note: nftdivert run (pid {running.pid}) still runs, now without its table",
                   err=True)


def _remove_state_files(table: str) -> bool:
    """The files a run of `table` keeps in this network namespace, which a killed run leaves;
    only when no live run owns the table. True if there were any."""
    from nftdivert import stats
    from nftdivert.observers import analyses

    from nftdivert.process import lockfile

    try:  # held while the others go, as a run's own stop does: a run starting now waits, then claims anew
        fd = lockfile.acquire(owner.lock_path(table), create=False)
    except OSError:
        return False
    if fd is None and owner.lock_path(table).exists():
        return False  # a run holds it after all
    found = fd is not None
    for path in (stats.stats_path(table), analyses.control_path(table)):
        try:
            path.unlink()
            found = True
        except OSError:
            pass  # none, or not ours to take: status checks the pid anyway
    if fd is not None:
        lockfile.release(owner.lock_path(table), fd)
    return found


@cli.command()
@TABLE_OPTION
@TABLE_CONFIG_OPTION
def reload(table: str, config_path: str | None) -> None:
    """Make the running `nftdivert run` read its config file again, as SIGHUP does.

    Only the answer sections change ([[custom]], [dns] records and
    one_address, [http] rules), for new conversations; conversations in flight
    keep theirs. A file that does not validate changes nothing: the run says
    why on its stderr and in a `reload` record of the log. Exit 1: no run owns
    the table in this network namespace.
    """
    import signal

    table = _table_name(table, config_path)
    running = owner.owner_of(table)
    if running is None:
        raise NftDivertError(f"no nftdivert run owns table {table} in this network namespace: nothing to reload")
    os.kill(running.pid, signal.SIGHUP)
    click.echo(f"nftdivert: asked nftdivert run (pid {running.pid}) to read its config again; "
               "its stderr and the log's `reload` record say whether it took")


@cli.group()
def task() -> None:
    """Tell the running `nftdivert run` which clients belong to which analysis (task), and when it ends.

    Every record of a conversation that starts while its client belongs to a
    task carries `task`; with [analyses] directory, each task also gets a
    directory of its own (its log, pcap, saved files, summary and report),
    finished when it ends. Takes effect at once, without a restart. Exit 2:
    no run owns the table here, or the task is unknown, or started already.
    """


@task.command("start")
@click.argument("task_id", metavar="TASK")
@click.option("--client", "clients", multiple=True, required=True, metavar="ADDR",
              help="A client address or prefix of this task (10.0.1.23, 10.0.2.0/28); repeat for more.")
@click.option("--profile", metavar="NAME", default=None,
              help="The [[profiles]] whose answers its clients get while it runs, whatever their addresses.")
@TABLE_OPTION
@TABLE_CONFIG_OPTION
def task_start(task_id: str, clients: tuple[str, ...], profile: str | None, table: str,
               config_path: str | None) -> None:
    """Start task TASK: its clients' new conversations are its own from now on.

    A client already in a running task goes to this one (the later start wins).
    With --profile, its clients get that profile's answers until it ends
    (exit 2: the run has no profile of that name).
    """
    from nftdivert import tasks
    from nftdivert.observers import analyses

    tasks.check_task(task_id)
    tasks.check_clients(list(clients))
    chosen = {"profile": profile} if profile is not None else {}
    click.echo(analyses.ask(_table_name(table, config_path),
                            {"op": "start", "task": task_id, "clients": list(clients), **chosen}))


@task.command("end")
@click.argument("task_id", metavar="TASK")
@TABLE_OPTION
@TABLE_CONFIG_OPTION
def task_end(task_id: str, table: str, config_path: str | None) -> None:
    """End task TASK: its evidence is closed and summarized before this returns."""
    from nftdivert import tasks
    from nftdivert.observers import analyses

    tasks.check_task(task_id)
    click.echo(analyses.ask(_table_name(table, config_path), {"op": "end", "task": task_id}))


@cli.command()
@TABLE_OPTION
@TABLE_CONFIG_OPTION
def status(table: str, config_path: str | None) -> None:
    """What is loaded: chains with hook, priority and packet counters, queue backend, set sizes,
    and the running worker's counters.

    After a clean stop of `nftdivert run` it says "contained, no worker": only
    the containment chain is loaded. Exit 0: loaded; 1: not loaded.
    """
    table = _table_name(table, config_path)
    st = engine.status(table, _root_nft("status"))
    if not st.loaded:
        click.echo(f"table inet {table}: not loaded")
        for rule in st.xt_rules:
            click.echo(f"  stray xt rule: {rule}")
        raise DriftFound("not loaded")
    if st.contained:
        click.echo(f"table inet {table}: contained, no worker (forwarded traffic is dropped; "
                   "nothing is diverted; `nftdivert remove` takes it away)")
    else:
        click.echo(f"table inet {table}: loaded, " + ("kernel path (nothing queued)" if st.kernel_path
                                                       else f"queue backend {st.backend}"))
    click.echo(f"  {'chain':<18} {'hook':<11} {'priority':>8} {'packets':>12}")
    for ch in st.chains:
        click.echo(f"  {ch.name:<18} {ch.hook:<11} {ch.priority:>8} {ch.packets:>12}")
    click.echo("  sets: " + ", ".join(f"{k}={v}" for k, v in sorted(st.sets.items())))
    if st.admission:
        click.echo("  admission: dropped " + ", ".join(f"{p} {n}" for p, n in sorted(st.admission.items()))
                   + " new conversations over their client's share (queue.new_*_per_source)")
    if st.spoofed is not None:
        click.echo(f"  spoofed: dropped {st.spoofed} packets from sources their interface does not route to")
    for rule in st.xt_rules:
        click.echo(f"  xt: {rule}")
    from nftdivert import stats

    worker = stats.read(table)
    click.echo(f"  worker: pid {worker['pid']}: {stats.summary(worker)}" if worker else "  worker: none running")


def _summary_option(_ctx, _param, value: str | None) -> str | None:
    """A summary file that cannot be written is bad input, found before anything starts."""
    if value is not None:
        try:
            with open(value, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise ConfigError("--summary", value, exc.strerror or str(exc)) from None
    return value


def _diverter_options(func):
    """The options `run` and `sandbox` share: config, capture, conversation log."""
    for option in reversed((
        click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP),
        DIVERT_PATH_OPTION,
        click.option("-w", "--write", "pcap", type=click.Path(dir_okay=False),
                     help="Capture what the clients send and get, as they see it (original addresses, "
                          "each packet once; DNS, ICMP and bound ports too), to this pcap file (raw IP)."),
        click.option("--write-rewritten", "pcap_rewritten", type=click.Path(dir_okay=False),
                     help="Debugging the worker: write each diverted packet as the queue worker got it "
                          "(after NAT) and as it rewrote it, to this pcap file."),
        click.option("--log", "log_target", help='Conversation log: a file, "-" for stdout (default), "" for none.'),
        click.option("--log-format", type=click.Choice(["auto", "json", "text"]),
                     help="JSON Lines or one readable line per conversation (auto: text on a terminal)."),
        click.option("--summary", "summary", type=click.Path(dir_okay=False), callback=_summary_option,
                     help="Also write the table of what was contacted, printed at the end, as JSON to this file."),
    )):
        func = option(func)
    return func


def _diverter_config(config_path: str | None, log_target: str | None, log_format: str | None,
                     pcap_rewritten: str | None = None, divert_path: str | None = None,
                     defaults=None) -> config_mod.Config:
    from dataclasses import replace

    cfg = _with_divert_path(_config(config_path, defaults=defaults), divert_path)
    overrides = {k: v for k, v in (("log", log_target), ("log_format", log_format),
                                   ("pcap_rewritten", pcap_rewritten)) if v is not None}
    return replace(cfg, worker=replace(cfg.worker, **overrides)) if overrides else cfg


@cli.command()
@_diverter_options
def run(config_path: str | None, divert_path: str | None, pcap: str | None, pcap_rewritten: str | None,
        log_target: str | None, log_format: str | None, summary: str | None) -> None:
    """Divert: apply the ruleset, run the queue worker (or, on the kernel path, only
    the bound-port sets) and the listeners until stopped.

    Every conversation to an unbound port on any address reaches the default
    listener of its protocol; each new one is logged with its original
    destination (the address the client asked for). SIGINT or SIGTERM stops
    it: the queue rules and the listeners go, and the table keeps only its
    containment chain until `nftdivert remove` (containment_after_stop =
    "remove" takes it all away). The table belongs to this run while it
    runs: another run for the same table is refused (exit 1). Started after
    a crash or kill -9, it replaces the stale table and carries on.

    \b
    Examples:
      nftdivert run                         gateway mode, built-in echo listeners
      nftdivert run -c lab.toml -w lab.pcap
      nftdivert run --log conversations.jsonl
      nftdivert run --divert-path kernel    no packet through userspace: for throughput
    """
    from nftdivert import runner, stats

    cfg = _diverter_config(config_path, log_target, log_format, pcap_rewritten, divert_path)
    _root_nft("run")
    def reread():  # SIGHUP: the answer sections again, from the same file and options
        return _diverter_config(config_path, log_target, log_format, pcap_rewritten, divert_path)

    final = runner.run(cfg, pcap_path=pcap, summary_path=summary, reread=reread)
    if final:
        click.echo(f"nftdivert: {stats.summary(final)}", err=True)


def _timeout(value: str | None) -> float | None:
    import math

    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError("--timeout", value, "must be a positive number of seconds")
    return seconds


# CMD's own options stay CMD's, with or without "--" (wget --timeout=5 ...).
@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_diverter_options
@click.option("--timeout", "timeout", metavar="SECONDS",
              help="End the sandbox this long after CMD started, whatever still runs (exit status 124).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def sandbox(config_path: str | None, divert_path: str | None, pcap: str | None, pcap_rewritten: str | None,
            log_target: str | None, log_format: str | None, summary: str | None, timeout: str | None,
            command: tuple[str, ...]) -> None:
    """Run CMD with all of its traffic answered locally; nothing leaks out.

    CMD runs as you (the user behind sudo) in a network namespace of its
    own, whose only way out is a diverter namespace running nftdivert with
    the built-in listeners and a DNS listener that answers every name. The
    conversation log streams to the terminal. Without CMD: an interactive
    shell in there.

    The sandbox runs until every process CMD started has exited (daemons
    too; it says which still run), until --timeout, or until Ctrl-C or
    SIGTERM. Then it removes every namespace, table and process. Exit
    status: CMD's; 124 after --timeout; 130 after Ctrl-C, 143 after SIGTERM.
    After a SIGKILL its processes die with it, and the next sandbox removes
    the namespaces it left.

    \b
    Examples:
      sudo nftdivert sandbox -- curl -v http://anything.example:8080/
      sudo nftdivert sandbox -w sample.pcap --timeout 60 -- ./sample.bin
      sudo nftdivert sandbox
    """
    from nftdivert.lab import sandbox as sandbox_mod

    seconds = _timeout(timeout)
    cfg = _diverter_config(config_path, log_target, log_format, pcap_rewritten, divert_path,
                           defaults=sandbox_mod.CONFIG_DEFAULTS)
    status = sandbox_mod.run(cfg, list(command), pcap=pcap, timeout=seconds, summary=summary)
    raise SystemExit(status)


@cli.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def ca(config_path: str | None) -> None:
    """The CA that TLS answers chain to: its path, then its PEM (made first if there is none).

    It lives in [tls] state_dir (default /var/lib/nftdivert: ca.pem, and
    ca.key, which only root reads). Every TLS client gets a certificate for
    the name it asked for, signed by this CA. A client that trusts it
    connects without a warning. `nftdivert sandbox` makes CMD trust it on its own.

    \b
    Install it in a victim VM:
      sudo nftdivert ca | tail -n +2 > ca.crt    (copy ca.crt into the VM)
      Windows:        certutil -addstore -f Root ca.crt   (as Administrator)
      Debian/Ubuntu:  cp ca.crt /usr/local/share/ca-certificates/ && update-ca-certificates
      Fedora/RHEL:    cp ca.crt /etc/pki/ca-trust/source/anchors/ && update-ca-trust
      macOS:          security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain ca.crt
      Firefox and Java keep stores of their own: import it there too
      (Firefox: Settings, Certificates, Authorities; Java: keytool -importcert -cacerts).
    """
    from nftdivert.services import certs

    authority = certs.ensure_ca(_config(config_path, kernel=False).tls.state_dir)
    click.echo(str(authority.cert_path))
    click.echo(authority.pem.decode(), nl=False)


@cli.command()
@click.argument("log", type=click.Path(dir_okay=False))
@click.option("-o", "--output", default="report.html", show_default=True, type=click.Path(dir_okay=False),
              help="The HTML file to write (replaced whole).")
def report(log: str, output: str) -> None:
    """One self-contained HTML page from a conversation log (JSON Lines): a timeline, the
    destinations, names, TLS, HTTP, mail and uploads (linked), logins, and what was dropped.

    No script and nothing fetched: open it anywhere. Everything from the log is escaped;
    each table keeps its first or busiest rows and counts the rest.
    """
    from nftdivert.report import page

    digest = page.write(log, output)
    click.echo(f"{output}: {digest.lines} records, {digest.events['start']} conversations"
               + (f", {digest.unreadable} unreadable lines" if digest.unreadable else ""))


def main(argv: list[str] | None = None) -> None:
    """Entry point: every exit status is decided here and in errors.report."""
    try:
        cli.main(args=argv, prog_name="nftdivert", standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help, --version
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_FAILURE)
    except click.ClickException as exc:  # usage errors: one line, as every other bad input
        ctx = getattr(exc, "ctx", None)
        click.echo(errors.usage_line(exc.format_message(), ctx.command_path if ctx else None), err=True)
        sys.exit(EXIT_USAGE)
    except (NftDivertError, OSError, UnicodeError) as exc:
        message, status = errors.report(exc)
        _quiet_stdout()
        if message:
            click.echo(message, err=True)
        sys.exit(status)
    sys.exit(EXIT_OK)


def _quiet_stdout() -> None:
    """A stdout that failed (`> /dev/full`, a closed pipe) must not fail again at exit."""
    try:
        sys.stdout.flush()
    except OSError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
