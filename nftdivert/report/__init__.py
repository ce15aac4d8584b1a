"""`nftdivert report`: one self-contained HTML page from a conversation log.
digest.py reads the records into bounded tables (pure); page.py streams the
file in and renders the page through templates/report.html.j2."""
