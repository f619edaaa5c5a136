"""The `alignloop` command: one sub-command group per package, each mirroring its Python API."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Optional

import typer

from chat_app.engines.config import EngineConfig
from feedback_db.cli import app as db_app
from training.cli import SAMPLER_FACTORY_KEY, models_app, train_app
from training.round import check_adapter
from training.sampling import APP_SAMPLING


def rollout_sampler_factory(cfg, context):  # noqa: ANN001, ANN201 - training.rollout's SamplerFactory
    """PPO's rollout sampler: the chat app's vLLM engine when the config asks for it (or 'auto' on a GPU),
    else HF generate. Training never imports chat_app, so the top of the stack hands this down."""
    from chat_app.engines.rollout_sampler import vllm_sampler_factory

    return vllm_sampler_factory(cfg, context)


app = typer.Typer(
    help="alignloop: serve an aligned LM, collect feedback, retrain, hot-swap.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"obj": {SAMPLER_FACTORY_KEY: rollout_sampler_factory}},
)
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
app.add_typer(train_app, name="train")
users_app = typer.Typer(help="Logins for `alignloop serve --users-file` (passwords hashed with scrypt, file mode 0600).",
                        no_args_is_help=True)
app.add_typer(users_app, name="users")


# The options of `serve` (`demo` passes every option it does not know on to `serve`).
BaseModelOpt = Annotated[str, typer.Option("--base-model", help="'default' (embedded Gemma 3 270M), an HF id or a folder.")]
EngineOpt = Annotated[str, typer.Option("--engine", help="auto (vLLM when importable) | vllm | hf")]
DbOpt = Annotated[Optional[Path], typer.Option("--db", help="Feedback database (default: $ALIGNLOOP_DB or ~/.local/share/alignloop/feedback.db).")]
HostOpt = Annotated[str, typer.Option("--host")]
PortOpt = Annotated[int, typer.Option("--port")]
UsersFileOpt = Annotated[Optional[Path], typer.Option("--users-file", envvar="ALIGNLOOP_USERS_FILE",
                                                      help="Require login, with the users of this file (written by `alignloop users add`).")]
AdminsOpt = Annotated[Optional[str], typer.Option("--admins", help="Logged-in users allowed on the dashboard besides those added with --admin: 'alice,bob'.")]
# Passwords on the command line are visible to every local user (`ps`); these two only say what to use instead.
OldUsersOpt = Annotated[Optional[str], typer.Option("--users", hidden=True)]
OldAdminPasswordOpt = Annotated[Optional[str], typer.Option("--admin-password", hidden=True)]
MaxModelLenOpt = Annotated[int, typer.Option("--max-model-len", help="Longest prompt + reply in tokens.")]
CpuCoresOpt = Annotated[Optional[str], typer.Option("--cpu-cores", help="vllm-cpu: cores the model's threads run on: auto (vLLM keeps one core for its scheduler and the app), all, or ids such as 0-3 (default: $VLLM_CPU_OMP_THREADS_BIND if set, else all on a machine with fewer than 4 cores, auto on a bigger one).")]
MaxLorasOpt = Annotated[int, typer.Option("--max-loras", help="vLLM: adapter versions one batch may mix (live, candidate, and the one a promotion switches from; on CPU the bare base model counts as one).")]
RateLimitOpt = Annotated[int, typer.Option("--rate-limit", help="Generated replies per user per minute (a Compare costs 2, a Rank of K costs K); a client address gets 4x, feedback writes 2x (0: no limits).")]
NewIdsOpt = Annotated[int, typer.Option("--new-ids-per-hour", help="New anonymous identities one client address may get per hour (each is a new voter; 0: no limit).")]
MaxInputOpt = Annotated[int, typer.Option("--max-input-chars", help="Longest user message accepted.")]
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", help="Default reply length limit (users can change it).")]
FrequencyOpt = Annotated[float, typer.Option("--frequency-penalty", help="Default frequency penalty (OpenAI's, on the reply's own tokens; 0: none; users can change it). A 270M model loops on one line without one.")]
MinPOpt = Annotated[float, typer.Option("--min-p", help="Default min-p (tokens less likely than min-p x the top token's probability are never sampled; 0: off; users can change it). Keeps a small model from sampling junk tokens where a turn should end.")]
RoundsDirOpt = Annotated[Optional[Path], typer.Option("--rounds-dir", help="Where a round started from the Dashboard writes (default ~/.local/share/alignloop/rounds).")]
AutoPromoteOpt = Annotated[int, typer.Option("--auto-promote-after", help="Promote a gated candidate once its Compare votes vs live pass the sequential test (feedback_db/sequential_testing.py), after at least N counted decisive votes (0: never from the server).")]
PromoteAlphaOpt = Annotated[float, typer.Option("--promote-alpha", help="Chance of promoting a candidate no better than live, however often the test is checked.")]
PromoteVotersOpt = Annotated[int, typer.Option("--promote-min-voters", help="Distinct voters needed before a promotion.")]


@app.command()
def serve(
    base_model: BaseModelOpt = "default",
    engine: EngineOpt = "auto",
    db: DbOpt = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 7860,
    users_file: UsersFileOpt = None,
    admins: AdminsOpt = None,
    users: OldUsersOpt = None,
    admin_password: OldAdminPasswordOpt = None,
    max_model_len: MaxModelLenOpt = 2048,
    max_loras: MaxLorasOpt = EngineConfig.max_loras,
    cpu_cores: CpuCoresOpt = None,
    rate_limit: RateLimitOpt = 30,
    new_ids_per_hour: NewIdsOpt = 60,
    max_input_chars: MaxInputOpt = 4000,
    max_new_tokens: MaxNewTokensOpt = 256,
    frequency_penalty: FrequencyOpt = APP_SAMPLING.frequency_penalty,
    min_p: MinPOpt = APP_SAMPLING.min_p,
    rounds_dir: RoundsDirOpt = None,
    auto_promote_after: AutoPromoteOpt = 0,
    promote_alpha: PromoteAlphaOpt = 0.05,
    promote_min_voters: PromoteVotersOpt = 5,
) -> None:
    """Start the chat app (Chat, Compare, Rank, Dashboard) on the live policy.

    The Dashboard needs an admin: the password in $ALIGNLOOP_ADMIN_PASSWORD, or a login added with
    `alignloop users add NAME --admin` (with --users-file, everyone logs in).

    Example: ALIGNLOOP_ADMIN_PASSWORD=s3cret alignloop serve --engine auto --port 7860
    """
    options = dict(locals())
    from chat_app.app import serve as run_server

    run_server(_app_config(**options))


def _refuse_passwords_on_argv(users: Optional[str], admin_password: Optional[str]) -> None:
    """The old --users / --admin-password options: refused, with what to use instead."""
    if users is not None:
        raise typer.BadParameter("passwords on the command line are visible to every local user (`ps`). Add each "
                                 "user with `alignloop users add NAME` (it asks for the password; `--admin` for the "
                                 "dashboard), then start with `alignloop serve --users-file PATH`.", param_hint="--users")
    if admin_password is not None:
        raise typer.BadParameter("passwords on the command line are visible to every local user (`ps`). Set "
                                 "ALIGNLOOP_ADMIN_PASSWORD in the server's environment instead, or log in as an admin "
                                 "(`alignloop users add NAME --admin`, then `--users-file`).", param_hint="--admin-password")


def _engine_config(**options) -> EngineConfig:
    """An EngineConfig from serve's options, with their names on a refusal."""
    from chat_app.engines import EngineError

    try:
        return EngineConfig(**options)
    except EngineError as exc:
        raise typer.BadParameter(str(exc)) from None


