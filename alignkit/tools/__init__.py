"""Tools that serve alignkit runs from outside: the local judge server."""
