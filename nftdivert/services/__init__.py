"""The answering side: the built-in listeners (in processes of their own), the
protocol recognised on the default ports and served (HTTP, TLS, DNS, SMTP, FTP,
POP3, IMAP, SSH, proxies, ...), and what they keep (mail, uploads) or hand out
(certificates, files by extension)."""
