"""At the edges, watching: conntrack events and lookups, bound sockets, the capture, the conversation log."""
