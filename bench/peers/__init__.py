"""The peers benchmark (issue 20): Ray Serve and Triton against coinserve; see __main__.py."""
