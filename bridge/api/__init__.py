"""aiohttp routes. Each module has `add_routes(app)` and finds the running `Service` at app[SERVICE]."""
