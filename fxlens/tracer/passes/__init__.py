"""Graph rewrites applied on demand when a specialised graph needs a derived site."""
