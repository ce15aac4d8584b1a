"""Errors and the exit status each one means; the CLI decides exits here only."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # kernel refused, drift found, worker failed
EXIT_USAGE = 2  # bad input: nothing was applied


class NftDivertError(Exception):
    exit_status = EXIT_FAILURE


class ConfigError(NftDivertError):
    """Bad input, named precisely enough to fix without reading the source."""

    exit_status = EXIT_USAGE

    def __init__(self, key: str, value: object, reason: str):
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key} = {value!r}: {reason}")


class KernelError(NftDivertError):
    """The kernel (through libnftables or iptables-nft) refused or failed."""


class PermissionProblem(NftDivertError):
    """Needs privileges we do not have and cannot get."""
