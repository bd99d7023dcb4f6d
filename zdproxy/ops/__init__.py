"""Running zdproxy: the daemon's lifecycle, logging and the demo."""
