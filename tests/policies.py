"""Access policies the tests start from: the developer's certificate may do everything."""

DEVELOPERS_ADMIN = """
groups:
  developers: [client/developer]
rules:
  - groups: [developers]
    actions: [admin]
"""

# ... and client/alice may read model mlp.
ALICE_READS_MLP = DEVELOPERS_ADMIN + """\
  - principals: [client/alice]
    actions: [models:read]
    models: [mlp]
"""
