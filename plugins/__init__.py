"""First-party alignkit plugins, each registered through the ``alignkit`` entry-point group."""
