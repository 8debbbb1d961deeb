"""The explorer: a Dash app that browses one run directory (it reads the run, never writes it)."""

from dash_app.app import create_app

__all__ = ["create_app"]
