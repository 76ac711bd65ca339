"""Python client for a callbridge server: streaming sessions and the jobs REST API."""
