"""The Diagnostics tab's static files (ES modules, CSS), shipped as package data."""
