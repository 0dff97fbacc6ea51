"""rayfit placement: model sizes → a GPU plan → Ray resource requests.

Nothing here imports `deployments`, and nothing here needs a running Ray for a
dry-run plan.
"""
