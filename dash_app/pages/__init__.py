"""One module per view: `layout(data, ...)` builds the page, `register(app, data)` its callbacks."""
