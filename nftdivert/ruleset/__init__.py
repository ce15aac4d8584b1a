"""The ruleset as code: config -> model -> text (templates) -> kernel (libnftables)."""
