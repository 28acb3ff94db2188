"""What every `mesh` command shares: the consoles, exit codes, JSON output, click settings,
and the operator-client plumbing of the commands that call a running node.

Exit codes: 0 done, 1 failed, 2 usage error (bad flags, bad config file).
Heavy imports (grpc, the admin clients) stay inside the functions, so `mesh --help`
and the commands that need no node start quickly.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, overload

import click
from rich.console import Console

if TYPE_CHECKING:
    from mesh.admin.client import AdminClient, OperatorClient

# Piped output (CI logs, `make demo | tee`) has no terminal width; rich would
# fall back to 80 columns and truncate addresses in tables.
_PIPE_WIDTH = None if sys.stdout.isatty() else 120
console = Console(width=_PIPE_WIDTH)
err_console = Console(stderr=True, width=_PIPE_WIDTH)

EXIT_FAILED = 1
EXIT_USAGE = 2

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# Where an operator's certificate folder is looked for when no flag names one.
ADMIN_CREDS_ENV = "MESH_ADMIN_CREDS"
DEFAULT_ADMIN_CREDS = "fleet/operators/admin"
ADMIN_CREDS_SHOWN = f"${ADMIN_CREDS_ENV} or ./{DEFAULT_ADMIN_CREDS}"

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print one `error:` line to stderr and exit with `code` (1 failed, 2 usage)."""
    err_console.print(f"[red]error:[/] {message}", highlight=False)
    sys.exit(code)


def emit_json(data: Any) -> None:
    """The result for scripts: indented, keys sorted, on stdout."""
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def admin_creds_default() -> str:
    """The operator certificate folder used when no flag names one."""
    return os.environ.get(ADMIN_CREDS_ENV, DEFAULT_ADMIN_CREDS)


def admin_options(fn: F) -> F:
    """--node, --creds and --json, as every command that calls a node as an operator takes them."""
    fn = click.option("--node", "address", required=True, metavar="HOST:PORT",
                      help="A node's gRPC address.")(fn)
    fn = click.option("--creds", "creds_dir", type=click.Path(file_okay=False, path_type=Path),
                      default=admin_creds_default, show_default=ADMIN_CREDS_SHOWN,
                      help="Operator certificate folder (cert.pem, key.pem, ca.pem).")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(fn)
    return fn


def missing_operator_creds(creds_dir: Path, flag: str) -> str | None:
    """Why `creds_dir` cannot be an operator's certificate folder, naming every way to give one;
    None when its certificate is there (whether it is an operator's is checked on loading)."""
    cert = Path(creds_dir) / "cert.pem"
    if cert.exists():
        return None
    return (f"no operator certificate at {cert}; pass {flag} DIR or set {ADMIN_CREDS_ENV}=DIR, where DIR is "
            f"an operator's certificate folder (`mesh fleet init FLEET` makes FLEET/operators/admin; "
            f"`mesh fleet enroll NAME --role operator --fleet FLEET` makes FLEET/operators/NAME)")


_Client = TypeVar("_Client", bound="OperatorClient")


@overload
def operator_client(address: str, creds_dir: Path, client_class: None = None, *,
                    flag: str = "--creds") -> AdminClient: ...


@overload
def operator_client(address: str, creds_dir: Path, client_class: type[_Client], *,
                    flag: str = "--creds") -> _Client: ...


def operator_client(address: str, creds_dir: Path, client_class: type[OperatorClient] | None = None, *,
                    flag: str = "--creds") -> OperatorClient:
    """An operator client (AdminClient unless told) for the node at `address`; exit 1 saying why
    if it cannot be made. `flag` is the option that named `creds_dir`, for the message."""
    from mesh.admin.client import AdminClient, AdminError
    from mesh.identity.ca import load_credentials
    from mesh.identity.signing import IdentityError

    missing = missing_operator_creds(creds_dir, flag)
    if missing:
        fail(missing)
    try:
        return (client_class or AdminClient)(address, load_credentials(creds_dir))
    except (AdminError, IdentityError) as exc:
        fail(str(exc))


def call_or_exit(address: str, creds_dir: Path, call: Callable[[Any], T],
                 client_class: type[OperatorClient] | None = None, *, flag: str = "--creds") -> T:
    """`call(client)` on a fresh operator client, closed after; exit 1 with the error if it fails."""
    from mesh.admin.client import AdminError

    with operator_client(address, creds_dir, client_class, flag=flag) as client:
        try:
            return call(client)
        except AdminError as exc:
            fail(str(exc))
