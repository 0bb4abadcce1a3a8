"""Optional web-framework integrations: ``dtmcli.contrib.flask``, ``.fastapi`` and ``.django``.

Each imports its framework only when imported itself. All of them parse the branch call into a
:class:`~dtmcli.branch.BranchInfo`, pass it to the handler as the keyword argument ``info``, and
answer through the framework-neutral mapping of :mod:`dtmcli.branch`.
"""
