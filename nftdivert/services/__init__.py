"""At the edges: the listeners that answer, and the observers that log, capture and look up."""