def _app_config(*, base_model: str, engine: str, db: Optional[Path], host: str, port: int, users_file: Optional[Path],
                admins: Optional[str], users: Optional[str], admin_password: Optional[str], max_model_len: int,
                max_loras: int = EngineConfig.max_loras, cpu_cores: Optional[str] = None, rate_limit: int,
                new_ids_per_hour: int, max_input_chars: int, max_new_tokens: int,
                frequency_penalty: float, min_p: float, auto_promote_after: int, rounds_dir: Optional[Path] = None,
                promote_alpha: float, promote_min_voters: int):
    """The AppConfig that `serve`'s options describe (shared with `demo`)."""
    from chat_app.app import AppConfig
    from chat_app.auth import UserDirectory, UsersFileError
    from chat_app.engines import SamplingConfig
    from chat_app.identity import IdentityConfig
    from chat_app.limits import LimitConfig
    from chat_app.service import ServiceConfig
    from feedback_db import PromotionPolicy

    _refuse_passwords_on_argv(users, admin_password)
    if users_file is not None:
        users_file = users_file.expanduser()
        try:
            UserDirectory.load(users_file)  # refuse a missing or empty file now, not at the first login
        except (UsersFileError, OSError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--users-file") from None
    try:
        promotion = (PromotionPolicy(alpha=promote_alpha, min_voters=promote_min_voters, min_votes=auto_promote_after)
                     if auto_promote_after > 0 else None)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return AppConfig(
        base_model=base_model, engine=engine, db=db, host=host, port=port, users_file=users_file, rounds_dir=rounds_dir,
        admin_users=set(admins.split(",")) if admins else set(),
        engine_config=_engine_config(max_model_len=max_model_len, max_loras=max_loras, cpu_cores=cpu_cores),
        identity=IdentityConfig(anonymous_ids_per_hour=new_ids_per_hour),
        service=ServiceConfig(limits=LimitConfig.scaled(rate_limit), max_input_chars=max_input_chars,
                              auto_promote=promotion,
                              default_sampling=SamplingConfig(max_tokens=max_new_tokens,
                                                              frequency_penalty=frequency_penalty, min_p=min_p)),
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def demo(
    ctx: typer.Context,
    base_model: BaseModelOpt = "default",
    db: DbOpt = None,
    bare_base: bool = typer.Option(False, "--bare-base", help="Serve the bare base model: do not train the first aligned version on a fresh install."),
    train: bool = typer.Option(False, "--train", help="Also run a whole round (SFT, reward model, PPO-ptx) in the background while the app serves; its candidate then shows up in Compare."),
    round_overrides: Optional[list[str]] = typer.Option(None, "--round-set", help="A RoundConfig override for the background round: --round-set ppo.iterations=4.", show_default=False),
    rounds_dir: Optional[Path] = typer.Option(None, "--rounds-dir", help="Where that round writes (default ~/.local/share/alignloop/rounds)."),
) -> None:
    """Prepare the model, create the database, seed the starter set, then serve (what `make run` does).

    On a fresh install the live policy is the bare base model, which has not learnt to chat: the first
    aligned version trains in the background (SFT on the starter demonstrations, training.round.
    first_run_settings) while the app serves the base with a banner showing the training's progress,
    and goes live by itself when its round succeeds; later starts serve it at once. --bare-base skips
    that; --train runs a whole round instead (its candidate waits for Compare votes or an operator).
    The starter set (training/starter/, source 'starter') is imported once. Every other option is
    `alignloop serve`'s (see `alignloop serve --help`).

    Example: ALIGNLOOP_ADMIN_PASSWORD=s3cret alignloop demo --engine hf --train --round-set ppo.iterations=4
    """
    import threading

    from chat_app.round_process import start_round
    from feedback_db import FeedbackStore, ModelRegistry, default_db_path
    from training.base_models import ModelPreparationError, prepare_model
    from training.round_config import RoundConfig, first_run_settings
    from training.round_data import seed_starter_set
    from training.round_promotion import first_run_needed

    try:
        model_dir = prepare_model(base_model)
    except ModelPreparationError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    db_path = db or default_db_path()
    with FeedbackStore(db_path) as store:
        seeded = seed_starter_set(store)
        first_run = not bare_base and not train and first_run_needed(ModelRegistry(store))
    added = ", ".join(f"{n} {kind}" for kind, n in seeded.items())
    typer.echo(f"model: {model_dir}\ndatabase: {db_path}\nstarter set: {added} new records")
    child = None
    if train or first_run:
        child, log_path = start_round(db_path, base_model, rounds_dir or Path(RoundConfig().rounds_dir),
                                      settings=(first_run_settings() if first_run else []) + list(round_overrides or []),
                                      log_name="first-run.log" if first_run else "demo-round.log")
        if first_run:
            typer.echo(f"training the first aligned version in the background (pid {child.pid}, log {log_path}); "
                       "the bare base model serves until it goes live (--bare-base skips this).")
            threading.Thread(target=_promote_first_run, args=(child, db_path), daemon=True,
                             name="first-run").start()
        else:
            typer.echo(f"a round is training in the background (pid {child.pid}, log {log_path}); "
                       "its candidate appears in Compare and on the Dashboard when it is registered.")
    serve_command = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    try:
        serve_command.main(["--base-model", base_model, "--db", str(db_path),
                            *(["--rounds-dir", str(rounds_dir)] if rounds_dir else []), *ctx.args],
                           prog_name="alignloop serve", standalone_mode=False)
    finally:
        if child is not None and child.poll() is None:
            child.terminate()  # a round stopped early registers nothing; the next one starts clean


FIRST_RUN_ACTOR = "first-run"


def _promote_first_run(child, db_path: Path) -> None:
    """When the first-run round ends: make its candidate live (the running server follows the registry),
    if the round succeeded with its gates passed and the bare base is still live."""
    import logging

    from feedback_db import FeedbackError, FeedbackStore, ModelRegistry, for_operator

    log = logging.getLogger("alignloop.first_run")
    status = child.wait()
    with FeedbackStore(db_path) as store:
        registry = ModelRegistry(store)
        rounds = registry.rounds()
        last = rounds[-1] if rounds else None
        if status != 0 or last is None or last.status != "succeeded" or not last.metrics.get("gates_passed"):
            log.error("the first aligned version did not finish (exit status %s, round %s); the bare base model "
                      "keeps serving. See the round's log and report; `alignloop round` retries.", status,
                      last.status if last else "none")
            return
        candidates = [v for v in registry.candidates("policy") if v.round_id == last.id]
        live = registry.live("policy")
        if not candidates or (live is not None and live.adapter_path):
            return  # an operator promoted something meanwhile: leave it
        try:
            registry.promote(candidates[0].id, actor=FIRST_RUN_ACTOR)
        except FeedbackError as exc:
            log.error("could not make the first aligned version %s live: %s", candidates[0].name, for_operator(exc))
            return
        log.info("the first aligned version %s is live", candidates[0].name)


UsersFileArg = Annotated[Optional[Path], typer.Option(
    "--file", envvar="ALIGNLOOP_USERS_FILE", show_default=False,
    help="The users file (default: $ALIGNLOOP_USERS_FILE, else users.json beside the feedback database).")]


def _users_file(path: Optional[Path]):
    from chat_app.auth import UsersFile, default_users_path

    return UsersFile((path or default_users_path()).expanduser())


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(1)


def _read_new_password(name: str, from_stdin: bool) -> str:
    """The new password: one line of stdin, or typed twice at a prompt (never echoed, never on argv)."""
    import getpass
    import sys

    if from_stdin:
        return sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    password = getpass.getpass(f"Password for {name}: ")
    if getpass.getpass("Again: ") != password:
        raise _fail("the two passwords differ; nothing was changed.")
    return password


@users_app.command("add")
def users_add(
    name: str = typer.Argument(..., help="Login name (no spaces)."),
    admin: bool = typer.Option(False, "--admin", help="May use the Dashboard (promote, roll back)."),
    update: bool = typer.Option(False, "--update", help="Change an existing user's password and admin flag."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password from the first line of stdin instead of a prompt."),
    file: UsersFileArg = None,
) -> None:
    """Add a login (the password is asked for, or read from stdin; it never goes on the command line).

    Example: alignloop users add alice --admin    |    printf '%s\\n' "$PW" | alignloop users add bob --password-stdin
    """
    from chat_app.auth import UsersFileError

    users = _users_file(file)
    try:
        record = users.add(name, _read_new_password(name, password_stdin), admin=admin, replace=update)
    except UsersFileError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{'updated' if update else 'added'} {record.name}{' (admin)' if record.admin else ''} in {users.path}; "
               "restart `alignloop serve --users-file` to apply.")


@users_app.command("list")
def users_list(file: UsersFileArg = None) -> None:
    """The logins in the users file (names and admin flags; never the hashes).

    Example: alignloop users list
    """
    from chat_app.auth import UsersFileError

    users = _users_file(file)
    try:
        records = users.read()
    except UsersFileError as exc:
        raise _fail(str(exc)) from None
    if not records:
        typer.echo(f"no users in {users.path} (add one with `alignloop users add NAME`).")
    for record in sorted(records.values(), key=lambda r: r.name):
        keys = ", ".join(k.key_id for k in record.api_keys) or "-"
        typer.echo(f"{record.name}\t{'admin' if record.admin else 'user'}\t{record.created_at}\tAPI keys: {keys}")


@users_app.command("key")
def users_key(
    name: str = typer.Argument(..., help="Login name (add the user first with `alignloop users add`)."),
    revoke: Optional[str] = typer.Option(None, "--revoke", metavar="KEY_ID", help="Revoke this key (its id, from `alignloop users list`) instead of making one."),
    file: UsersFileArg = None,
) -> None:
    """Make an API key for the OpenAI-compatible API (/v1), or revoke one. The key is printed once and
    only its SHA-256 is kept; a running server picks the change up at once.

    Example: alignloop users key alice    |    alignloop users key alice --revoke 3f9a0c1e
    """
    from chat_app.auth import UsersFileError

    users = _users_file(file)
    try:
        if revoke:
            users.revoke_api_key(name, revoke)
            typer.echo(f"revoked API key {revoke} of {name} in {users.path}.")
            return
        key, record = users.add_api_key(name)
    except UsersFileError as exc:
        raise _fail(str(exc)) from None
    typer.echo(key)
    typer.echo(f"(API key {record.key_id} of {name}; shown once, keep it secret. Use it as the OpenAI API key with "
               "base URL http://HOST:PORT/v1.)", err=True)


@users_app.command("remove")
def users_remove(name: str = typer.Argument(..., help="Login name."), file: UsersFileArg = None) -> None:
    """Remove a login (a running server forgets it, and its sessions, on restart).

    Example: alignloop users remove bob
    """
    from chat_app.auth import UsersFileError

    users = _users_file(file)
    try:
        users.remove(name)
    except UsersFileError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"removed {name} from {users.path}; restart `alignloop serve --users-file` to apply.")


def _cli_operator(actor: Optional[str]) -> str:
    """Who runs promote / rollback, for the registry's log: --actor, else the OS login name."""
    import getpass

    if actor:
        return actor
    try:
        return f"{getpass.getuser()}@cli"
    except (KeyError, OSError):  # no login name (a container without a passwd entry)
        return "operator@cli"


def _registry(db: Optional[Path]):
    from feedback_db import FeedbackStore, ModelRegistry, default_db_path

    return ModelRegistry(FeedbackStore(db or default_db_path(), create=False))


@app.command()
def promote(
    version: str = typer.Argument(..., help="Version name (or id) from `alignloop db versions`."),
    db: Optional[Path] = typer.Option(None, "--db", help="Feedback database."),
    actor: Optional[str] = typer.Option(None, "--actor", help="Who promotes, for the registry log (default: your OS login name).", show_default=False),
    wait: Optional[str] = typer.Option(None, "--wait", help="A running server's URL (e.g. http://127.0.0.1:7860/): wait until its /healthz says it serves the version.", show_default=False),
    wait_seconds: float = typer.Option(60.0, "--wait-seconds", help="How long --wait waits."),
) -> None:
    """Make a version live; running servers switch to it within about a second.

    The version's adapter folder is checked first: one that cannot be loaded is refused and nothing
    changes. With --wait, the command returns once the server says it serves the version (exit 2 if
    it does not in time).

    Example: alignloop promote policy-r3 --wait http://127.0.0.1:7860/
    """
    from feedback_db import FeedbackError, for_operator

    try:
        registry = _registry(db)
        target = registry.get(int(version) if version.isdigit() else version)
        if target.adapter_path and target.kind in ("policy", "reward"):
            try:
                check_adapter(Path(target.adapter_path), with_head=target.kind == "reward")
            except Exception as exc:  # noqa: BLE001 - any reason the folder will not load
                typer.secho(f"error: {target.name}'s adapter {target.adapter_path} cannot be loaded "
                            f"({type(exc).__name__}: {str(exc)[:300]}); nothing changed. Restore the folder, or "
                            "run a new round and promote its candidate.", fg=typer.colors.RED, err=True)
                raise typer.Exit(1) from None
        promoted = registry.promote(target.id, actor=_cli_operator(actor))
    except FeedbackError as exc:
        typer.secho(f"error: {for_operator(exc)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{promoted.name} is live in the registry ({promoted.kind}).")
    if wait and promoted.kind == "policy":
        _wait_until_served(wait, promoted.name, wait_seconds)
    elif wait:
        typer.echo(f"(--wait ignored: servers do not serve {promoted.kind} models; the next round uses it.)")


def _wait_until_served(url: str, name: str, seconds: float) -> None:
    """Poll the server's /healthz until it names ``name`` as live; exit 2 with what it serves after ``seconds``."""
    health = url.rstrip("/") + "/healthz"
    started = time.monotonic()
    body: dict = {}
    while True:
        try:
            with urllib.request.urlopen(health, timeout=5) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 503: not ready, with why; 404: not an alignloop server's root
            if exc.code == 404:
                typer.secho(f"error: {health} does not exist; pass the server's root URL (e.g. http://127.0.0.1:7860/). "
                            f"The promotion itself is done.", fg=typer.colors.RED, err=True)
                raise typer.Exit(2) from None
            try:
                body = json.loads(exc.read() or b"{}")
            except ValueError:
                body = {"error": f"HTTP {exc.code} from {health}"}
        except (urllib.error.URLError, OSError, ValueError) as exc:
            body = {"error": f"{health} did not answer: {exc}"}
        if body.get("live_version") == name:
            typer.echo(f"{url} serves {name} (after {time.monotonic() - started:.1f} s).")
            return
        if time.monotonic() - started > seconds:
            typer.secho(f"error: after {seconds:.0f} s {url} still serves {body.get('live_version')!r}, not {name}"
                        f"{': ' + body['error'] if body.get('error') else ''}. Its log says why; "
                        "`alignloop rollback` undoes the promotion.", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        time.sleep(0.25)


@app.command()
def rollback(
    kind: str = typer.Option("policy", "--kind", help="policy | reward"),
    db: Optional[Path] = typer.Option(None, "--db", help="Feedback database."),
    actor: Optional[str] = typer.Option(None, "--actor", help="Who rolls back, for the registry log (default: your OS login name).", show_default=False),
) -> None:
    """Return to the version that was live before the current one.

    Example: alignloop rollback
    """
    from feedback_db import FeedbackError, for_operator

    try:
        restored = _registry(db).rollback(kind, actor=_cli_operator(actor))
    except FeedbackError as exc:
        typer.secho(f"error: {for_operator(exc)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"rolled back: {restored.name} is live again.")


@app.command("round")
def round_(
    db: Optional[Path] = typer.Option(None, "--db", help="Feedback database (default: $ALIGNLOOP_DB or ~/.local/share/alignloop/feedback.db)."),
    base_model: str = typer.Option("default", "--base-model", help="Base model of the adapters (the one `alignloop serve` runs)."),
    rounds_dir: Optional[Path] = typer.Option(None, "--rounds-dir", help="Work, adapters and reports (default ~/.local/share/alignloop/rounds)."),
    seed_starter: bool = typer.Option(False, "--seed-starter", help="First import the starter demonstrations, prompts and preference pairs."),
    promote_only: bool = typer.Option(False, "--promote-only", help="Train nothing: only promote a candidate whose gates and Compare votes qualify (needs --set auto_promote=true)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="Start from a JSON RoundConfig (e.g. a round's recorded config)."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override a field: --set min_votes=50 --set ppo.iterations=40.", show_default=False),
    show_config: bool = typer.Option(False, "--show-config", help="Print the resulting configuration and exit."),
) -> None:
    """Run one retraining round: snapshot → reward model → PPO-ptx → candidate (see training/round.py).

    Exit codes: 0 candidate registered, nothing new to train, or promotion checked; 3 stopped by a
    gate or too little data; 75 another round is running; 1 failed; 130 interrupted.

    Example: alignloop round --seed-starter --set ppo.iterations=40 --set auto_promote=true
    """
    import json as _json

    from training.config import ConfigError, apply_overrides
    from training.round import RoundBusyError, run_round
    from training.round_config import RoundConfig, load_round_config
    from training.round_promotion import maybe_auto_promote

    try:
        cfg = load_round_config(config_file) if config_file else RoundConfig()
        cfg.base_model = base_model if base_model != "default" or not config_file else cfg.base_model
        if db:
            cfg.db = str(db)
        if rounds_dir:
            cfg.rounds_dir = str(rounds_dir)
        apply_overrides(cfg, overrides or [])
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    if show_config:
        typer.echo(_json.dumps(cfg.to_dict(), indent=2))
        return
    if promote_only:
        from feedback_db import FeedbackStore, default_db_path

        with FeedbackStore(cfg.db or default_db_path(), create=False) as store:
            promoted = maybe_auto_promote(store, cfg)
        typer.echo(f"{promoted} is live (auto-promoted)." if promoted else "no candidate qualifies for promotion yet.")
        return
    import signal

    def _terminated(signum: int, frame: object) -> None:  # cron / systemd stop: clean up as Ctrl-C does
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminated)
    try:
        result = run_round(cfg, seed_starter=seed_starter, sampler_factory=rollout_sampler_factory)
    except RoundBusyError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(75) from None
    except KeyboardInterrupt:
        typer.secho("round interrupted: recorded as stopped, nothing registered.", fg=typer.colors.RED, err=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - the round is recorded as failed; say so plainly
        typer.secho(f"round failed: {type(exc).__name__}: {exc} (recorded in `alignloop db versions` / the dashboard)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"round {result.round_id} {result.status}: {result.reason}")
    if result.report_path:
        typer.echo(f"report: {result.report_path}")
    if result.status in ("stopped", "failed"):
        raise typer.Exit(3)
    if cfg.auto_promote:
        from feedback_db import FeedbackStore, default_db_path

        with FeedbackStore(cfg.db or default_db_path()) as store:
            promoted = maybe_auto_promote(store, cfg)
        if promoted:
            typer.echo(f"{promoted} is live (auto-promoted).")


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
