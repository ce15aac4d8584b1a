"""A throwaway network namespace for nft work that must not touch this host's rules.

`diff` loads the rendered ruleset there to get nft's own normal form of it;
`check` uses one to validate without root, inside a user namespace.
Run as `python -m nftdivert.ruleset.scratch ACTION` with the ruleset on stdin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from nftdivert.errors import KernelError, NftDivertError, PermissionProblem
from nftdivert.ruleset.kernel import Nft, is_root


def run(action: str, text: str, table: str) -> str:
    """Do `action` ("check" or "normalize") on `text` in a fresh network namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise KernelError("unshare (util-linux) is missing: it makes the scratch namespace")
    flags = ["--net"] if is_root() else ["--user", "--map-root-user", "--net"]
    # The child imports this very package, wherever it was loaded from.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([unshare, *flags, sys.executable, "-m", "nftdivert.ruleset.scratch", action, table],
                          input=text, capture_output=True, text=True, env=env)
    if proc.returncode == 0:
        return proc.stdout
    err = proc.stderr.strip()
    if "unshare failed" in err or "unshare:" in err:
        raise PermissionProblem(
            "cannot make a scratch network namespace"
            + ("" if is_root() else " (unprivileged user namespaces are off here: "
               "see sysctl kernel.unprivileged_userns_clone / user.max_user_namespaces; or run as root)")
            + f": {err}")
    raise KernelError(err)


def _main(argv: list[str]) -> int:
    action, table = argv
    text = sys.stdin.read()
    try:
        nft = Nft()
        if action == "check":
            nft.run(text, dry_run=True)
        elif action == "probe":
            from nftdivert.ruleset.backends import select
            print(select("auto", nft)[0].name)
        elif action == "normalize":
            nft.run(text)
            sys.stdout.write(nft.list_tables(table) or "")
        else:
            raise SystemExit(f"unknown action {action}")
    except NftDivertError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
