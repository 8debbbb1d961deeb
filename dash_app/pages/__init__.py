"""One module per page: `layout(**url_values)` builds it (path variables and query parameters
arrive as arguments, the run through `dash_app.data.current()`), `register(app)` its callbacks."""
