"""What serves the tab: configuration, the run store and its caches, background reading, wire formats."""
