"""The queue worker: packets -> parse -> decide -> rewrite + checksum -> verdict."""
